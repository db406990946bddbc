"""Shards and checkpoints in a bucket of a real S3 API (moto's server on 127.0.0.1, bench/s3_server.py):
diffusion training streams its shards from the bucket through the node-local cache and checkpoints to
it; killed mid-epoch and resumed from the remote checkpoints it ends with the weights of an
uninterrupted local run; two jobs on one node share one cache; bad URIs are refused in one line; the
tiny chain runs with every shard, checkpoint and export in the bucket; the text jobs (autoencoder,
token LM) stream their shards from the bucket as from a local folder."""
import filecmp
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests import faults
from tests.conftest import ROOT, run_cli
from tests.test_autoencoder_train import TINY as AE_TINY
from tests.tiny import tiny_autoencoder
from trainer.base import uris
from trainer.data.synthetic import write_latent_shards
from trainer.jobs.generate import generate

pytestmark = pytest.mark.object_store

TINY = ["model.moe_dit.dim=32", "model.moe_dit.depth=2", "model.moe_dit.head_dim=16",
        "model.moe_dit.patch_mixer_depth=1", "model.moe_dit.num_experts=2", "batch_size=8", "threads=1",
        "tensorboard=false", "log_interval=1", "optim.warmup=2ba", "optim.lr=1.0e-3", "ema.decay=0.9",
        "max_minutes=null", "autoencoder=", "data.root=", "data.streams=[]", "data.eval_path=",
        "max_duration=12ba", "save_interval=2ba", "run_name=tiny"]
PRETRAIN = os.path.join(ROOT, "yamls/diffusion/pretrain_masked_tiny_cpu.yaml")


@pytest.fixture
def shards(tmp_path, s3_bucket):
    local = write_latent_shards(tmp_path / "latents", n_train=64, n_val=16, prompt_dim=384)
    uris.upload_tree(str(tmp_path / "latents"), f"{s3_bucket}/latents")
    return {"local": local["train"], "remote": f"{s3_bucket}/latents/train", "bucket": s3_bucket}


def exported(out):
    return load_file(os.path.join(out, "denoiser", "denoiser.safetensors"))


def test_train_from_the_bucket_killed_and_resumed_from_remote_checkpoints_ends_with_the_same_weights(
        shards, tmp_path, s3_server):
    ref = tmp_path / "ref"
    r = run_cli("train", PRETRAIN, f"data.path={shards['local']}", f"out_dir={ref}", *TINY)
    assert r.returncode == 0, r.stderr[-3000:]

    out, ckpt = tmp_path / "remote", f"{shards['bucket']}/ckpt"
    args = ["train", PRETRAIN, f"data.path={shards['remote']}", f"out_dir={out}", f"save_folder={ckpt}", *TINY]
    r = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, start_new_session=True, env=faults.env(KILL_AT_BATCH=7, KILL_GROUP=1))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    keys = s3_server.keys(shards["bucket"][5:], "ckpt/")
    assert any("-ba4" in k for k in keys), keys              # the checkpoints went to the bucket
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(out / "checkpoints")           # nothing written beside out_dir
    assert not os.path.exists(os.path.join(ROOT, "s3:"))      # nor under the working directory
    a, b = exported(ref), exported(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"


def test_two_jobs_on_one_node_share_one_cache_and_a_third_exports_its_pipeline_to_the_bucket(shards, tmp_path):
    cmd = lambda out, *more: [sys.executable, "-m", "launch.cli", "train", PRETRAIN, f"data.path={shards['remote']}",
                              f"out_dir={out}", *TINY, "max_duration=2ba", "save_interval=2ba", *more]
    procs = [subprocess.Popen(cmd(tmp_path / f"job{i}"), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    cache = os.environ["LATENTVERSE_CACHE"]
    slots = lambda: sorted(d for d in os.listdir(uris.cache_dir(shards["remote"])) if not d.endswith(".lock"))
    assert slots() == ["stream-0", "stream-1"]                # at once: a slot each, no shared-memory clash
    # a third job reuses a free slot; its autoencoder comes from the bucket, its pipeline goes there
    uris.upload_tree(tiny_autoencoder(str(tmp_path / "ae")), f"{shards['bucket']}/ae")
    pipe = f"{shards['bucket']}/pipe"
    r = run_cli(*cmd(tmp_path / "job2", f"autoencoder={shards['bucket']}/ae", f"export_uri={pipe}")[3:])
    assert r.returncode == 0, r.stderr[-3000:]
    assert slots() == ["stream-0", "stream-1"]
    local = tmp_path / "job2" / "pipeline"
    assert uris.list_keys(pipe) == sorted(os.path.relpath(os.path.join(d, f), local)
                                          for d, _, fs in os.walk(local) for f in fs)
    poems = tmp_path / "poems.json"
    r = run_cli("generate", pipe, "--prompt", "a sonnet about the sea", "--steps", "2", "--out", poems)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(poems.read_text()) == generate(str(local), ["a sonnet about the sea"], steps=2)["results"]
    assert os.path.isfile(os.path.join(uris.cache_dir(pipe, "copy"), "model_index.json"))   # from the cache
    assert cache in uris.cache_dir(pipe)


@pytest.mark.parametrize("uri, env, message", [
    ("ftp://bucket/latents", {}, "unknown scheme 'ftp://'"),
    ("s3://no-such-bucket-here/latents", {}, "bucket 'no-such-bucket-here' does not exist"),
    ("{bucket}/nothing/here", {}, "no object at this path"),
    ("{bucket}/latents/train", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}, "no valid credentials"),
])
def test_a_bad_uri_is_refused_in_one_line_before_any_work(shards, tmp_path, uri, env, message):
    e = {k: v for k, v in os.environ.items() if k not in env}
    e.update({k: v for k, v in env.items() if v})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", PRETRAIN,
                        f"data.path={uri.format(bucket=shards['bucket'])}", f"out_dir={out}", *TINY],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=e)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0] and "data.path" in lines[0], r.stderr[-2000:]
    assert not (out / "checkpoints").exists()


def test_generate_from_a_uri_with_no_pipeline_is_one_line(s3_bucket):
    r = run_cli("generate", f"{s3_bucket}/no-pipeline", "--prompt", "x")
    assert r.returncode == 2 and r.stderr.strip() == (f"pipeline: {s3_bucket}/no-pipeline: no object at this path "
                                                      f"in bucket '{s3_bucket[5:]}'"), r.stderr[-2000:]


def test_encode_writes_its_shards_to_the_bucket_once(s3_bucket, tmp_path):
    import shutil

    from streaming import StreamingDataset

    from data_prep import encode_job
    from tests.test_encode_job import write_text_shards
    from trainer.base import config as C
    from trainer.base.config import UserError

    out = f"{s3_bucket}/latents"
    args = [f"out_dir={out}", f"autoencoder={tiny_autoencoder(str(tmp_path / 'ae'))}", "batch_size=7",
            f"data.path={write_text_shards(tmp_path / 'text', n_train=12, n_val=4)}", "data.splits=[train, val]",
            "prompt_encoder.max_length=12"]
    info = encode_job.run(C.load(encode_job.EncodeConfig, None, args))
    stage = uris.cache_dir(out, "stage")
    assert uris.list_keys(out) == sorted(os.path.relpath(os.path.join(d, f), stage)
                                         for d, _, fs in os.walk(stage) for f in fs)
    assert {"_done.json", "train/index.json", "val/index.json", "latent_stats.json"} <= set(uris.list_keys(out))
    ds = StreamingDataset(remote=f"{out}/val", local=str(tmp_path / "read"), shuffle=False, batch_size=1)
    assert len(ds) == 4 and ds[0]["latent"].shape == (32, 64)
    shutil.rmtree(stage)        # another node: the bucket's done marker says it is finished
    assert encode_job.run(C.load(encode_job.EncodeConfig, None, args)) == info and not os.path.exists(stage)
    with pytest.raises(UserError, match="holds the shards of another config"):
        encode_job.run(C.load(encode_job.EncodeConfig, None, [*args, "prompt_encoder.max_length=10"]))
    with pytest.raises(UserError, match=f"autoencoder: {s3_bucket}/ae: no object at this path"):
        encode_job.run(C.load(encode_job.EncodeConfig, None, [*args, f"autoencoder={s3_bucket}/ae"]))


def test_prep_writes_its_shards_to_the_bucket_once(s3_bucket, tmp_path):
    import shutil

    from data_prep import prep_job
    from tests.test_prep_job import NO_BUNDLED, poem, write
    from trainer.base import config as C

    write(tmp_path / "c" / "a.csv", "text,topic\n" + "".join(f'"{poem(k)}",sea\n' for k in range(12)))
    out = f"{s3_bucket}/text"
    args = [f"data.path={tmp_path / 'c'}", "data.format=csv", f"out_dir={out}", *NO_BUNDLED]
    stats = prep_job.run(C.load(prep_job.CONFIG, None, args))
    stage = uris.cache_dir(out, "stage")
    assert uris.list_keys(out) == sorted(os.path.relpath(os.path.join(d, f), stage)
                                         for d, _, fs in os.walk(stage) for f in fs)
    assert {"_done.json", "stats.json", "train/index.json"} <= set(uris.list_keys(out))
    shutil.rmtree(stage)
    assert prep_job.run(C.load(prep_job.CONFIG, None, args)) == stats and not os.path.exists(stage)


def test_the_tiny_chain_with_every_shard_checkpoint_and_export_in_the_bucket(s3_bucket, tmp_path, monkeypatch):
    """prep (of a corpus in the bucket) -> encode -> diffusion training -> generate -> evaluate, each
    reading the stage before from the bucket and writing there; on disk only the node-local cache and
    the node's tmp (the training job's logs, the evaluations' reports)."""
    from tests.test_prep_job import NO_BUNDLED, poem, write

    b, cache = s3_bucket, os.environ["LATENTVERSE_CACHE"]
    shared, node_tmp = tmp_path / "shared", tmp_path / "node-tmp"
    write(shared / "corpus" / "a.csv", "text,topic\n" + "".join(f'"{poem(k)}",sea\n' for k in range(30)))
    (shared / "work").mkdir()
    uris.upload_tree(tiny_autoencoder(str(node_tmp / "ae")), f"{b}/ae")     # the autoencoder stage
    monkeypatch.setenv("TMPDIR", str(node_tmp))
    inputs = {p for p in shared.rglob("*")}

    def stage(*args):
        r = run_cli(*args, cwd=shared / "work")
        assert r.returncode == 0, r.stderr[-3000:]

    uris.upload_tree(str(shared / "corpus"), f"{b}/corpus")                 # the user's poems, in the bucket
    stage("prep", f"data.path={b}/corpus", "data.format=csv", f"out_dir={b}/text", "split.val=0.3",
          "split.test=0", *NO_BUNDLED)
    stage("encode", f"data.path={b}/text", f"autoencoder={b}/ae", f"out_dir={b}/latents", "batch_size=7",
          "data.splits=[train, val]", "prompt_encoder.max_length=12")
    run = node_tmp / "run"      # the training job's logs and metrics: node-local scratch
    stage("train", PRETRAIN, f"data.path={b}/latents/train", f"out_dir={run}", *TINY, f"save_folder={b}/ckpt",
          f"autoencoder={b}/ae", f"export_uri={b}/pipe")
    poems = node_tmp / "poems.json"
    stage("generate", f"{b}/pipe", "--prompt", "a poem about the sea", "--steps", "2", "--out", poems)
    ev, before = node_tmp / "eval", set(uris.list_keys(b))   # the evaluation reads both from the bucket
    stage("evaluate", os.path.join(ROOT, "yamls/eval/generation.yaml"), f"out_dir={ev}", f"pipeline={b}/pipe", f"latent_data={b}/latents",
          "held_out_split=val", "samples_per_prompt=2", "steps=2", "mauve=false", "n_linear_check=4",
          "n_prompts=1", "meter_readings=1", "max_train=64")
    stage("evaluate", os.path.join(ROOT, "yamls/eval/autoencoder.yaml"), f"out_dir={node_tmp}/eval_ae",
          f"autoencoder_dir={b}/ae", f"data_path={b}/text", "split=val", "n_samples=4")

    keys = set(uris.list_keys(b))
    assert {"text/_done.json", "text/train/index.json", "latents/_done.json", "latents/train/index.json",
            "latents/val/index.json", "pipe/model_index.json"} <= keys, sorted(keys)
    assert any(k.startswith("latents/train/") and ".mds" in k for k in keys), sorted(keys)
    assert any(k.startswith("ckpt/") and "-ba12" in k for k in keys), sorted(keys)
    written = sorted(str(p) for p in tmp_path.rglob("*") if p.is_file() and p not in inputs
                     and not str(p).startswith((cache, str(node_tmp))))
    assert written == [], written                              # nothing on a shared disk
    assert not [p for p in node_tmp.rglob("*.pt")], "checkpoints left in TMPDIR once uploaded"
    assert not (run / "checkpoints").exists() and not os.path.exists(os.path.join(ROOT, "s3:"))
    assert [r["prompt"] for r in json.loads(poems.read_text())] == ["a poem about the sea"]
    local, copy = run / "pipeline", uris.cache_dir(f"{b}/pipe", "copy")    # generate read the uploaded export
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    assert files and all(filecmp.cmp(local / f, os.path.join(copy, f), shallow=False) for f in files)
    report = json.loads((ev / "report.json").read_text())
    assert report["pipeline"] == f"{b}/pipe" and report["n_held_out"] >= 4 and len(report["samples"]) == 2
    assert keys == before                                      # and writes nothing there (the card stays)
    assert json.loads((node_tmp / "eval_ae" / "report.json").read_text())["n"] == 4


@pytest.mark.parametrize("args", [
    ["yamls/autoencoder/tiny_cpu.yaml", *AE_TINY],
    ["yamls/autoencoder/token_embeddings_tiny_cpu.yaml", "model.tokenizer.vocab_size=300",
     "model.tokenizer.min_frequency=1", "model.num_tokens=12", "seq_len=16", "eval_batches=1"],
], ids=["autoencoder", "token_lm"])
def test_text_jobs_stream_their_shards_from_the_bucket_as_from_a_local_folder(s3_bucket, tmp_path, args):
    from tests.test_encode_job import write_text_shards

    local = write_text_shards(tmp_path / "text", n_train=24, n_val=8)
    uris.upload_tree(local, f"{s3_bucket}/text")
    common = ["max_duration=4ba", "batch_size=8", "eval_interval=4ba", "threads=1", "log_interval=1",
              "max_minutes=null", "data.clean_shared_memory=false"]
    losses = {}
    for where, path in (("local", local), ("bucket", f"{s3_bucket}/text")):
        r = run_cli("train", *args, f"out_dir={tmp_path / where}", f"data.path={path}", *common)
        assert r.returncode == 0, r.stderr[-3000:]
        losses[where] = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
                         for x in open(tmp_path / where / "metrics.jsonl")]
    assert len(losses["local"]) >= 4 and losses["bucket"] == losses["local"]
    cached = os.listdir(os.path.join(uris.cache_dir(f"{s3_bucket}/text/train"), "stream-0"))
    assert any(".mds" in f for f in cached), cached             # read through the node-local cache
