"""Fixes to Composer 0.32.1: one that a multi-node run needs, applied by the training skeleton, and two
that its W&B logger needs with the locked wandb (`wandb`, applied when a run logs to W&B).

Autoresume and checkpoint loading wait for a per-node "signal file" that each node's local rank 0
writes and then removes. `composer.utils.dist.get_node_signal_file_name` broadcasts rank 0's name
(`._signal_file_node0_<random>`) to every rank, so on a folder shared by several nodes every node's
local rank 0 writes and removes the same file: a node can pass its wait on another node's file, and
all but the first `os.remove` fail (the race of mosaicml/llm-foundry issue 1736). Here each node gets
its own file: rank 0's random name (still broadcast, so every rank of a node agrees) plus the node
rank of the caller. Composer calls the function through its module, so replacing it there is enough.
"""
from __future__ import annotations

from composer.utils import dist

_ORIGINAL = dist.get_node_signal_file_name


def node_signal_file_name(rng=None) -> str:
    """`._signal_file_node0_<random>_n<node rank>`: one file per node, the same on the ranks of a node."""
    return f"{_ORIGINAL(rng)}_n{dist.get_node_rank()}"


def apply() -> None:
    dist.get_node_signal_file_name = node_signal_file_name


def wandb() -> None:
    """Composer's WandBLogger with the locked wandb (0.31): it reads `wandb.run.get_url()`, which wandb
    removed for the `url` property, so the run class gets the method back as a reader of that property;
    and autoresume asks every logger for a checkpoint, which WandBLogger answers through wandb's online
    API (a key needed) even when the run is offline, so an offline run answers "not found" itself."""
    from composer.loggers import WandBLogger
    from wandb.sdk.wandb_run import Run

    if not hasattr(Run, "get_url"):
        Run.get_url = lambda run: run.url
    if not getattr(WandBLogger.download_file, "offline_fix", False):
        online = WandBLogger.download_file

        def download_file(self, remote_file_name, *args, **kwargs):
            import wandb as wb

            if wb.run is None or wb.run.offline or wb.run.disabled:
                raise FileNotFoundError(f"{remote_file_name}: a W&B run that is offline holds no files")
            return online(self, remote_file_name, *args, **kwargs)

        download_file.offline_fix = True
        WandBLogger.download_file = download_file
