"""The scale model of docs/scaling.md: `python -m bench.scale_model [bytes_ratio] [hybrid_all_reduce_ratio]
[floor_s] [step_eff]` prints its tables.

FLOPs per sample are measured (torch's FlopCounterMode over a forward + backward of the full-size model,
built on the meta device: no memory, no time); bytes per step follow from the parameter counts of the
FSDP2 units and the benchmark's measured bytes ÷ ideal (`python -m bench fsdp`); a GPU's step time is
what one H200 measured (`python -m bench.gpu_check`, bench/gpu/h200_2026-12-04_timed.md): a floor the
step never goes below whatever the batch (the ~6,600 aten ops of an eager forward + backward dispatched
from Python),
and above it the share of peak a whole compute-bound step reaches; the link figures are the vendors'
(NVLink 4; 8 x 400 Gb/s NDR InfiniBand per node), taken at the bus bandwidth NCCL reaches in practice,
which is stated beside each.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 989e12          # H100 SXM dense bf16 FLOP/s
FLOOR = 0.115          # s: an eager bf16 step's floor on one H200 (stage 1: 114.5 ms at 256 per GPU, 124.5 at 1,024)
EFF = 0.20             # share of peak a compute-bound step reaches (stage 2, 1,024 per GPU: 237 ms, 19.9% MFU)
NVLINK = 360e9         # NCCL bus bandwidth within a node, bytes/s per GPU (of 450 GB/s per direction)
IB = 45e9              # NCCL bus bandwidth across nodes, bytes/s per GPU (400 Gb/s NDR = 50 GB/s per GPU)
YAMLS = {"stage 1 (pretrain_masked, mask 0.75)": ("yamls/diffusion/pretrain_masked.yaml", 0.75),
         "stage 2 (finetune_unmasked)": ("yamls/diffusion/finetune_unmasked.yaml", 0.0)}


def measure(yaml: str, mask: float):
    import torch

    from trainer.base import config as C
    from trainer.diffusion.edm import EDMPrecond
    from trainer.jobs.train_diffusion import DiffusionTrainConfig
    from trainer.models.denoisers import build_denoiser
    from trainer.training.diffusion_model import measure_flops_per_sample
    from trainer.training.parallelize import fsdp_units

    cfg = C.load(DiffusionTrainConfig, os.path.join(ROOT, yaml), [])
    with torch.device("meta"):                       # the prompt's 32 positions, as the model always takes them
        net = EDMPrecond(build_denoiser(cfg.model))
        flops = measure_flops_per_sample(net, (cfg.model.latent_tokens, cfg.model.latent_dim),
                                         (32, cfg.model.prompt_dim), mask, batch=8)
    units = fsdp_units(net)
    P = sum(p.numel() for p in net.parameters())
    resharded = sum(p.numel() for u in units[:-1] for p in u.parameters())
    largest = max(sum(p.numel() for p in u.parameters()) for u in units)
    return cfg, flops, P, resharded, largest


def step(kind: str, nodes: int, flops_step_gpu: float, P: int, resharded: int, largest: int, ratio: float,
         ar_ratio: float = 1.0, floor: float = FLOOR, eff: float = EFF):
    """(step seconds, compute seconds, communication seconds) for one GPU of `nodes` x 8; `ratio` and
    `ar_ratio`: the benchmark's measured bytes ÷ ideal of the gathers + reduce-scatters and of hybrid's
    cross-group all-reduce. Hybrid on one node is plain FSDP2 (one shard group, nothing to replicate)."""
    world = 8 * nodes
    compute = max(floor, flops_step_gpu / (PEAK * eff))
    ag_rs = ratio * ((P + resharded) * 2 + P * 4)      # bf16 gathers (forward + backward), fp32 reduce-scatter
    if kind == "DDP":                                   # fp32 gradients all-reduced: 2 (N-1)/N of them on the wire
        bw = NVLINK if nodes == 1 else IB
        comm = P * 4 * 2 * (world - 1) / world / bw
        exposed = 25e6 / bw                             # the last 25 MB bucket waits for the backward's end
    elif kind == "FSDP2" or nodes == 1:
        bw = NVLINK if nodes == 1 else IB
        comm = ag_rs * (world - 1) / world / bw
        exposed = largest * (2 + 4) * (world - 1) / world / bw   # the first gather, the last reduce-scatter
    else:                                               # hybrid: shard over the node's 8, all-reduce shards over nodes
        comm = ag_rs * 7 / 8 / NVLINK + ar_ratio * P / 8 * 4 * 2 * (nodes - 1) / nodes / IB
        exposed = largest * 6 * 7 / 8 / NVLINK + largest / 8 * 4 * 2 * (nodes - 1) / nodes / IB
    return max(compute, comm) + exposed, compute, comm


def main(ratio: float = 1.0, ar_ratio: float = 1.0, floor: float = FLOOR, eff: float = EFF) -> None:
    sys.path.insert(0, ROOT)
    for name, (yaml, mask) in YAMLS.items():
        cfg, flops, P, resharded, largest = measure(yaml, mask)
        print(f"\n{name}: {P / 1e6:.1f}M parameters, {flops / 1e9:.2f} GFLOP per sample (forward + backward), "
              f"global batch {cfg.batch_size}, {cfg.max_duration}; a GPU leaves the {floor * 1e3:.0f} ms floor "
              f"above {floor * PEAK * eff / flops:,.0f} samples per step")
        print("| GPUs | parallelism | compute ms | communication ms | step ms | samples/s | MFU |")
        print("|---|---|---|---|---|---|---|")
        for nodes in (1, 4):
            for kind in ("DDP", "FSDP2", "hybrid"):
                per_gpu = cfg.batch_size / (8 * nodes)
                t, c, m = step(kind, nodes, per_gpu * flops, P, resharded, largest, ratio, ar_ratio, floor, eff)
                mfu = cfg.batch_size * flops / t / (8 * nodes * PEAK)
                name = "hybrid (= FSDP2: one group)" if kind == "hybrid" and nodes == 1 else kind
                print(f"| {nodes} x 8 | {name} | {c * 1e3:.1f} | {m * 1e3:.1f} | {t * 1e3:.1f} | "
                      f"{cfg.batch_size / t:,.0f} | {mfu:.1%} |")


if __name__ == "__main__":
    main(*(float(a) for a in sys.argv[1:5]))
