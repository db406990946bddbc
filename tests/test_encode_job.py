"""Encode job on tiny real parts: a tiny BART-Perceiver autoencoder, the bundled MiniLM prompt
encoder, real text shards. 1 slot and 2 slots give the same samples; a kill is resumed; the
recorded latent statistics equal a direct computation over the stored latents."""
import json
import os

import numpy as np
import pytest
import torch

from data_prep import encode_job
from trainer.base import config as C

from . import faults
from .conftest import run_cli

FORMS = ["sonnet", "tanka", "haiku", ""]


def write_text_shards(root, n_train=40, n_val=12, meters=()):
    """Poems of random words with forms (and, given `meters`, meters in turn, named in the prompt)."""
    from streaming import MDSWriter

    from trainer.base.schema import LABELS, TEXT_COLUMNS

    words = "the sea moon night love wind stone river light dark song heart old rain".split()
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        with MDSWriter(out=os.path.join(root, split), columns=TEXT_COLUMNS, size_limit=1 << 12) as w:
            for i in range(n):
                text = "\n".join(" ".join(rng.choice(words, size=4)) for _ in range(2))
                form = FORMS[i % len(FORMS)]
                labels = {k: "" for k in LABELS}
                labels["form"] = form
                prompt = f"{form} about the sea" if form else ""
                if meters:
                    labels["meter"] = meters[i % len(meters)]
                    prompt = f"{form or 'poem'} in {labels['meter']}"
                w.write({"id": f"{split}-{i}", "text": text, "prompt": prompt,
                         "source": "jsonl", **labels, "n_tokens": 8})
    return str(root)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.tokenizers import train_bpe

    root = tmp_path_factory.mktemp("enc")
    shards = write_text_shards(root / "text")
    tok = train_bpe(["the sea moon night love wind stone river light dark song heart old rain"] * 5,
                    vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    ae = LatentAutoencoder(AutoencoderConfig(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2,
                                             ffn_dim=64, perceiver_depth=1, perceiver_heads=2,
                                             perceiver_dim_head=16, reconstruction_depth=1, max_tokens=24), tok)
    ae.save_pretrained(str(root / "ae"))
    return {"root": root, "shards": shards, "ae": str(root / "ae")}


def overrides(assets, out, *extra):
    return [f"out_dir={out}", f"autoencoder={assets['ae']}", f"data.path={assets['shards']}",
            "data.splits=[train, val]", "prompt_encoder.max_length=12", "batch_size=7", *extra]


def read_latents(path):
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, shuffle=False, batch_size=1)
    return {ds[i]["id"]: ds[i] for i in range(len(ds))}


def test_one_and_two_slots_give_the_same_samples_and_stats_are_exact(assets, tmp_path):
    cfg1 = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "one"))
    info = encode_job.run(cfg1)
    assert info["counts"] == {"train": 40, "val": 12}
    cfg2 = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "two", "num_workers=2"))
    encode_job.run(cfg2)
    for split in ("train", "val"):
        a, b = read_latents(str(tmp_path / "one" / split)), read_latents(str(tmp_path / "two" / split))
        assert sorted(a) == sorted(b) and len(a) == {"train": 40, "val": 12}[split]
        for k in a:
            assert a[k]["latent"].dtype == np.float16 and a[k]["latent"].shape == (32, 64)
            # equal within fp16: one rounding step (relative 2^-10) where batching changed the last bits
            np.testing.assert_allclose(a[k]["latent"].astype(np.float32), b[k]["latent"].astype(np.float32),
                                       rtol=2e-3, atol=2e-3)
            assert a[k]["prompt"] == b[k]["prompt"] and a[k]["form"] == b[k]["form"]
            assert a[k]["prompt_emb"].shape == (12, 384) and a[k]["prompt_pooled"].shape == (384,)
            n = int(a[k]["prompt_len"])
            assert np.all(a[k]["prompt_emb"][n:] == 0) and (n == 2) == (a[k]["prompt"] == "")
        # latent_stats.json equals a direct computation over the stored fp16 latents
        z = np.stack([v["latent"].astype(np.float64) for v in a.values()]).reshape(-1, 64)
        stats = json.load(open(tmp_path / "one" / split / "latent_stats.json"))
        np.testing.assert_allclose(stats["channel_mean"], z.mean(0), atol=1e-9)
        np.testing.assert_allclose(stats["channel_std"], z.std(0), atol=1e-7)
        np.testing.assert_allclose(stats["std"], z.std(), atol=1e-7)
        np.testing.assert_allclose(stats["sigma_data"], (z - z.mean(0)).std(), atol=1e-7)
    top = json.load(open(tmp_path / "one" / "latent_stats.json"))
    assert top["split"] == "train" and top["count_samples"] == 40
    # a finished job run again does nothing
    again = encode_job.run(cfg1)
    assert again["fingerprint"] == info["fingerprint"] and again["seconds"] == info["seconds"]


def test_same_prompt_same_embedding(assets, tmp_path):
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "o", "data.splits=[train]"))
    encode_job.run(cfg)
    rows = list(read_latents(str(tmp_path / "o" / "train")).values())
    same = [r for r in rows if r["prompt"] == "sonnet about the sea"]
    assert len(same) >= 2
    np.testing.assert_array_equal(same[0]["prompt_emb"], same[1]["prompt_emb"])


@pytest.mark.slow
def test_kill_and_rerun_keeps_finished_slots(assets, tmp_path):
    out = tmp_path / "k"
    args = ["encode", *overrides(assets, out, "num_workers=2")]
    r = run_cli(*args, env=faults.env(KILL_AFTER_RECORDS=7, KILL_SLOT=1, KILL_WAITS_FOR=0))
    assert r.returncode == 2 and "slot 1 killed by SIGKILL; run the same command again" in r.stderr, r.stderr[-2000:]
    assert "slot 1 SIGKILLs its process after 7 records" in r.stderr
    # slot 1 died mid-write: its shard folder open, never finished (no index), no done-marker
    assert os.path.isdir(out / "train" / "1") and not os.path.exists(out / "train" / "1" / "index.json")
    assert os.path.exists(out / "_ranks" / "0.json") and not os.path.exists(out / "_ranks" / "1.json")
    mtime0 = os.path.getmtime(out / "_ranks" / "0.json")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.getmtime(out / "_ranks" / "0.json") == mtime0      # slot 0 was not redone
    # the same samples, bit for bit, as the same job never killed
    encode_job.run(C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "ref", "num_workers=2")))
    for split in ("train", "val"):
        got, ref = read_latents(str(out / split)), read_latents(str(tmp_path / "ref" / split))
        assert list(got) == list(ref) and len(got) == {"train": 40, "val": 12}[split]   # each sample once, in order
        for k in ref:
            assert set(got[k]) == set(ref[k])
            for col in ref[k]:
                np.testing.assert_array_equal(got[k][col], ref[k][col], err_msg=f"{k} {col}")
    assert json.load(open(out / "latent_stats.json")) == json.load(open(tmp_path / "ref" / "latent_stats.json"))


def test_wds_output(assets, tmp_path):
    import webdataset as wds

    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "w", "format=wds", "data.splits=[val]"))
    encode_job.run(cfg)
    lst = (tmp_path / "w" / "val" / "shards.txt").read_text().split()
    urls = [str(tmp_path / "w" / "val" / p) for p in lst]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == 12
    # every record read back equals the MDS output's record of the same config, column for column
    encode_job.run(C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "m", "data.splits=[val]")))
    ref = read_latents(str(tmp_path / "m" / "val"))
    got = {s["json"]["id"]: s for s in samples}
    assert sorted(got) == sorted(ref)
    for k, r in ref.items():
        s = got[k]
        assert {c: s["json"][c] for c in s["json"]} == {c: r[c] for c in s["json"]}
        assert {"text", "prompt", "form", "prompt_len"} <= set(s["json"])
        for col in ("latent", "prompt_emb", "prompt_pooled"):
            assert s[f"{col}.npy"].dtype == r[col].dtype, col
            np.testing.assert_array_equal(s[f"{col}.npy"], r[col], err_msg=f"{k} {col}")


def test_missing_split_and_changed_config_are_one_line(assets, tmp_path):
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "m", "data.splits=[train, test]"))
    with pytest.raises(C.UserError, match=r"data.splits\[1\]: no text shards"):
        encode_job.run(cfg)
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "c", "data.splits=[val]"))
    encode_job.run(cfg)
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "c", "data.splits=[val]",
                                                           "prompt_mode=pooled"))
    with pytest.raises(C.UserError, match="holds latents of another config"):
        encode_job.run(cfg)


def test_local_mds_reads_compressed_shards_without_shared_memory(tmp_path):
    from streaming import MDSWriter

    from trainer.data.mds import LocalMDS

    with MDSWriter(out=str(tmp_path / "d"), columns={"text": "str"}, compression="zstd", size_limit=1 << 11) as w:
        for i in range(300):
            w.write({"text": f"poem {i} " * 5})
    assert not any(f.endswith(".mds") for f in os.listdir(tmp_path / "d"))   # only zstd files so far
    d = LocalMDS(str(tmp_path / "d"))
    assert len(d) == 300 and [d[i]["text"] for i in (0, 150, 299)] == [f"poem {i} " * 5 for i in (0, 150, 299)]
    with pytest.raises(IndexError):
        d[300]


def test_partition_by_form_gives_one_dataset_per_value_and_streams_weigh_them(assets, tmp_path):
    from collections import Counter

    from trainer.data.loaders import LatentDataConfig, StreamConfig, build_latent_dataloader

    out = tmp_path / "p"
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, out, "num_workers=2", "partition_by=form"))
    encode_job.run(cfg)
    train = out / "train"
    assert sorted(p for p in os.listdir(train) if "=" in p) == ["form=haiku", "form=none", "form=sonnet", "form=tanka"]
    whole = read_latents(str(train))
    assert len(whole) == 40                                           # the split index still covers all
    for part, form in (("form=sonnet", "sonnet"), ("form=none", "")):
        rows = read_latents(str(train / part))
        assert len(rows) == 10 and {r["form"] for r in rows.values()} == {form}
        for k, r in rows.items():
            np.testing.assert_array_equal(r["latent"], whole[k]["latent"])
    # Streams over the partitions: the statistics come from the split; the proportions set the mix.
    data = LatentDataConfig(root=str(train), streams=[StreamConfig("form=none", 0.7), StreamConfig("form=sonnet", 0.3)],
                            shuffle_seed=1)
    assert [s.path for s in data.stream_paths()] == [str(train / "form=none"), str(train / "form=sonnet")]
    assert data.stats_file() == str(train / "latent_stats.json")
    dl, _ = build_latent_dataloader(data, 5, seed=1, epoch_size=200)
    counts = Counter(int(v) for b in dl for v in b["prompt_mask"].sum(1))  # "" prompts: 2 tokens, sonnet's more
    assert sum(counts.values()) == 200 and counts[2] == 140
    with pytest.raises(ValueError, match="partition_by"):
        C.load(encode_job.EncodeConfig, None, overrides(assets, out, "partition_by=colour"))


def test_merge_with_a_partition_one_rank_never_wrote(tmp_path):
    from trainer.data.mds import LocalMDS, RankedDataset

    ds = RankedDataset(str(tmp_path), {"text": "str"}, splits=["train"], compression=None)
    for rank, parts in ((0, ["k=a", "k=b"]), (1, ["k=b"])):
        w = ds.rank_writer(rank)
        for p in parts:
            w.write({"text": f"{rank}{p}"}, split="train", partition=p)
        w.finish()
    ds.merge(2)
    assert [LocalMDS(str(tmp_path / "train" / "k=b"))[i]["text"] for i in range(2)] == ["0k=b", "1k=b"]
    assert len(LocalMDS(str(tmp_path / "train" / "k=a"))) == 1 and len(LocalMDS(str(tmp_path / "train"))) == 3


def test_each_slot_gets_its_own_gpu():
    """device cuda: a rank's slot takes GPU LOCAL_RANK * num_workers + worker (mod the GPU count)."""
    dev = encode_job.slot_device
    # one rank per GPU (`composer -n 8 ... device=cuda`): rank r on cuda:r, not all on cuda:0
    assert [dev("cuda", {"LOCAL_RANK": str(r)}, cuda_count=8) for r in range(8)] == \
        [torch.device("cuda", r) for r in range(8)]
    assert dev("cuda", {}, cuda_count=8) == torch.device("cuda", 0)  # no launcher
    # the processes a rank spawns (num_workers) get distinct GPUs too: 4 ranks x 2 slots on 8 GPUs
    got = [dev("cuda", {"LOCAL_RANK": str(r)}, j, 2, cuda_count=8) for r in range(4) for j in range(2)]
    assert sorted(d.index for d in got) == list(range(8))
    # more slots than GPUs share them evenly
    got = [dev("cuda", {"LOCAL_RANK": "0"}, j, 4, cuda_count=2).index for j in range(4)]
    assert sorted(got) == [0, 0, 1, 1]
    assert dev("auto", {"LOCAL_RANK": "3"}, cuda_count=4) == torch.device("cuda", 3)
    assert dev("auto", {"LOCAL_RANK": "3"}, cuda_count=0) == torch.device("cpu")
    assert dev("cpu", {"LOCAL_RANK": "3"}, cuda_count=4) == torch.device("cpu")
    with pytest.raises(C.UserError, match=r"^device: cuda, but this machine has no CUDA device"):
        dev("cuda", {"LOCAL_RANK": "1"}, cuda_count=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(assets, tmp_path):
    cfg = C.load(encode_job.EncodeConfig, None, overrides(assets, tmp_path / "out", "device=cuda", "num_workers=2"))
    with pytest.raises(C.UserError, match=r"^device: cuda, but this machine has no CUDA device"):
        encode_job.run(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode, want, absent", [("tokens", {"prompt_emb", "prompt_len"}, {"prompt_pooled"}),
                                                ("pooled", {"prompt_pooled"}, {"prompt_emb", "prompt_len"})])
def test_prompt_mode_writes_its_columns_and_the_diffusion_job_trains_on_them(assets, tmp_path, mode, want, absent):
    """Each prompt_mode's latents hold the prompt columns it promises (and no other), and the diffusion
    job trains on them: 2 batches of a tiny DiT, finite losses."""
    from trainer.data.loaders import LatentDataConfig, build_latent_dataloader, shard_columns

    from .test_train_diffusion import PRETRAIN, TINY

    out = tmp_path / mode
    encode_job.run(C.load(encode_job.EncodeConfig, None, overrides(assets, out, f"prompt_mode={mode}",
                                                                   "data.splits=[train]")))
    cols = set(shard_columns(str(out / "train")))
    assert want <= cols and not (absent & cols), sorted(cols)
    rows = list(read_latents(str(out / "train")).values())
    if mode == "tokens":   # the real tokens first, zeros after: the lengths say where the prompt ends
        assert all(np.any(r["prompt_emb"][int(r["prompt_len"]) - 1] != 0) for r in rows)
    # the training job's loader hands the model these prompts (an unconditional batch would train too)
    loader, _ = build_latent_dataloader(LatentDataConfig(path=str(out / "train"), eval_path=str(out / "train")), 4, eval=True)
    batch = next(iter(loader))
    if mode == "tokens":
        assert "prompt_pooled" not in batch
        np.testing.assert_array_equal(batch["prompt_emb"][0].numpy(), rows[0]["prompt_emb"].astype(np.float32))
        assert batch["prompt_mask"].sum(1).tolist() == [int(x["prompt_len"]) for x in rows[:4]]
    else:
        assert "prompt_emb" not in batch
        np.testing.assert_array_equal(batch["prompt_pooled"][0].numpy(), rows[0]["prompt_pooled"].astype(np.float32))
    r = run_cli("train", PRETRAIN, *TINY, f"data.path={out / 'train'}", f"out_dir={tmp_path / 'run'}",
                "data.eval_path=", "max_duration=2ba", "save_interval=2ba")
    assert r.returncode == 0, r.stderr[-3000:]
    losses = [m["train/loss"] for m in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "train/loss" in m]
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
