"""FSDP2 for the diffusion model, all in one place (as torchtitan's `parallelize_*`): which modules are
units, when they give their gathered weights back, what is gathered ahead, in which dtypes, over which ranks.

Units (Composer's supported path: an `fsdp_wrap_fn` on each child of the ComposerModel, which Composer's
FSDP2 policy asks about every module below that child; the model code knows nothing of it):
    each patch-mixer block, each DiT block     one all-gather before its forward, one reduce-scatter of
                                               its gradients as soon as its backward is done, so both
                                               overlap the neighbouring blocks' compute
    the root (train_step / ema)                the rest: the embeddings (latent, noise level, prompt tokens,
                                               pooled prompt), position embedding, mask token, learned null
                                               prompt and final layer, ~2% of the weights. FSDP2 gathers
                                               the root first and keeps it until the backward ends, so
                                               the embeddings cost one collective each way per step, not
                                               one per module.
reshard_after_forward: True for the blocks (ZeRO-3: a block's weights are gathered again for its backward,
    which keeps one block unsharded at a time); False for the last block of the pass, whose backward starts
    right after its forward (torchtitan does the same).
Prefetch: `prefetch` units ahead, explicitly, forward and backward. FSDP2's implicit prefetch issues the next
    all-gather only when the CPU reaches that module's forward; the explicit one issues it when the current
    block starts, so a CPU-bound step (small blocks, many kernels) still overlaps communication.
Experts: stored flat, expert-major (trainer/models/denoisers/moe_dit.py), so FSDP2's dim-0 split
    divides the [E*dim, hidden] rows evenly: no rank is padded to a whole expert.
Mixed precision: parameters are gathered in bf16, gradients reduced in fp32 (GPUs under `precision:
    amp_bf16`; on CPU with `bf16_on_cpu`). FSDP2 would also cast every unit's floating inputs to bf16, making
    the residual stream bf16 where DDP under autocast keeps it fp32; that cast is turned off (below), so both
    compute under the same autocast and train the same numerics.
Hybrid (`hybrid: true`): a 2-D mesh (replicate x shard), built by Composer from the degrees MeshFSDP2Config
    gives it: shard within a node over NVLink, replicate across nodes, so only the gradient all-reduce of
    each shard group crosses InfiniBand (tests/test_fsdp_hybrid.py).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch import nn

from trainer.base.config import ConfigError
from trainer.base.log import get_logger

log = get_logger("train.parallelize")


@dataclasses.dataclass
class FSDPConfig:
    """The YAML's `fsdp:` section (with `parallelism: fsdp2`)."""
    reshard_after_forward: bool = True  # blocks give their gathered weights back after forward (the last never)
    prefetch: int = 1                   # units gathered ahead, forward and backward (0 = FSDP2's implicit order)
    hybrid: bool = False                # shard within a node, replicate across nodes (HSDP)
    shard_size: int = 0                 # ranks per shard group under hybrid; 0 = the ranks of one node

    def __post_init__(self):
        if self.prefetch < 0 or self.shard_size < 0:
            raise ValueError("fsdp.prefetch and fsdp.shard_size must be >= 0")


def fsdp_units(root: nn.Module) -> list[nn.Module]:
    """The block modules under `root` (an EDMPrecond) that become their own FSDP2 units, in forward order;
    [] for a backbone without blocks (then the root is the one unit)."""
    backbone = getattr(root, "backbone", root)
    return [*getattr(backbone, "patch_mixer", []), *getattr(backbone, "blocks", [])]


def _wrap_fn(units: list[nn.Module], keep_last: bool):
    last = units[-1] if units and keep_last else None

    def fsdp_wrap_fn(module: nn.Module):
        if module is last:
            return {"reshard_after_forward": False}
        return any(module is u for u in units)
    return fsdp_wrap_fn


@dataclasses.dataclass
class MeshFSDP2Config(FSDP2Config):
    """Composer builds the device mesh itself from two degrees (`State._create_device_mesh`, called in the
    Trainer) and overwrites any `device_mesh` it was given; FSDP2Config fixes them at (none, all ranks), so
    a mesh passed in never reached `fully_shard`. These two fields are the degrees Composer reads: with a
    replicate degree it makes the 2-D (replicate, shard) mesh and `fully_shard` gets both dimensions (HSDP)."""
    replicate: Optional[int] = None
    shard: int = -1

    @property
    def data_parallel_shard_degree(self) -> int:
        return self.shard

    @property
    def data_parallel_replicate_degree(self) -> Optional[int]:
        return self.replicate


def mesh_degrees(cfg: FSDPConfig, world: int, local_world: int) -> tuple[Optional[int], int]:
    """(replicate, shard) ranks: (None, world) for plain FSDP2; under hybrid, shard groups of `shard_size`
    ranks (default: one node's) replicated world // shard_size times (None when that is one group)."""
    if not cfg.hybrid:
        return None, world
    shard = cfg.shard_size or local_world
    if world % shard:
        raise ConfigError(f"fsdp.shard_size: {shard} does not divide the {world} ranks")
    if world == shard:
        log.info(f"fsdp.hybrid: one shard group of all {world} ranks, nothing to replicate: plain FSDP2")
        return None, world
    return world // shard, shard


def parallelize_diffusion(model, cfg: FSDPConfig, world: int, state_dict_type: str = "sharded",
                          bf16_on_cpu: bool = False) -> tuple[dict, list[Callback]]:
    """Mark the FSDP2 units of a DiffusionComposerModel; returns Composer's `parallelism_config` and the
    callback that sets prefetching and input dtypes once Composer has applied `fully_shard`."""
    for child, keep_last in ((model.train_step, True), (model.ema, False)):   # the EMA only runs forward (eval)
        child.fsdp_wrap_fn = _wrap_fn(fsdp_units(getattr(child, "net", child)), keep_last)
    extra = {}
    if bf16_on_cpu and not torch.cuda.is_available():   # Composer's precision stays fp32 on CPU
        extra["mixed_precision"] = {"param_dtype": "bf16", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    replicate, shard = mesh_degrees(cfg, world, dist.get_local_world_size())
    fsdp = MeshFSDP2Config(replicate=replicate, shard=shard, reshard_after_forward=cfg.reshard_after_forward,
                           state_dict_type=state_dict_type, **extra)
    return {"fsdp": fsdp}, [AfterSharding(model, cfg.prefetch)]


def keep_input_dtypes(module: nn.Module) -> None:
    """FSDP2 casts a unit's floating inputs to its param dtype (MixedPrecisionPolicy.cast_forward_inputs);
    Composer offers no switch for it, so it is turned off on the unit's FSDP state. Autocast then decides
    each op's dtype, as under DDP: bf16 matmuls, an fp32 residual stream, fp32 norms and softmax."""
    from torch.distributed.fsdp import fully_shard

    state = fully_shard.state(module)
    state._mp_policy = dataclasses.replace(state._mp_policy, cast_forward_inputs=False)


def set_prefetch(units: list[nn.Module], n: int) -> None:
    """Unit i gathers units i+1..i+n when its forward starts and i-1..i-n when its backward starts."""
    for i, u in enumerate(units):
        if n and i + 1 < len(units):
            u.set_modules_to_forward_prefetch(units[i + 1:i + 1 + n])
        if n and i > 0:
            u.set_modules_to_backward_prefetch(units[max(0, i - n):i][::-1])


class AfterSharding(Callback):
    """Runs once Composer has sharded the model (Event.AFTER_LOAD comes after the wrap): prefetch and dtypes."""

    def __init__(self, model, prefetch: int):
        self.model, self.prefetch = model, prefetch

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event != Event.AFTER_LOAD:
            return
        from torch.distributed.fsdp import FSDPModule

        for child in (self.model.train_step, self.model.ema):
            units = [u for u in fsdp_units(getattr(child, "net", child)) if isinstance(u, FSDPModule)]
            for m in [child, *units]:
                if isinstance(m, FSDPModule):
                    keep_input_dtypes(m)
            set_prefetch(units, self.prefetch)
            if child is self.model.train_step:
                log.info(f"FSDP2 units: {len(units) + 1} ({len(units)} blocks + the root), prefetch {self.prefetch}")


def sharding_summary(model) -> dict:
    """Units and parameters per unit of the trained net (for the log and the benchmark)."""
    units = fsdp_units(model.net)
    in_units = sum(p.numel() for u in units for p in u.parameters())
    total = sum(p.numel() for p in model.net.parameters())
    return {"units": len(units) + 1, "block_params": in_units, "root_params": total - in_units}


def autocast_dtype(bf16_on_cpu: bool) -> Optional[torch.dtype]:
    """The dtype the model autocasts to itself: bf16 on CPU when asked (Composer autocasts only on GPUs)."""
    return torch.bfloat16 if bf16_on_cpu and not torch.cuda.is_available() else None
