"""Diffusion training job on tiny real parts (Composer, mosaicml-streaming, a tiny MoE DiT, tiny latent
shards): stage 1 -> stage 2 through `latentverse train`, the EMA is what is exported and sampled,
SIGKILL mid-epoch and resume gives every sample once per epoch and the same weights as an
uninterrupted run, a kill half-way through a checkpoint write, stale shared memory, a NaN loss, and
bad YAMLs refused in one line."""
import copy
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.base import config as C
from tests import faults

from .conftest import ROOT, run_cli
from trainer.data.synthetic import write_latent_shards

TINY = ["model.moe_dit.dim=32", "model.moe_dit.depth=2", "model.moe_dit.head_dim=16",
        "model.moe_dit.patch_mixer_depth=1", "model.moe_dit.num_experts=2", "batch_size=8", "threads=1",
        "tensorboard=false", "log_interval=1", "optim.warmup=2ba", "optim.lr=1.0e-3", "ema.decay=0.9",
        "max_minutes=null", "autoencoder=", "data.root=", "data.streams=[]"]
PRETRAIN = os.path.join(ROOT, "yamls/diffusion/pretrain_masked_tiny_cpu.yaml")
FINETUNE = os.path.join(ROOT, "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml")


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]


def read_jsonl(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def stale_streaming_shm():
    """Streaming shared-memory segments in /dev/shm that no live process maps."""
    from trainer.data.loaders import _STREAMING_SHM, _mapped_shm_names

    mapped = _mapped_shm_names()
    return {n for n in os.listdir("/dev/shm") if _STREAMING_SHM.match(n) and n not in mapped}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_latent_shards(tmp_path_factory.mktemp("latents"), n_train=64, n_val=16, prompt_dim=384)


def base(shards, out, *extra, eval=False):
    return [f"data.path={shards['train']}", f"out_dir={out}", *TINY,
            f"data.eval_path={shards['val'] if eval else ''}", *extra]


# ---------------------------------------------------------------- stage 1 -> stage 2, EMA export and sampling

@pytest.fixture(scope="module")
def two_stages(shards, reconstructing_ae, tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    s1, s2 = root / "pretrain", root / "finetune"
    sampling = [f"autoencoder={reconstructing_ae}", "sample_every=3", "sampler.num_steps=2",
                "sample_prompts=[a sonnet about the sea, '']", "prompt_encoder.max_length=8"]
    args1 = base(shards, s1, "max_duration=6ba", "save_interval=3ba", "eval_interval=3ba", "eval_batches=1",
                 "tensorboard=true", *sampling, eval=True)
    # the latents its sampler draws are recorded (before decoding) by tests/faults: compared tensor for tensor
    r1 = run_cli("train", PRETRAIN, *args1, env=faults.env(RECORD_SAMPLES=root / "sampled"))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli("train", FINETUNE, *base(shards, s2, "max_duration=3ba", "save_interval=1ba", "save_num_checkpoints_to_keep=-1", "eval_interval=3ba",
                                          "eval_batches=1", f"load_path={s1}/checkpoints/latest-rank0.pt",
                                          *sampling, eval=True))
    assert r2.returncode == 0, r2.stderr[-3000:]
    return {"s1": s1, "s2": s2, "r1": r1, "r2": r2, "ae": reconstructing_ae, "args1": args1,
            "sampled": root / "sampled"}


def test_stage1_then_stage2_end_to_end(two_stages):
    s1, s2 = two_stages["s1"], two_stages["s2"]
    for out, batches in ((s1, 6), (s2, 3)):
        summary = json.load(open(out / "train_summary.json"))
        assert summary["batches"] == batches
        assert summary["eval/EMALoss"] > 0 and summary["eval/Loss"] > 0
        meta = json.load(open(out / "denoiser" / "denoiser_config.json"))
        assert meta["weights"] == "ema" and meta["normalize"] == "center"
        assert (out / "loss_curve.png").stat().st_size > 1000
        rows = read_jsonl(out / "metrics.jsonl")
        assert [r["batch"] for r in rows if "train/loss" in r] == list(range(1, batches + 1))
        assert all(r["train/loss"] > 0 for r in rows if "train/loss" in r)
        # the linear check at every evaluation (batch 3 and 6): the EMA denoiser's error ÷ the Wiener filter's
        evals = [r for r in rows if "eval/EMALoss" in r]
        assert [r["batch"] for r in evals] == list(range(3, batches + 1, 3))
        assert all(0.05 < r[f"eval/EMAvsLinear_{s}"] < 100 for r in evals for s in (0.4, 0.8))
    meta1 = json.load(open(s1 / "denoiser" / "denoiser_config.json"))
    assert meta1["mask_ratio"] == 0.75 and json.load(open(s2 / "denoiser" / "denoiser_config.json"))["mask_ratio"] == 0.0
    # sigma_data follows from the recorded statistics (normalize=center)
    assert meta1["sigma_data"] == pytest.approx(meta1["latent_stats"]["sigma_data"])
    assert any(f.startswith("events.out.tfevents") for _, _, fs in os.walk(s1 / "tensorboard") for f in fs)
    # Stage 2 starts from stage 1's weights with a fresh schedule: its first step has lr 0 (warmup from 0),
    # so its batch-1 weights are exactly stage 1's final weights; its optimizer/timestamp start fresh.
    w1 = model_state(s1 / "checkpoints" / "latest-rank0.pt")
    ck2 = torch.load(s2 / "checkpoints" / "ep0-ba1-rank0.pt", map_location="cpu", weights_only=False)
    nets = [k for k in w1 if k.startswith("train_step.net.")]
    assert nets and all(torch.equal(w1[k], ck2["state"]["model"][k]) for k in nets)
    assert read_jsonl(s2 / "metrics.jsonl")[0]["lr"] == 0.0


def test_ema_is_exported_differs_from_raw_and_is_what_is_sampled(two_stages):
    from trainer.data.loaders import LatentNormalizer
    from trainer.diffusion.sampler import edm_sampler
    from trainer.models.denoisers.interface import Prompt
    from trainer.pipeline.export import load_denoiser
    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.text_encoders import build_prompt_encoder
    from trainer.data.loaders import to_encoder_latents

    from .tiny import POEMS

    s1 = two_stages["s1"]
    final = model_state(s1 / "checkpoints" / "latest-rank0.pt")
    net, meta = load_denoiser(str(s1 / "denoiser"))
    exported = net.state_dict()
    for k, v in exported.items():
        assert torch.equal(v, final[f"ema.{k}"]), k                  # the export is the EMA
    differs = [k for k in exported if not torch.equal(exported[k], final[f"train_step.net.{k}"])]
    assert len(differs) > len(exported) // 2                         # and not the raw weights
    # The latents sampled at the last batch were sampled with exactly these weights, and the sampler, prompt
    # encoder and seed the job ran with (its YAML and overrides, loaded as the CLI loads them: guidance 4,
    # churn 40 there): equal tensor for tensor (one thread, as the job ran), so a guidance of 3 or the raw
    # weights fail here even where they decode to the same poems.
    cfg = _load(*two_stages["args1"])
    assert (cfg.sampler.guidance_scale, cfg.sampler.S_churn, cfg.sampler.num_steps) == (4.0, 40.0, 2)
    prompts = cfg.sample_prompts
    assert prompts == ["a sonnet about the sea", ""]
    prompt = Prompt(*build_prompt_encoder(cfg.prompt_encoder)(prompts))
    g = torch.Generator().manual_seed(cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = edm_sampler(net, torch.randn(2, 32, 64, generator=g), prompt, cfg.sampler, generator=g)
    finally:
        torch.set_num_threads(threads)
    assert sorted(os.listdir(two_stages["sampled"])) == ["batch-3.pt", "batch-6.pt"]
    torch.testing.assert_close(x, torch.load(two_stages["sampled"] / "batch-6.pt"), rtol=0, atol=0)
    # and the autoencoder reconstructs its corpus, so the logged poems are poems, not ""
    ae = LatentAutoencoder.from_pretrained(two_stages["ae"]).eval()
    poems = ae.decode(to_encoder_latents(x, LatentNormalizer(meta["latent_stats"], meta["normalize"]), "bart_perceiver"))
    assert all(p in POEMS for p in poems), poems
    text = open(s1 / "samples.txt").read()
    last = text.split("batch 6 | ")[1:]
    assert len(last) == 2 and [b.split("\n", 1)[1].rstrip("\n") for b in last] == poems
    assert "batch 3 | " in text and "sample at batch 3" in two_stages["r1"].stderr
    # the raw weights denoise differently from the EMA ones
    raw = type(net)(net.backbone.__class__(net.backbone.cfg, prompt_dim=384), sigma_data=net.sigma_data,
                    prompt_mean=copy.deepcopy(net.prompt_mean))
    raw.load_state_dict({k: final[f"train_step.net.{k}"] for k in exported})
    xs = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(raw(xs, torch.tensor(1.0), prompt).sample, net(xs, torch.tensor(1.0), prompt).sample)


# ---------------------------------------------------------------- kill and resume

RESUME = ["max_duration=12ba", "save_interval=2ba", "callbacks.sample_index_log={}"]   # 8 batches per epoch


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    r = run_cli("train", PRETRAIN, *base(shards, out, *RESUME))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_and_resumed(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("killed")
    before = stale_streaming_shm()
    # The whole process group dies (its own session, so pytest survives), Python's resource tracker
    # included: nothing is left to unlink streaming's shared memory, as when a node is lost.
    r = subprocess.run([sys.executable, "-m", "launch.cli", "train", PRETRAIN, *base(shards, out, *RESUME)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, start_new_session=True,
                       env=faults.env(KILL_AT_BATCH=5, KILL_GROUP=1))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    left = stale_streaming_shm() - before
    killed_log = read_jsonl(out / "sample_log-rank0.jsonl")
    r2 = run_cli("train", PRETRAIN, *base(shards, out, *RESUME))
    assert r2.returncode == 0, r2.stderr[-3000:]
    return {"out": out, "killed_log": killed_log, "left_shm": left, "r2": r2}


def test_kill_mid_epoch_then_resume_sees_each_sample_once_and_ends_with_the_same_weights(reference,
                                                                                         killed_and_resumed):
    out = killed_and_resumed["out"]
    assert [r["batch"] for r in killed_and_resumed["killed_log"]] == [1, 2, 3, 4, 5]
    log = read_jsonl(out / "sample_log-rank0.jsonl")
    assert [r["batch"] for r in log] == list(range(1, 13))           # batch 5 replayed once, not twice
    epoch0 = [i for r in log if r["epoch"] == 0 for i in r["sample_index"]]
    epoch1 = [i for r in log if r["epoch"] == 1 for i in r["sample_index"]]
    assert sorted(epoch0) == list(range(64))                         # every sample exactly once
    assert len(epoch1) == 32 and len(set(epoch1)) == 32
    assert log == read_jsonl(reference / "sample_log-rank0.jsonl")   # the same order as without the kill
    a, b = model_state(reference / "checkpoints" / "latest-rank0.pt"), model_state(out / "checkpoints" / "latest-rank0.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ after resume"
    from safetensors.torch import load_file

    ea, eb = load_file(reference / "denoiser" / "denoiser.safetensors"), load_file(out / "denoiser" / "denoiser.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)


def test_killed_at_five_random_batches_resumes_each_time_to_the_uninterrupted_weights(shards, reference, tmp_path):
    """One run SIGKILLed at 5 batches the test draws (seeded, the seed printed on failure; set
    LATENTVERSE_TEST_KILL_SEED to replay one), resumed after each kill from its last checkpoint: it ends
    with the uninterrupted run's weights, EMA and sample order."""
    import random

    seed = int(os.environ.get("LATENTVERSE_TEST_KILL_SEED") or random.SystemRandom().randrange(2**32))
    kills = sorted(random.Random(seed).sample(range(1, 13), 5))       # of 12 batches, checkpoints every 2
    why = f"kills at batches {kills} (LATENTVERSE_TEST_KILL_SEED={seed})"
    out = tmp_path / "kills"
    for k in kills:
        r = run_cli("train", PRETRAIN, *base(shards, out, *RESUME), env=faults.env(KILL_AT_BATCH=k))
        assert r.returncode == -signal.SIGKILL, f"{why}: the run at {k} was not killed\n{r.stderr[-3000:]}"
        link = out / "checkpoints" / "latest-rank0.pt"
        newest = os.path.basename(os.path.realpath(link)) if os.path.lexists(link) else None
        last = (k - 1) // 2 * 2                                        # killed before batch k's checkpoint
        assert (newest and re.match(rf"ep\d+-ba{last}-rank0\.pt$", newest)) or (last == 0 and newest is None), \
            f"{why}: after the kill at {k} the newest checkpoint is {newest}"
    r = run_cli("train", PRETRAIN, *base(shards, out, *RESUME))
    assert r.returncode == 0, f"{why}\n{r.stderr[-3000:]}"
    a, b = model_state(reference / "checkpoints" / "latest-rank0.pt"), model_state(out / "checkpoints" / "latest-rank0.pt")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], f"{why}: weights differ"
    assert read_jsonl(out / "sample_log-rank0.jsonl") == read_jsonl(reference / "sample_log-rank0.jsonl"), why


def test_stale_shared_memory_of_a_killed_run_is_removed_at_the_next_start(killed_and_resumed):
    left = killed_and_resumed["left_shm"]
    assert any(n.endswith("_locals") for n in left), "the SIGKILLed run should have left streaming shm behind"
    assert not (left & set(os.listdir("/dev/shm")))
    assert "stale shared-memory segments" in killed_and_resumed["r2"].stderr


def test_kill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(shards, reference, tmp_path):
    """SIGKILL inside Composer's own write of batch 4's checkpoint (torch.save has passed half its bytes
    to the file Composer opened): the resumed run starts from batch 2's and ends as the uninterrupted one."""
    out = tmp_path / "ckptkill"
    r = run_cli("train", PRETRAIN, *base(shards, out, *RESUME), env=faults.env(KILL_IN_CHECKPOINT=4))
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    ck = out / "checkpoints"
    half = ck / "ep0-ba4-rank0.pt"
    assert f"fault: SIGKILL inside the checkpoint write of {half}" in r.stderr, r.stderr[-3000:]
    full = (ck / "ep0-ba2-rank0.pt").stat().st_size
    assert 0 < half.stat().st_size < full and os.path.realpath(ck / "latest-rank0.pt").endswith("ep0-ba2-rank0.pt")
    with pytest.raises(Exception):
        torch.load(half, weights_only=False)                         # really half-written
    r2 = run_cli("train", PRETRAIN, *base(shards, out, *RESUME))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "half-written checkpoint" in r2.stderr
    assert [f for f in os.listdir(ck) if ".incomplete-" in f]       # set aside, not deleted
    a, b = model_state(reference / "checkpoints" / "latest-rank0.pt"), model_state(ck / "latest-rank0.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(out / "sample_log-rank0.jsonl") == read_jsonl(reference / "sample_log-rank0.jsonl")


def test_max_minutes_cuts_the_run_with_a_warning_naming_batch_and_budget(shards, tmp_path):
    """The safety net (never a budget: the YAMLs set none for real runs): a limit far below one batch's
    time stops the run after its first batch, on a WARNING that names the batch and the budget."""
    out = tmp_path / "cut"
    r = run_cli("train", PRETRAIN, *base(shards, out, "max_duration=12ba", "max_minutes=0.00001"))
    assert r.returncode == 0, r.stderr[-3000:]
    cut = [line for line in r.stderr.splitlines() if "CUT this run" in line]
    assert len(cut) == 1 and "WARNING" in cut[0], r.stderr[-3000:]
    assert re.search(r"max_minutes=1e-05 CUT this run at batch 1 of its 12ba budget: the model is not the one its "
                     r"YAML describes$", cut[0]), cut[0]
    assert json.load(open(out / "train_summary.json"))["batches"] == 1


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    out = tmp_path / "nan"
    r = run_cli("train", PRETRAIN, *base(shards, out, "max_duration=6ba", "save_interval=2ba"),
                env=faults.env(NAN_AT_BATCH=3))
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1].strip()
    assert re.match(r"train loss is nan at batch 3: stopping .*last good checkpoint: .*ep0-ba2-rank0\.pt$", last), last
    ck = out / "checkpoints"
    assert sorted(f for f in os.listdir(ck) if f.startswith("ep")) == ["ep0-ba2-rank0.pt"]
    state = model_state(ck / "latest-rank0.pt")
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "denoiser").exists()


# ---------------------------------------------------------------- bad input, refused before any work

def _load(*overrides, yaml=PRETRAIN):
    from launch.cli import load_config, load_job_module

    return load_config(load_job_module("train"), yaml, list(overrides))


def test_bad_yaml_is_refused_in_one_line(shards, tmp_path):
    from trainer.jobs.train_diffusion import check_data

    with pytest.raises(C.ConfigError, match=r"command line: mask_ratio: expected float"):
        _load("mask_ratio=lots")
    with pytest.raises(C.ConfigError, match=r"model.moe_dit.dimm: unknown key"):
        _load("model.moe_dit.dimm=3")
    with pytest.raises(C.ConfigError, match=r"mask_ratio must be in \[0, 1\)"):
        _load("mask_ratio=1.0")
    with pytest.raises(C.ConfigError, match=r"needs model.kind moe_dit"):
        _load("model.kind=sana")
    with pytest.raises(C.ConfigError, match=r"parallelism: expected one of"):
        _load("parallelism=fsdp1")
    with pytest.raises(C.ConfigError, match=r"command line: data.normalize: expected one of 'center', 'standardize', "
                                            r"'none', 'whiten', got 'whitten'"):
        _load("data.normalize=whitten")
    with pytest.raises(C.ConfigError, match=r"command line: whitening: floor must be in \(0, 1\), got 2.0"):
        _load("whitening.floor=2")
    with pytest.raises(C.ConfigError, match=r"load_path: path does not exist"):
        check_data(_load(*base(shards, tmp_path), f"load_path={tmp_path}/nothing.pt", yaml=FINETUNE))
    with pytest.raises(C.ConfigError, match=r"autoencoder: path does not exist"):
        check_data(_load(*base(shards, tmp_path), f"autoencoder={tmp_path}/no-ae"))
    with pytest.raises(C.ConfigError, match=r"data.path: no latent shards"):
        check_data(_load(f"data.path={tmp_path}", "autoencoder=", "data.root=", "data.streams=[]"))
    # The YAML's form streams under a root that holds no partitions (an encode run without partition_by)
    with pytest.raises(C.ConfigError, match=r"data.streams\[0\].path: no latent shards .*form=stanza"):
        check_data(_load(f"data.root={tmp_path}", "autoencoder="))
    with pytest.raises(C.ConfigError, match=r"model.prompt_dim: 16, but .* width \[384\]"):
        check_data(_load(*base(shards, tmp_path), "model.prompt_dim=16"))
    with pytest.raises(C.ConfigError, match=r"prompt_mean.enabled needs a prompt-conditioned model"):
        _load("prompt_mean.enabled=true", "model.prompt_dim=0")
    with pytest.raises(C.ConfigError, match=r"prompt_mean: ridges must be a non-empty list of values > 0"):
        _load("prompt_mean.ridges=[0.1, 0]")
    with pytest.raises(C.ConfigError, match=r"model expects latents \[16, 64\]"):
        check_data(_load(*base(shards, tmp_path), "model.latent_tokens=16"))
    bad = tmp_path / "stats.json"
    bad.write_text("{\n  \"channel_mean\": [1,\n")
    with pytest.raises(C.ConfigError, match=r"stats.json: line \d+: not valid JSON"):
        check_data(_load(*base(shards, tmp_path), f"data.stats_path={bad}"))
    # the CLI prints that one line and exits 2, no traceback
    r = run_cli("train", PRETRAIN, "optim.betas=[0.9]")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "command line: optim: betas must hold two values, got [0.9]"], r.stderr


def test_metrics_file_has_each_batch_once_after_resume(reference, killed_and_resumed):
    rows = [r for r in read_jsonl(killed_and_resumed["out"] / "metrics.jsonl") if "train/loss" in r]
    ref = [r for r in read_jsonl(reference / "metrics.jsonl") if "train/loss" in r]
    assert [r["batch"] for r in rows] == list(range(1, 13))
    assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in ref]   # the same draws, bit for bit


# ---------------------------------------------------------------- the prompt's mean latent

def test_prompt_mean_is_fitted_before_training_checkpointed_and_exported(tmp_path):
    from trainer.data.mds import LocalMDS
    from trainer.data.loaders import LatentNormalizer, load_latent_stats
    from trainer.pipeline.export import load_denoiser

    planted = write_latent_shards(tmp_path / "latents", n_train=96, n_val=32, prompt_dim=16, prompt_effect=1.0)
    out = tmp_path / "pm"
    r = run_cli("train", FINETUNE, *base(planted, out, "max_duration=2ba", "prompt_mean.enabled=true", "load_path=",
                                         "model.prompt_dim=16", "eval_batches=1", eval=True))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prompt_mean: ridge regression of 96 training latents" in r.stdout + r.stderr
    net, meta = load_denoiser(str(out / "denoiser"))
    assert meta["prompt_mean"] is True and net.prompt_mean is not None
    final = model_state(out / "checkpoints" / "latest-rank0.pt")
    for k, v in net.prompt_mean.state_dict().items():           # fixed: net, EMA and export hold the same
        assert torch.equal(v, final[f"ema.prompt_mean.{k}"]) and torch.equal(v, final[f"train_step.net.prompt_mean.{k}"])
    # It predicts the planted effect of held-out prompts on their (normalized) latents.
    ds = LocalMDS(planted["val"])
    rows = [ds[i] for i in range(len(ds))]
    norm = LatentNormalizer(load_latent_stats(os.path.join(planted["train"], "latent_stats.json")))
    lat = norm(torch.tensor(np.stack([r_["latent"] for r_ in rows]), dtype=torch.float32))
    m = net.prompt_mean(torch.tensor(np.stack([r_["prompt_pooled"] for r_ in rows]), dtype=torch.float32), len(rows))
    r2 = 1 - float((lat - m).pow(2).sum() / (lat - lat.mean(0)).pow(2).sum())
    assert r2 > 0.3, r2
    # Without a held-out split every 10th training sample chooses the ridge: a planted effect keeps a
    # small one, pure noise (the same shards without it) gets the largest.
    from trainer.jobs.train_diffusion import fit_prompt_mean

    pm, info = fit_prompt_mean(_load(*base(planted, out), "prompt_mean.enabled=true", "model.prompt_dim=16"), norm)
    assert info["n_train"] == 96 and info["n_val"] == 9 and info["ridge"] < 1.0 and info["r2_val"] > 0.2
    noise = write_latent_shards(tmp_path / "noise", n_train=96, n_val=8, prompt_dim=16)
    _, info = fit_prompt_mean(_load(*base(noise, out), "prompt_mean.enabled=true", "model.prompt_dim=16",
                                    "prompt_mean.ridges=[0.001, 0.1, 1000]"), norm)
    assert info["ridge"] == 1000 and info["n_val"] == 9
    # Without it the export says so and has none (exports without the key, as tests/tiny.py writes, load alike).
    r = run_cli("train", FINETUNE, *base(planted, tmp_path / "plain", "max_duration=1ba", "load_path=",
                                         "model.prompt_dim=16", "prompt_mean.enabled=false", eval=False))
    assert r.returncode == 0, r.stderr[-3000:]
    net, meta = load_denoiser(str(tmp_path / "plain" / "denoiser"))
    assert meta["prompt_mean"] is False and net.prompt_mean is None
    # A stage hand-over between the two is refused in one line.
    r = run_cli("train", FINETUNE, *base(planted, tmp_path / "mixed", "max_duration=1ba", "prompt_mean.enabled=true",
                                         "model.prompt_dim=16", f"load_path={tmp_path}/plain/checkpoints/latest-rank0.pt"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
        "was trained without prompt_mean, this run has prompt_mean.enabled=true: set it alike in both stages"), r.stderr[-2000:]


# ---------------------------------------------------------------- data.normalize=whiten

def test_whiten_is_fitted_in_stage1_reused_by_stage2_exported_and_generates(shards, reconstructing_ae, tmp_path):
    """Stage 1 fits the whitening and writes it beside its checkpoints and into its export; stage 2, on other
    latents, trains in stage 1's whitening (not one refitted to its data); the pipeline loads it and generates."""
    from trainer.data.mds import LocalMDS
    from trainer.data.whitening import WHITENING_FILE, Whitening
    from trainer.pipeline.export import load_denoiser
    from trainer.pipeline.pipeline import Pipeline

    s1, s2 = tmp_path / "pretrain", tmp_path / "finetune"
    gen = [f"autoencoder={reconstructing_ae}", "sampler.num_steps=2", "prompt_encoder.max_length=8", "data.normalize=whiten"]
    r1 = run_cli("train", PRETRAIN, *base(shards, s1, "max_duration=2ba", "eval_interval=2ba", "eval_batches=1", *gen,
                                          eval=True))
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert "whitening: mean and covariance of 64 training latents (2048 numbers each)" in r1.stdout + r1.stderr
    w1 = Whitening.load(str(s1 / "checkpoints" / WHITENING_FILE)).state()
    _, meta = load_denoiser(str(s1 / "denoiser"))
    assert meta["normalize"] == "whiten" and meta["sigma_data"] == 1.0
    assert all(torch.equal(v, w1[k]) for k, v in meta["whitening"].state().items())
    other = write_latent_shards(tmp_path / "other", n_train=48, n_val=8, prompt_dim=384, seed=7)
    r2 = run_cli("train", FINETUNE, *base(other, s2, "max_duration=1ba", f"load_path={s1}/checkpoints/latest-rank0.pt",
                                          *gen))
    assert r2.returncode == 0, r2.stderr[-3000:]
    w2 = Whitening.load(str(s2 / "checkpoints" / WHITENING_FILE)).state()
    assert all(torch.equal(v, w1[k]) for k, v in w2.items())
    assert f"whitening: the one of {s1}/checkpoints" in r2.stdout + r2.stderr
    ds = LocalMDS(other["train"])
    refit = Whitening.fit(torch.tensor(np.stack([ds[i]["latent"] for i in range(len(ds))]), dtype=torch.float32))
    assert not torch.allclose(refit.mean, w2["mean"], atol=1e-2)    # what a refit on stage 2's latents would be
    # the pipeline reads it from its own folder (denoiser/: the safetensors beside the net's) and generates
    pipe = Pipeline.from_pretrained(str(s2 / "pipeline"))
    assert all(torch.equal(v, w1[k]) for k, v in pipe.normalizer.whitening.state().items())
    poems = pipe(["a sonnet about the sea", ""], steps=2)
    assert len(poems) == 2 and all(isinstance(p, str) for p in poems)
    # a hand-over between whitened and centred training is refused in one line, before any work
    r3 = run_cli("train", FINETUNE, *base(shards, tmp_path / "mixed", "max_duration=1ba",
                                          f"load_path={s1}/checkpoints/latest-rank0.pt"))
    assert r3.returncode == 2 and r3.stderr.strip().splitlines()[-1].endswith(
        "was trained with data.normalize=whiten (whitening.safetensors beside it), this run has "
        "data.normalize=center: set it alike in both stages"), r3.stderr[-2000:]
