"""The `compute:` block of a run YAML: where and how many processes run one job.

The dataclass holds every default; `check` refuses what cannot run, one line naming the key:

    runs/x.yaml: compute.partition: the slurm backend needs a partition
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from trainer.base.config import ConfigError

BACKENDS = ("local", "composer", "torchrun", "slurm", "deepspeed")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass
class ComputeConfig:
    # local: the Composer launcher on this machine; composer: one Composer launcher per node;
    # torchrun: one torchrun per node with c10d rendezvous; slurm: an sbatch script;
    # deepspeed: a hostfile and the DeepSpeed launcher.
    backend: Literal["local", "composer", "torchrun", "slurm", "deepspeed"] = "local"
    nodes: int = 1
    gpus: int = 0                              # GPUs per node (0 = CPU only, gloo)
    procs_per_node: Optional[int] = None       # default: gpus, or 1 on CPU
    # Node host names, node rank order; hosts[0] is the master. Loopback names run on this machine,
    # others through ssh. Needed to start several nodes from here (composer, torchrun, deepspeed).
    hosts: list[str] = dataclasses.field(default_factory=list)
    master_addr: Optional[str] = None          # default: hosts[0], or 127.0.0.1 on one node
    master_port: Optional[int] = None          # default: a port free on the master, found at launch time
    # Exported to every process, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, TORCH_NCCL_* settings.
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Seconds a collective may wait for the other ranks before the job fails (None: Composer's 300 s);
    # raise it when rank 0 alone does long work between collectives (e.g. a merge or an export).
    dist_timeout: Optional[float] = None
    venv: Optional[str] = None                 # virtualenv whose bin/ holds python and the launchers
    container: Optional[str] = None            # container image (slurm: pyxis --container-image)
    container_mounts: list[str] = dataclasses.field(default_factory=list)  # slurm: src:dst
    # Scheduler (slurm).
    job_name: Optional[str] = None             # default: latentverse-<job>
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None                 # time limit, e.g. "24:00:00"
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None                  # per node, e.g. "0" (all) or "500G"
    sbatch_args: list[str] = dataclasses.field(default_factory=list)  # more #SBATCH flags, verbatim
    # Preemption and failure (slurm): USR1 to the batch script this many seconds before the time limit
    # (0: none); the training job then checkpoints at the next batch and the script requeues the job.
    # requeue: a job whose node fails is requeued by Slurm (and the script may requeue itself); either
    # way it resumes from its last complete checkpoint (autoresume), and dependent jobs keep waiting.
    signal_before_s: int = 300
    requeue: bool = True
    launch_dir: Optional[str] = None           # default: <job out_dir>/launch (job.yaml, scripts, logs)

    @property
    def nproc(self) -> int:
        """Processes per node."""
        if self.procs_per_node is not None:
            return self.procs_per_node
        return max(self.gpus, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc

    def master(self) -> str:
        if self.master_addr:
            return self.master_addr
        if self.hosts:
            return self.hosts[0]
        return "127.0.0.1"


def check(cc: ComputeConfig, source: str, cli_keys: set[str] = frozenset(), node_rank: int | None = None) -> None:
    """Refuse a compute block that cannot run, one line naming the key (and where it was set)."""

    def fail(key: str, msg: str):
        src = "command line" if f"compute.{key}" in cli_keys else source
        raise ConfigError(f"{src}: compute.{key}: {msg}")

    if cc.nodes < 1:
        fail("nodes", f"must be at least 1, got {cc.nodes}")
    if cc.gpus < 0:
        fail("gpus", f"must be 0 (CPU) or more, got {cc.gpus}")
    if cc.procs_per_node is not None and cc.procs_per_node < 1:
        fail("procs_per_node", f"must be at least 1, got {cc.procs_per_node}")
    if cc.master_port is not None and not 0 < cc.master_port < 65536:
        fail("master_port", f"must be a TCP port 1..65535, got {cc.master_port}")
    if cc.dist_timeout is not None and not cc.dist_timeout > 0:
        fail("dist_timeout", f"must be a number of seconds > 0, got {cc.dist_timeout}")
    if cc.hosts and len(cc.hosts) != cc.nodes:
        fail("hosts", f"lists {len(cc.hosts)} hosts for {cc.nodes} nodes")
    for k in cc.env:
        if not k.replace("_", "a").isalnum() or k[0].isdigit():
            fail(f"env.{k}", "not a valid environment variable name")
    if cc.backend == "local" and cc.nodes != 1:
        fail("nodes", f"the local backend runs on this machine only (1 node), got {cc.nodes}; "
                      "use backend composer, torchrun, slurm or deepspeed")
    if cc.backend == "slurm":
        if not cc.partition:
            fail("partition", "the slurm backend needs a partition")
        if cc.hosts:
            fail("hosts", "slurm picks the nodes; remove hosts")
    elif cc.container or cc.container_mounts:
        fail("container", f"only the slurm backend starts containers (pyxis); with {cc.backend}, "
                          "run `latentverse launch` inside the container instead")
    if cc.backend in ("composer", "torchrun") and cc.nodes > 1:
        if node_rank is None and not cc.hosts:
            fail("hosts", f"{cc.nodes} nodes: list the {cc.nodes} hosts to start them from here, "
                          "or start each node with --node-rank R")
        if node_rank is not None and not cc.master_addr and not cc.hosts:
            fail("master_addr", "needed when each node is started with --node-rank")
        if node_rank is not None and cc.master_port is None:
            fail("master_port", "must be set when each node is started with --node-rank, so all nodes agree")
    if cc.backend == "deepspeed" and cc.nodes > 1 and not cc.hosts:
        fail("hosts", f"the deepspeed backend writes a hostfile: list the {cc.nodes} hosts")
    if node_rank is not None:
        if cc.backend not in ("composer", "torchrun"):
            raise ConfigError(f"command line: --node-rank: only for the composer and torchrun backends, "
                              f"not {cc.backend}")
        if not 0 <= node_rank < cc.nodes:
            raise ConfigError(f"command line: --node-rank: must be in 0..{cc.nodes - 1}, got {node_rank}")
