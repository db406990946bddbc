"""The diffusion job under FSDP2 with 2 CPU processes (gloo) through the Composer launcher: sharded
checkpoints, disjoint per-rank samples, the EMA gathered and exported by rank 0."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, free_port
from trainer.data.synthetic import write_latent_shards
from .test_train_diffusion import PRETRAIN, TINY, read_jsonl


@pytest.mark.slow
def test_two_process_fsdp2_run(tmp_path):
    shards = write_latent_shards(tmp_path / "latents", n_train=64, n_val=16, prompt_dim=384)
    out = tmp_path / "fsdp"
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    cmd = [composer, "-n", "2", "--master_port", str(free_port()), "--stdout", str(tmp_path / "out{rank}.txt"),
           "--stderr", str(tmp_path / "err{rank}.txt"), "-m", "launch.cli", "train", PRETRAIN,
           f"data.path={shards['train']}", f"data.eval_path={shards['val']}", f"out_dir={out}", *TINY,
           "max_duration=6ba", "save_interval=3ba", "eval_interval=6ba", "eval_batches=1", "callbacks.sample_index_log={}",
           "parallelism=fsdp2", "prompt_mean.enabled=true"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, LATENTVERSE_LOG_ALL_RANKS="1"))
    errs = "".join(open(p).read()[-2000:] for p in tmp_path.glob("err*.txt"))
    assert r.returncode == 0, errs + r.stderr[-2000:]
    ck = out / "checkpoints"
    for b in (3, 6):                                      # sharded: one DCP folder per checkpoint, both ranks' shards
        files = os.listdir(ck / f"ep0-ba{b}")
        assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2
    logs = [read_jsonl(out / f"sample_log-rank{r}.jsonl") for r in (0, 1)]
    ids = [[i for row in log for i in row["sample_index"]] for log in logs]
    assert [len(x) for x in ids] == [24, 24] and not set(ids[0]) & set(ids[1])   # 4 per rank per batch, disjoint
    assert len(set(ids[0]) | set(ids[1])) == 48
    summary = json.load(open(out / "train_summary.json"))
    assert summary["batches"] == 6 and summary["eval/EMALoss"] > 0
    from trainer.pipeline.export import load_denoiser

    net, meta = load_denoiser(str(out / "denoiser"))      # the full (gathered) EMA weights
    assert meta["weights"] == "ema" and sum(p.numel() for p in net.parameters()) > 10000
    # The prompt's mean latent, fitted on each rank from the same samples, is the same on both.
    assert meta["prompt_mean"] is True and float(net.prompt_mean.weight.abs().sum()) > 0
    logs = r.stdout + r.stderr + "".join(open(p).read() for p in tmp_path.glob("*.txt"))
    fits = [[line.split("prompt_mean: ", 1)[1].split(" in ")[0] + line.split(" s: ", 1)[1]
             for line in logs.splitlines() if f"[rank {rank}]" in line and "prompt_mean: ridge" in line] for rank in (0, 1)]
    assert len(fits[0]) == 1 and fits[0] == fits[1], fits
    assert "2 rank(s), parallelism=fsdp2" in r.stdout + r.stderr
