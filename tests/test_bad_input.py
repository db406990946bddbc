"""Bad input, tried as a new user would, through the real `latentverse` command: each is refused with
exit status 2 and ONE line naming the file or key and what to do, before any work, and nothing written
earlier is lost. One test per row of the table in docs/bad_input.md (keep the two in step)."""
import json
import os
import re

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore")


def snapshot(root) -> dict:
    """Every file under root (or the file itself) with its bytes: what must be kept."""
    root = str(root)
    if os.path.isfile(root):
        return {"": open(root, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs}


def flip_bytes(path: str) -> None:
    b = bytearray(open(path, "rb").read())
    for k in (len(b) // 3, len(b) // 2):
        b[k] ^= 0xFF
    open(path, "wb").write(bytes(b))


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    """Text shards of 12 distinct poems from the real prep job."""
    d = tmp_path_factory.mktemp("bad_input")
    words = "moon river stone wind sea light grey over under night lark fern".split()
    os.makedirs(d / "poems")
    with open(d / "poems" / "a.jsonl", "w") as f:
        for k in range(12):
            f.write(json.dumps({"text": "\n".join(" ".join(words[(k * 5 + i * 3 + j) % 12] + str(k) for j in range(4))
                                                  for i in range(3))}) + "\n")
    r = run_cli("prep", "yamls/prep/jsonl.yaml", f"data.path={d}/poems", f"out_dir={d}/text_shards")
    assert r.returncode == 0, r.stderr
    return str(d / "text_shards")


def corrupted_text_shard(tmp, text_shards):
    import shutil

    shards = shutil.copytree(text_shards, f"{tmp}/text_shards")
    shard = f"{shards}/train/0/shard.00000.mds.zstd"
    flip_bytes(shard)
    return (["train", "yamls/autoencoder/tiny_cpu.yaml", f"data.path={shards}", f"out_dir={tmp}/ae"],
            rf"^{shard}: corrupted shard \(its xxh64 hash is not the one in {shards}/train/index.json\); "
            rf"remove {shards} and run the `latentverse prep` that wrote it again \(its config: {shards}/_job.json\)$",
            shards)


def corrupted_latent_shard(tmp, text_shards):
    from trainer.data.synthetic import write_latent_shards

    write_latent_shards(f"{tmp}/latents", n_train=32, n_val=8, tokens=32, dim=32, prompt_dim=384)
    shard = f"{tmp}/latents/train/shard.00001.mds"
    flip_bytes(shard)
    return (["train", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml", f"data.root={tmp}/latents",
             "data.streams=[]", "data.path=train", "data.eval_path=", "autoencoder=", f"out_dir={tmp}/dm"],
            rf"^{tmp}/latents/train/shard.00001.mds: corrupted shard .*; rebuild it with the job that wrote it$",
            f"{tmp}/latents")


def out_dir_is_a_file(job):
    def make(tmp, text_shards):
        open(f"{tmp}/file", "w").write("a file of the user's")
        args = {"prep": ["prep", "yamls/prep/jsonl.yaml", f"data.path={os.path.dirname(text_shards)}/poems",
                         f"out_dir={tmp}/file"],
                "encode": ["encode", "yamls/encode/bundled.yaml", f"data.path={text_shards}", f"autoencoder={tmp}",
                           f"out_dir={tmp}/file"],
                "train": ["train", "yamls/autoencoder/tiny_cpu.yaml", f"data.path={text_shards}", f"out_dir={tmp}/file"],
                "evaluate_autoencoder": ["evaluate", "yamls/eval/autoencoder.yaml", f"autoencoder_dir={tmp}",
                                         f"data_path={text_shards}", f"out_dir={tmp}/file"],
                "evaluate_generation": ["evaluate", "yamls/eval/generation.yaml", f"pipeline={tmp}",
                                        f"latent_data={tmp}", f"out_dir={tmp}/file/sub"],
                "generate": ["generate", str(tmp), "--out", f"{tmp}/file/poems.json"]}[job]
        key = "--out" if job == "generate" else "out_dir"
        where = f"{tmp}/file/sub" if job == "evaluate_generation" else f"{tmp}/file"
        return (args, rf"^{key}: '{where}' is a file or lies under one, not a folder; give another folder "
                      rf"\(nothing was written\)$", f"{tmp}/file")
    return make


def csv_text_column_missing(tmp, text_shards):
    os.makedirs(f"{tmp}/c")
    open(f"{tmp}/c/a.csv", "w").write("title,poem\nx,moon river stone\n")
    return (["prep", f"data.path={tmp}/c", "data.format=csv", f"out_dir={tmp}/out", "sources.gutenberg.enabled=false",
             "sources.shakespeare.enabled=false", "sources.ogura.enabled=false"],
            rf"^{tmp}/c/a.csv: no column 'text' \(data.text_column\); found: title, poem$", f"{tmp}/c")


def yaml_with(line):
    def make(tmp, text_shards):
        open(f"{tmp}/prep.yaml", "w").write(f"out_dir: {tmp}/out\ndata: {{format: jsonl}}\n{line}\n")
        expected = {"bogus: 1": rf"^{tmp}/prep.yaml: bogus: unknown key; PrepConfig takes: out_dir, data, .*$",
                    "num_workers: two": rf"^{tmp}/prep.yaml: num_workers: expected int, got 'two'$"}[line]
        return ["prep", f"{tmp}/prep.yaml", f"data.path={tmp}"], expected, f"{tmp}/prep.yaml"
    return make


def missing_autoencoder(tmp, text_shards):
    return (["encode", "yamls/encode/bundled.yaml", f"data.path={text_shards}", f"autoencoder={tmp}/nope",
             f"out_dir={tmp}/out"], rf"^command line: autoencoder: path does not exist: '{tmp}/nope'$", text_shards)


def demo_bad_data_path(tmp, text_shards):
    return (["demo", f"data.path={tmp}/nope", f"out_dir={tmp}/out"],
            rf"^data.path: no such file or folder: '{tmp}/nope'$", text_shards)


ROWS = {
    "corrupted text shard": corrupted_text_shard,
    "corrupted latent shard": corrupted_latent_shard,
    **{f"out_dir is a file ({job})": out_dir_is_a_file(job)
       for job in ("prep", "encode", "train", "evaluate_autoencoder", "evaluate_generation", "generate")},
    "CSV text column missing": csv_text_column_missing,
    "unknown YAML key": yaml_with("bogus: 1"),
    "wrong-typed YAML key": yaml_with("num_workers: two"),
    "missing autoencoder path": missing_autoencoder,
    "bad data.path for the demo": demo_bad_data_path,
}


@pytest.mark.parametrize("row", list(ROWS))
def test_bad_input_is_one_line_before_any_work_and_keeps_everything(row, tmp_path, text_shards):
    args, expected, kept = ROWS[row](tmp_path, text_shards)
    before = snapshot(kept)
    r = run_cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert re.match(expected, lines[0]), lines[0]
    assert snapshot(kept) == before                         # nothing the user had is lost
    assert not os.path.exists(f"{tmp_path}/out")            # no work began
