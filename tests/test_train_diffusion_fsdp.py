"""The diffusion job under FSDP2 with 2 CPU processes (gloo) through the Composer launcher: sharded
checkpoints, disjoint per-rank samples, the EMA gathered and exported by rank 0; per-block units; bf16
with fp32 reductions training the same numerics under DDP and FSDP2."""
import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, free_port
from trainer.data.synthetic import write_latent_shards
from .test_train_diffusion import PRETRAIN, TINY, model_state, read_jsonl


def launch_2proc(tmp_path, name: str, *overrides: str, config: str = PRETRAIN, env=None, rc=0):
    """`composer -n 2 -m launch.cli train` on two CPU ranks (gloo), environment `env` (default: this one),
    expected to exit with `rc` (None: any); returns (process, out_dir, every rank's log)."""
    out = tmp_path / name
    composer = os.path.join(os.path.dirname(sys.executable), "composer")
    cmd = [composer, "-n", "2", "--master_port", str(free_port()), "--stdout", str(tmp_path / f"{name}-out{{rank}}.txt"),
           "--stderr", str(tmp_path / f"{name}-err{{rank}}.txt"), "-m", "launch.cli", "train", config,
           f"out_dir={out}", *TINY, *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, start_new_session=True,   # a fault's
                       env=dict(env or os.environ, LATENTVERSE_LOG_ALL_RANKS="1"))   # KILL_GROUP takes the launch down, not pytest
    logs = r.stdout + r.stderr + "".join(open(p).read() for p in sorted(tmp_path.glob(f"{name}-*.txt")))
    assert rc is None or r.returncode == rc, logs[-4000:]
    return r, out, logs


@pytest.mark.slow
def test_two_process_fsdp2_run(tmp_path):
    shards = write_latent_shards(tmp_path / "latents", n_train=64, n_val=16, prompt_dim=384)
    r, out, logs = launch_2proc(tmp_path, "fsdp", f"data.path={shards['train']}", f"data.eval_path={shards['val']}",
                                "max_duration=6ba", "save_interval=3ba", "eval_interval=6ba", "eval_batches=1",
                                "callbacks.sample_index_log={}", "parallelism=fsdp2", "prompt_mean.enabled=true")
    ck = out / "checkpoints"
    for b in (3, 6):                                      # sharded: one DCP folder per checkpoint, both ranks' shards
        files = os.listdir(ck / f"ep0-ba{b}")
        assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2
    sample_logs = [read_jsonl(out / f"sample_log-rank{r}.jsonl") for r in (0, 1)]
    ids = [[i for row in log for i in row["sample_index"]] for log in sample_logs]
    assert [len(x) for x in ids] == [24, 24] and not set(ids[0]) & set(ids[1])   # 4 per rank per batch, disjoint
    assert len(set(ids[0]) | set(ids[1])) == 48
    summary = json.load(open(out / "train_summary.json"))
    assert summary["batches"] == 6 and summary["eval/EMALoss"] > 0
    from trainer.pipeline.export import load_denoiser

    net, meta = load_denoiser(str(out / "denoiser"))      # the full (gathered) EMA weights
    assert meta["weights"] == "ema" and sum(p.numel() for p in net.parameters()) > 10000
    # The prompt's mean latent: rank 0 alone reads the samples and fits it, rank 1 receives the same module.
    assert meta["prompt_mean"] is True and float(net.prompt_mean.weight.abs().sum()) > 0
    rank_lines = lambda rank, key: [ln.split(key, 1)[1] for ln in logs.splitlines() if f"[rank {rank}]" in ln and key in ln]
    assert len(rank_lines(0, "prompt_mean: ridge")) == 1 and rank_lines(1, "prompt_mean: ridge") == [], logs[-3000:]
    held = [rank_lines(rank, "holds rank 0's fit") for rank in (0, 1)]
    assert len(held[0]) == 1 and held[0] == held[1], held
    assert "2 rank(s), parallelism=fsdp2" in logs
    # Rank 0 alone writes metrics.jsonl (each batch once, not once per rank) and the console metrics lines.
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["batch"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6], rows
    assert [r["batch"] for r in rows if "eval/EMALoss" in r] == [6], rows
    # (the launcher passes rank 0's output through and writes rank 1's to the --stdout/--stderr files)
    rank1 = "".join(open(tmp_path / f"fsdp-{s}1.txt").read() for s in ("out", "err"))
    console = [(r.stdout + r.stderr).count("[batch="), rank1.count("[batch=")]
    assert console[0] >= 6 and console[1] == 0, console


def last_weights(out) -> tuple[dict, dict]:
    """(trained net, EMA) of the run's final monolithic checkpoint, in fp32."""
    state = model_state(out / "checkpoints" / "latest-rank0.pt")
    pick = lambda prefix: {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    return pick("train_step.net."), pick("ema.")


@pytest.mark.slow
def test_bf16_ddp_and_fsdp2_train_the_same_numerics(tmp_path):
    """Same start, same batches, 4 AdamW steps of bf16 autocast with fp32 gradient reductions (FSDP2: bf16
    parameters gathered per block, fp32 reduce-scatter): DDP and FSDP2 end at the same weights.

    Tolerance, 1% of the distance the weights moved: both runs compute every matmul on the same
    bf16-rounded weights and activations with an fp32 residual stream; what may differ is the order of
    fp32 sums (all-reduce vs reduce-scatter) and that FSDP2 rounds the non-matmul parameters (position
    embedding, LayerNorm affine, mask token) to bf16 before use where DDP uses them in fp32: bf16 rounding,
    2^-9 relative, ~0.2% of each step. Adam's eps is raised to 1e-3 for this comparison: with the default
    1e-8 the first steps move every weight by +-lr whatever its gradient, so a rounding difference on a
    near-zero gradient flips a whole step and any two bf16 runs differ by O(lr) per weight. FSDP2's own
    cast of each unit's inputs to bf16 (a bf16 residual stream) gives ~2.6% here, and fails."""
    shards = write_latent_shards(tmp_path / "latents", n_train=32, n_val=8, prompt_dim=384)
    common = [f"data.path={shards['train']}", "data.eval_path=", "max_duration=4ba", "save_interval=4ba",
              "eval_interval=1000ba", "ema.decay=0.999999", "optim.warmup=0ba", "optim.lr=3.0e-3", "optim.eps=1.0e-3",
              "prompt_mean.enabled=false", "bf16_on_cpu=true", "fsdp_state_dict=full"]
    ddp, start = last_weights(launch_2proc(tmp_path, "ddp", *common, "parallelism=ddp")[1])   # EMA ~ the start
    _, out, logs = launch_2proc(tmp_path, "fsdp", *common, "parallelism=fsdp2")
    fsdp = last_weights(out)[0]
    assert "FSDP2 units: 4 (3 blocks + the root)" in logs
    gap = lambda a, b: torch.cat([(a[k] - b[k]).flatten() for k in a]).norm().item()
    moved, parallel_gap = gap(ddp, start), gap(fsdp, ddp)
    print(f"weights moved {moved:.4g}, DDP vs FSDP2 {parallel_gap:.4g}")
    assert moved > 0.05 and parallel_gap <= 0.01 * moved, (parallel_gap, moved)


@pytest.mark.parametrize("rank, all_ranks, want", [("0", "0", ["info", "warn"]), ("1", "0", ["warn"]),
                                                   ("1", "1", ["info", "warn"])])
def test_only_rank_0_logs_info_unless_all_ranks_are_asked_for(rank, all_ranks, want):
    """The job's logger as a rank's process sees it (RANK set by the launcher): rank 1 says only warnings,
    unless LATENTVERSE_LOG_ALL_RANKS=1 (which the 2-rank runs above set to see what reached rank 1)."""
    code = "from trainer.base.log import get_logger; g = get_logger('t'); g.info('info'); g.warning('warn')"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, RANK=rank, LATENTVERSE_LOG_ALL_RANKS=all_ranks))
    assert r.returncode == 0, r.stderr
    assert [ln.rsplit(": ", 1)[1] for ln in r.stderr.splitlines()] == want, r.stderr
    assert all(f"[rank {rank}] latentverse.t:" in ln for ln in r.stderr.splitlines())
