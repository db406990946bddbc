"""One fix to Composer 0.32.1 that a multi-node run needs, applied by the training skeleton.

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
