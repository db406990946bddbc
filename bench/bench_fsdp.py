"""FSDP2 per block vs DDP on 4 CPU ranks (gloo), all figures from one run of this file, in two passes.

Each configuration trains the same MoE DiT with the job's own parts (DiffusionComposerModel, the job's
AdamW + schedule + clipping, the EMA callback, Composer's Trainer; FSDP2 through
trainer/training/parallelize.py) in 4 processes, fp32 (CPU). In every process the benchmark wraps
torch.distributed's all-gather / reduce-scatter / all-reduce functions, so bytes and calls are counted
from the collectives actually issued during the measured steps:

    bytes all-gathered + reduce-scattered per step per rank, counted as each collective's full (unsharded)
    tensor, ÷ the ideal for this model: every parameter gathered once for the forward, once more for the
    backward where its unit reshards after forward, and its gradient reduce-scattered once, unpadded
    collectives per step (all kinds, including the gradient-norm all-reduce of clipping)
    peak memory per rank: the process's peak resident set (VmHWM) during the measured steps above its
    resident set before the model was built (after dist init and the imports). Before the first
    measured step, freed heap is returned to the OS (malloc_trim) and VmHWM is reset to the current RSS
    (/proc/self/clear_refs 5), and glibc maps every tensor above 64 KiB on its own (MALLOC_MMAP_THRESHOLD_,
    one arena), so freed tensors leave the RSS: the full model every rank builds before sharding, freed once
    `fully_shard` has copied its shard, does not count: what counts is what the steps keep and use,
    weights, gradients, AdamW's two moments, the EMA, the gathered units and the activations. FSDP2 ÷ DDP
    step time (median of the measured steps), FSDP2 ÷ DDP

The allocator setting the memory figure needs makes every FSDP2 gather buffer a fresh mapping and so
slows FSDP2's step (2.44 x DDP with it, 1.18 without, on 2026-12-03), while the default allocator keeps
the freed full model in its heap (FSDP2 ÷ DDP RSS 0.83, meaningless). So each mode runs twice: a timing
pass with glibc's default allocator (step time, bytes, collectives, the hybrid cross-group ratio) and a
memory pass with the setting above and fewer steps (peak RSS); each row says which pass measured it.

and the same for hybrid sharding (2 shard groups of 2 ranks, as 2 nodes of 2 GPUs would be), whose
gradient all-reduce across the groups is counted on its own: bytes all-reduced per step per rank ÷ each
rank's shard of the fp32 gradients (the cross-group traffic; ~1.0 when every unit's shard crosses once).
Sized to run in a few minutes on 2 cores: the figures are ratios taken side by side, not absolute speeds.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANKS, PER_RANK = 4, 4
# pass -> (measured steps, warm-up steps, the rank processes' allocator environment)
PASSES = {"timing": (8, 3, {}),
          "memory": (3, 2, {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"})}
MODEL = dict(dim=256, depth=6, head_dim=64, patch_mixer_depth=2, num_experts=8, expert_capacity=2.0)
KINDS = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single", "reduce_scatter_tensor", "all_reduce")


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _count_collectives(counter: dict):
    """Wrap torch.distributed's collectives in this process: counter[kind] = [calls, bytes] while counting."""
    import torch.distributed as dist

    def wrap(kind):
        fn = getattr(dist, kind)

        def counted(*args, **kwargs):
            if counter.get("on"):
                names = {"all_gather_single": "output_tensor", "all_gather_into_tensor": "output_tensor",
                         "reduce_scatter_single": "input", "reduce_scatter_tensor": "input", "all_reduce": "tensor"}
                full = kwargs.get(names[kind])
                if full is None:   # output/input is the full tensor: positional 0 for gathers, 1 for scatters
                    full = args[1] if kind.startswith("reduce_scatter") else args[0]
                c = counter.setdefault(kind, [0, 0])
                c[0] += 1
                c[1] += full.numel() * full.element_size()
            return fn(*args, **kwargs)
        setattr(dist, kind, counted)

    for kind in KINDS:
        if hasattr(dist, kind):
            wrap(kind)


def setup_rank(rank: int, port: int, world: int):
    """This process as rank `rank` of `world` on 127.0.0.1 (gloo on CPU), one thread; returns the device."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    sys.path.insert(0, ROOT)
    import torch
    from composer.utils import dist, get_device

    torch.set_num_threads(1)
    device = get_device(None)
    dist.initialize_dist(device)
    return device


def build_model(model_kw: dict):
    """The job's DiffusionComposerModel around a MoE DiT, the same weights on every rank."""
    import torch

    from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
    from trainer.models.denoisers import DenoiserConfig, build_denoiser
    from trainer.models.denoisers.moe_dit import MoEDiTConfig
    from trainer.training.diffusion_model import DiffusionComposerModel

    torch.manual_seed(0)
    net = EDMPrecond(build_denoiser(DenoiserConfig(prompt_dim=384, moe_dit=MoEDiTConfig(**model_kw))), sigma_data=0.5)
    return DiffusionComposerModel(net, EDMLoss(EDMConfig(seed=1)), mask_ratio=0.75, cfg_dropout=0.1)


def build_trainer(model, mode: str, steps: int, per_rank: int, callbacks=(), lr: float = 1e-4, shard_size: int = 2,
                  precision: str = "fp32", bf16_on_cpu: bool = False):
    """Composer's Trainer over `model` with the job's optimizer, schedule, clipping and EMA, `steps` batches of
    `per_rank` synthetic samples per rank (the same global batches whatever the mode): mode ddp, fsdp2 (per
    block, trainer/training/parallelize.py) or hybrid (shard groups of `shard_size` ranks, replicated).
    `precision` is Composer's (amp_bf16 on GPUs); `bf16_on_cpu` the job's bf16 on CPU (bench/gpu_check.py)."""
    import torch
    from composer import Trainer
    from composer.utils import dist
    from torch.utils.data import DataLoader

    from trainer.training import callbacks as cb
    from trainer.training.job import OptimConfig, optimizer_and_schedule
    from trainer.training.parallelize import FSDPConfig, parallelize_diffusion

    g = torch.Generator().manual_seed(0)
    n = dist.get_world_size() * per_rank * steps
    data = [{"latent": torch.randn(32, 64, generator=g), "prompt_emb": torch.randn(16, 384, generator=g),
             "prompt_mask": torch.arange(16) < 10, "prompt_pooled": torch.randn(384, generator=g), "sample_index": i}
            for i in range(n)]
    loader = DataLoader(data, batch_size=per_rank, sampler=dist.get_sampler(data, shuffle=False))
    callbacks = [cb.EMACallback(model, 0.999, 0), *callbacks]
    parallelism = None
    if mode != "ddp":
        cfg = FSDPConfig(hybrid=mode == "hybrid", shard_size=shard_size)
        parallelism, after = parallelize_diffusion(model, cfg, dist.get_world_size(), bf16_on_cpu=bf16_on_cpu)
        callbacks += after
    opt, schedule, clip = optimizer_and_schedule(model.net.parameters(), OptimConfig(lr=lr, warmup="0ba"))
    return Trainer(model=model, train_dataloader=loader, max_duration=f"{steps}ba", optimizers=opt,
                   schedulers=schedule, algorithms=clip, precision=precision, parallelism_config=parallelism,
                   callbacks=callbacks, progress_bar=False, log_to_console=False, seed=17)


def _rank(rank: int, port: int, mode: str, steps: int, warmup: int, out: str) -> None:
    setup_rank(rank, port, RANKS)
    from composer.core import Callback, Event

    from trainer.training.parallelize import fsdp_units

    counter: dict = {}
    _count_collectives(counter)
    base_kb = _rss_kb("VmRSS")
    model = build_model(MODEL)
    units = fsdp_units(model.net)
    params = sum(p.numel() for p in model.net.parameters())
    resharded = sum(p.numel() for u in units[:-1] for p in u.parameters())   # the last block keeps its weights
    times: list[float] = []

    class Steps(Callback):
        def run_event(self, event, state, logger):
            step = int(state.timestamp.batch)
            if event == Event.BATCH_START and step == warmup:
                import ctypes

                ctypes.CDLL("libc.so.6").malloc_trim(0)          # freed heap back to the OS
                with open("/proc/self/clear_refs", "w") as f:    # VmHWM := the current RSS
                    f.write("5")
            if event == Event.BATCH_START and step >= warmup:
                counter["on"], counter["t0"] = True, time.perf_counter()
            elif event == Event.BATCH_END and counter.get("on"):
                counter["on"] = False
                times.append(time.perf_counter() - counter["t0"])

    trainer = build_trainer(model, mode, steps + warmup, PER_RANK, [Steps()])
    trainer.fit()
    peak_kb = _rss_kb("VmHWM")
    measured = len(times)
    res = {"mode": mode, "rank": rank, "params": params, "resharded": resharded,
           "step_s": statistics.median(times), "peak_rss_mb": (peak_kb - base_kb) / 1024,
           **{k: [v[0] / measured, v[1] / measured] for k, v in counter.items() if k in KINDS}}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    trainer.close()


def _run(mode: str, pass_: str, out: str) -> list[dict]:
    """The 4 rank processes of `mode` in pass `pass_` (PASSES); each rank's figures."""
    import socket

    import torch.multiprocessing as mp

    steps, warmup, malloc = PASSES[pass_]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(out, f"{pass_}-{mode}")
    os.makedirs(out)
    t = time.time()
    # The memory pass's glibc: tensors above 64 KiB get their own mapping, returned to the OS when freed (a
    # fixed threshold; glibc's default raises it up to 32 MiB after the first frees, and the freed tensors
    # then stay in the heap), and one arena, so RSS follows the live tensors. The timing pass: the default.
    saved = {k: os.environ.pop(k, None) for k in PASSES["memory"][2]}
    os.environ.update(malloc)
    try:
        mp.start_processes(_rank, args=(port, mode, steps, warmup, out), nprocs=RANKS, join=True,
                           start_method="spawn")
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v
    rows = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(RANKS)]
    print(f"  {pass_} pass, {mode}: {time.time() - t:.0f} s; rank 0: {rows[0]}", flush=True)
    return rows


def _figures(rows: list[dict], shard: int) -> dict:
    r0 = rows[0]
    ag = sum(r0.get(k, [0, 0])[1] for k in ("all_gather_single", "all_gather_into_tensor"))
    rs = sum(r0.get(k, [0, 0])[1] for k in ("reduce_scatter_single", "reduce_scatter_tensor"))
    ideal = 4 * (2 * r0["params"] + r0["resharded"])     # fp32: forward AG + backward AG (resharded) + RS
    calls = sum(r0.get(k, [0, 0])[0] for k in KINDS)
    return {"bytes_ratio": (ag + rs) / ideal, "calls": calls, "ag_rs_mb": (ag + rs) / 2 ** 20,
            "peak_mb": max(r["peak_rss_mb"] for r in rows), "step_s": statistics.median(r["step_s"] for r in rows),
            "all_reduce_mb": r0.get("all_reduce", [0, 0])[1] / 2 ** 20,
            "all_reduce_ratio": r0.get("all_reduce", [0, 0])[1] / (4 * r0["params"] / shard)}


def main() -> list[dict]:
    t = time.time()
    with tempfile.TemporaryDirectory() as out:
        runs = {(p, m): _run(m, p, out) for p in PASSES for m in ("ddp", "fsdp2", "hybrid")}
    d, f, h = (_figures(runs["timing", m], s) for m, s in (("ddp", RANKS), ("fsdp2", RANKS), ("hybrid", 2)))
    dm, fm, hm = (_figures(runs["memory", m], s) for m, s in (("ddp", RANKS), ("fsdp2", RANKS), ("hybrid", 2)))
    print(f"  params {runs['timing', 'fsdp2'][0]['params'] / 1e6:.2f}M; timing pass, per step per rank: FSDP2 "
          f"{f['ag_rs_mb']:.1f} MB all-gathered + reduce-scattered in {f['calls']:.0f} collectives; hybrid "
          f"{h['ag_rs_mb']:.1f} MB + {h['all_reduce_mb']:.1f} MB all-reduced in {h['calls']:.0f} (DDP's bucketed "
          f"all-reduce runs in its C++ reducer, uncounted); step DDP {d['step_s'] * 1e3:.0f} ms, FSDP2 "
          f"{f['step_s'] * 1e3:.0f} ms, hybrid {h['step_s'] * 1e3:.0f} ms (memory pass: {dm['step_s'] * 1e3:.0f}, "
          f"{fm['step_s'] * 1e3:.0f}, {hm['step_s'] * 1e3:.0f} ms); memory pass, peak RSS above start DDP "
          f"{dm['peak_mb']:.0f} MB, FSDP2 {fm['peak_mb']:.0f} MB, hybrid {hm['peak_mb']:.0f} MB (timing pass: "
          f"{d['peak_mb']:.0f}, {f['peak_mb']:.0f}, {h['peak_mb']:.0f} MB); both passes {time.time() - t:.0f} s")
    timing, memory = "timing pass, default allocator", "memory pass, MALLOC_MMAP_THRESHOLD_=65536, one arena"
    rows = [
        {"benchmark": f"FSDP2 per block, 4 ranks: bytes all-gathered + reduce-scattered per step per rank / ideal "
                      f"({timing})", "ratio": f["bytes_ratio"], "goal": "<= 1.1"},
        {"benchmark": f"FSDP2 per block, 4 ranks: collectives per step ({timing})", "ratio": f["calls"],
         "goal": "reported"},
        {"benchmark": f"peak RSS per rank, FSDP2 / DDP (4 ranks; {memory})", "ratio": fm["peak_mb"] / dm["peak_mb"],
         "goal": "<= 0.6"},
        {"benchmark": f"step time, FSDP2 / DDP (4 CPU ranks, gloo; {timing})", "ratio": f["step_s"] / d["step_s"],
         "goal": "reported"},
        {"benchmark": f"hybrid (2 shard groups of 2): step time / DDP ({timing})", "ratio": h["step_s"] / d["step_s"],
         "goal": "reported"},
        {"benchmark": f"hybrid (2 x 2): bytes all-gathered + reduce-scattered in the group per step per rank / ideal "
                      f"({timing})", "ratio": h["bytes_ratio"], "goal": "<= 1.1"},
        {"benchmark": f"hybrid (2 x 2): bytes all-reduced across groups per step per rank / its gradient shard "
                      f"({timing})", "ratio": h["all_reduce_ratio"], "goal": "~1 (0 = not hybrid)"},
        {"benchmark": f"peak RSS per rank, hybrid (2 x 2) / DDP (4 ranks; {memory})",
         "ratio": hm["peak_mb"] / dm["peak_mb"], "goal": "reported"},
    ]
    for r in rows:
        r["command"] = "python -m bench fsdp"
        print(f"{r['benchmark']}: {r['ratio']:.3f} (goal {r['goal']})")
    return rows


if __name__ == "__main__":
    main()
