"""The per-process entry under torchrun and DeepSpeed: `python -m launch.worker JOB JOB.yaml [key=value ...]`.

Composer reads RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and NODE_RANK, and once
torch.distributed is up it refuses to run when one is missing (MissingEnvironmentError).
torchrun names the node rank GROUP_RANK; the DeepSpeed launcher names it CROSS_RANK and the local
world size LOCAL_SIZE. This fills Composer's names from theirs, joins the process group, then runs
`latentverse JOB ...`.
The Composer launcher (local, composer, slurm backends) sets Composer's names itself.
"""
from __future__ import annotations

import os
import sys

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
    """Join the process group once, before the job runs.

    Under torchrun every init_process_group talks to the agent's store, where a group that was set
    up and destroyed earlier (streaming's clean_stale_shared_memory does that when nothing is up yet)
    leaves its peer addresses behind: a second group then dials closed ports. Composer's own
    initialize_dist in the job finds this group and reuses it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from composer.utils import dist, get_device

        dist.initialize_dist(get_device(None))


def main(argv: list[str] | None = None) -> int:
    bridge_env()
    init_process_group()
    from launch import cli

    return cli.main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
