"""Hybrid sharding (HSDP) on 4 CPU ranks (gloo), emulating 2 nodes of 2 ranks: the YAML's `fsdp.hybrid` reaches
`fully_shard` as a 2-D (replicate, shard) mesh, each parameter is sharded over the 2 ranks of its group only,
the shard groups all-reduce their gradient shards, and the weights end where DDP's and plain FSDP2's do."""
import os

import pytest
import torch

from .conftest import free_port

WORLD, STEPS, PER_RANK = 4, 3, 2
MODEL = dict(dim=64, depth=2, head_dim=32, patch_mixer_depth=1, num_experts=4, expert_capacity=2.0)


def _worker(rank: int, port: int, out: str) -> None:
    from bench.bench_fsdp import _count_collectives, build_model, build_trainer, setup_rank

    setup_rank(rank, port, WORLD)
    from composer.core import Callback
    from torch.distributed.tensor import DTensor

    counter: dict = {}
    _count_collectives(counter)

    class Count(Callback):            # the training steps' collectives only (not the set-up's)
        def batch_start(self, state, logger):
            counter["on"] = True

        def batch_end(self, state, logger):
            counter["on"] = False

    res = {}
    for mode in ("ddp", "fsdp2", "hybrid"):
        model = build_model(MODEL)
        full = {n: tuple(p.shape) for n, p in model.net.named_parameters()}
        trainer = build_trainer(model, mode, STEPS, PER_RANK, [Count()], lr=1e-3)
        counter.clear()
        trainer.fit()
        params = dict(model.net.named_parameters())
        res[mode] = {
            "weights": {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in params.items()},
            "local": {n: p.to_local().numel() if isinstance(p, DTensor) else p.numel() for n, p in params.items()},
            "mesh": [tuple(p.device_mesh.shape) for p in params.values() if isinstance(p, DTensor)][:1],
            "full": full, "all_reduce": counter.get("all_reduce", [0, 0]),
            "reduce_scatter": counter.get("reduce_scatter_single", [0, 0])}
        trainer.close()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.slow
def test_hybrid_shards_within_groups_replicates_across_and_trains_like_ddp(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ddp, fsdp, hybrid = (ranks[0][m] for m in ("ddp", "fsdp2", "hybrid"))
    assert fsdp["mesh"] == [(4,)] and hybrid["mesh"] == [(2, 2)], (fsdp["mesh"], hybrid["mesh"])
    # Rank 0's shard of every parameter: dim 0 split in 2 under hybrid, in 4 under FSDP2 (rounded up: the
    # position embedding's dim 0 is 1, held by the first rank of each group).
    numel = lambda shape, k: -(-shape[0] // k) * (torch.Size(shape).numel() // shape[0])
    for n, shape in hybrid["full"].items():
        assert hybrid["local"][n] == numel(shape, 2) and fsdp["local"][n] == numel(shape, 4), (n, shape, hybrid["local"][n])
    assert sum(hybrid["local"].values()) < 0.6 * sum(torch.Size(s).numel() for s in hybrid["full"].values())
    # Gradients: FSDP2 reduce-scatters; hybrid also all-reduces each 2-rank shard across the 2 groups, at
    # least every parameter's half (4 bytes each) per step; plain FSDP2 all-reduces only clipping's norm.
    params = sum(torch.Size(s).numel() for s in hybrid["full"].values())
    assert hybrid["all_reduce"][1] >= STEPS * 4 * params / 2 > 100 * fsdp["all_reduce"][1], (hybrid, fsdp["all_reduce"])
    assert hybrid["reduce_scatter"][0] > 0 and fsdp["reduce_scatter"][0] > 0
    # Same weights on every rank, and the same as DDP's. Tolerance 1e-4 of the distance moved: fp32 throughout,
    # the three differ only in the order of the gradient sums (all-reduce of 4, reduce-scatter of 4, reduce-
    # scatter of 2 then all-reduce of 2), ~1e-7 relative per sum; Adam divides by the gradients' own scale,
    # so relative errors stay relative. A missed or doubled reduction (a group not summed, a mean over the
    # wrong ranks) is a difference of order the step itself.
    start = {n: p.detach() for n, p in _start_weights().items()}
    gap = lambda a, b: torch.cat([(a[k] - b[k]).flatten() for k in a]).norm().item()
    moved = gap(ddp["weights"], start)
    for r in ranks[1:]:
        assert gap(r["hybrid"]["weights"], hybrid["weights"]) == 0.0
    gaps = {m: gap(x["weights"], ddp["weights"]) for m, x in (("fsdp2", fsdp), ("hybrid", hybrid))}
    print(f"moved {moved:.4g}; gap to DDP {gaps}")
    assert moved > 0.1 and all(g <= 1e-4 * moved for g in gaps.values()), (moved, gaps)


def _start_weights() -> dict:
    from bench.bench_fsdp import build_model

    return dict(build_model(MODEL).net.named_parameters())
