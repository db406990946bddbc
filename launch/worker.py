"""The per-process entry under every launcher: `python -m launch.worker JOB JOB.yaml [key=value ...]`.

Composer reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK, and once
torch.distributed is up it refuses to run when one is missing (MissingEnvironmentError).
torchrun names the node rank GROUP_RANK; the DeepSpeed launcher names it CROSS_RANK and the local
world size LOCAL_SIZE. This fills Composer's names from theirs, joins the process group, then runs
`latentverse JOB ...`. The Composer launcher (local, composer, slurm backends) sets Composer's names
itself.

The process group is joined here with the collective timeout the run YAML asks for
(`compute.dist_timeout`, handed over as LATENTVERSE_DIST_TIMEOUT seconds): the job's own
`initialize_dist` then finds the group up and keeps it, timeout included.
"""
from __future__ import annotations

import os
import sys

DIST_TIMEOUT_ENV = "LATENTVERSE_DIST_TIMEOUT"

# Composer's name <- the names other launchers use, first found wins.
ALIASES = {
    "NODE_RANK": ("GROUP_RANK", "CROSS_RANK"),
    "LOCAL_WORLD_SIZE": ("LOCAL_SIZE",),
}


def bridge_env(environ: dict | None = None) -> dict:
    """Set Composer's distributed variables from torchrun's / DeepSpeed's; returns what it set."""
    environ = os.environ if environ is None else environ
    added = {}
    for name, sources in ALIASES.items():
        if name in environ:
            continue
        for src in sources:
            if src in environ:
                environ[name] = added[name] = environ[src]
                break
    return added


def init_process_group() -> None:
    """Join the process group once, before the job runs, with the run YAML's collective timeout.

    Under torchrun every init_process_group talks to the agent's store, where a group that was set
    up and destroyed earlier (streaming's clean_stale_shared_memory does that when nothing is up yet)
    leaves its peer addresses behind: a second group then dials closed ports. Composer's own
    initialize_dist in the job finds this group and reuses it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as td
        from composer.utils import dist, get_device

        from trainer.base.log import get_logger

        timeout = float(os.environ.get(DIST_TIMEOUT_ENV) or 300.0)  # 300: Composer's default
        dist.initialize_dist(get_device(None), timeout)
        # The logs say what a hang ran under: the timeout read back from the group, the NCCL settings.
        nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_"))
        get_logger("launch").info(f"rank {td.get_rank()}: process group {td.get_backend()}, world size "
                                  f"{td.get_world_size()}, timeout {group_timeout_s():g} s" + (f"; {nccl}" if nccl else ""))


def group_timeout_s() -> float:
    """The default process group's collective timeout in seconds, as its backend holds it."""
    import torch
    import torch.distributed as td

    device = torch.device("cuda" if td.get_backend() == "nccl" else "cpu")
    return td.group.WORLD._get_backend(device).options._timeout.total_seconds()


def main(argv: list[str] | None = None) -> int:
    bridge_env()
    init_process_group()
    from launch import cli

    return cli.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
