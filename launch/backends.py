"""Compute block -> what to write and what to run, one small function per backend.

Every backend returns a Plan: the files to write (job YAML, sbatch script, hostfile) and the
commands to start together on this machine (argv lists; ssh for remote hosts). `--dry-run` prints
exactly these, each command joined with shlex.join so every value is shell-quoted.

Every process runs `python -m launch.worker JOB JOB.yaml`: the worker joins the process group with
the run YAML's `compute.dist_timeout` (passed as LATENTVERSE_DIST_TIMEOUT beside `compute.env`, e.g.
NCCL_* settings) before the job's own code runs.

The master port, unless `compute.master_port` fixes it, is found free on the master itself: by the
batch step of the sbatch script on the allocation's first node (slurm), by asking the master over ssh
before anything starts (`port_probe`: composer, torchrun and deepspeed with a remote master), or
here when the master is this machine.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import sys

from launch.compute import LOOPBACK, ComputeConfig
from launch.worker import DIST_TIMEOUT_ENV
from trainer.base.schema import REQUEUE_EXIT, STOP_FILE_ENV

# Prints a port free on the machine it runs on (the master: see port_probe and slurm).
FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'


@dataclasses.dataclass
class NodeCommand:
    node_rank: int | None     # None: not one node's launcher (sbatch, deepspeed runner)
    argv: list[str]
    host: str | None = None   # the node it starts on, for logs and messages (None: this machine)


@dataclasses.dataclass
class Plan:
    backend: str
    files: dict[str, str]            # absolute path -> text, written before anything starts
    commands: list[NodeCommand]      # started together; commands[0] owns the terminal
    master: str
    port: int | str                  # str: found on the master node at run time (slurm), or --dry-run's placeholder
    job_yaml: str = ""               # this launch's job YAML (set by launch.launcher.build)


@dataclasses.dataclass
class Context:
    """What every backend needs besides the compute block."""
    job: str                  # latentverse JOB
    job_yaml: str             # absolute path of the job part, written by the launcher
    launch_dir: str           # absolute; job.yaml, scripts and logs go here
    cwd: str                  # absolute; every process runs here (relative paths in the job YAML)
    port: int | str           # master port: compute.master_port or one free on the master (str: --dry-run's
                              # placeholder for the port the master is asked for at launch)
    job_name: str
    node_rank: int | None = None  # start only this node (composer, torchrun)


def tool(cc: ComputeConfig, name: str) -> str:
    """A launcher executable: from the venv, bare inside a container, else next to this Python."""
    if cc.venv:
        return os.path.join(cc.venv, "bin", name)
    if cc.container:
        return name
    here = os.path.join(os.path.dirname(sys.executable), name)
    return here if os.path.exists(here) else name


def python(cc: ComputeConfig) -> str:
    """The Python the nodes run: the container's, the venv's, else this one (a shared file system)."""
    return "python3" if cc.container else tool(cc, "python") if cc.venv else sys.executable


def process_env(cc: ComputeConfig) -> dict[str, str]:
    """What every launched process gets in its environment: `compute.env` and the collective timeout."""
    env = dict(cc.env)
    if cc.dist_timeout is not None:
        env[DIST_TIMEOUT_ENV] = f"{cc.dist_timeout:g}"
    return env


def _with_env(cc: ComputeConfig, argv: list[str]) -> list[str]:
    env = process_env(cc)
    return ["env", *(f"{k}={v}" for k, v in env.items()), *argv] if env else argv


def _on_host(host: str | None, cwd: str, argv: list[str]) -> list[str]:
    """Run argv on host: directly when it is this machine, else via ssh in the same directory.

    `-tt` gives the remote command a terminal even though ours is not one: when the local ssh is
    stopped, the remote terminal hangs up and SIGHUP ends the remote launcher and its processes
    (without a terminal they would keep running, holding the GPUs and the master port).
    """
    if host is None or host in LOOPBACK:
        return argv
    return ["ssh", "-tt", host, f"cd {shlex.quote(cwd)} && {shlex.join(argv)}"]


def port_probe(cc: ComputeConfig) -> list[str] | None:
    """The command that prints a free port on the master when the master is another machine (run by
    the launcher before anything starts); None when the port is found here or in the sbatch script."""
    if cc.backend in ("local", "slurm") or cc.master_port is not None or cc.master() in LOOPBACK:
        return None
    return ["ssh", "-o", "BatchMode=yes", cc.master(), shlex.join([python(cc), "-c", FREE_PORT])]


def _composer_logs(ctx: Context) -> list[str]:
    # The launcher discards non-local-rank-0 output by default; keep it beside the job YAML.
    logs = os.path.join(ctx.launch_dir, "logs")
    return ["--stdout", os.path.join(logs, "rank{rank}.stdout.txt"),
            "--stderr", os.path.join(logs, "rank{rank}.stderr.txt")]


def _program(ctx: Context) -> list[str]:
    return ["-m", "launch.worker", ctx.job, ctx.job_yaml]


def local(cc: ComputeConfig, ctx: Context) -> Plan:
    argv = [tool(cc, "composer"), "-n", str(cc.nproc), "--master_port", str(ctx.port),
            *_composer_logs(ctx), *_program(ctx)]
    return Plan("local", {}, [NodeCommand(0, _with_env(cc, argv))], "127.0.0.1", ctx.port)


def _per_node(name: str, cc: ComputeConfig, ctx: Context, argv_of) -> Plan:
    """One launcher per node (every node, or the one `--node-rank` names); remote hosts through ssh."""
    master = cc.master()
    cmds = []
    for rank in range(cc.nodes):
        if ctx.node_rank is not None and rank != ctx.node_rank:
            continue
        host = cc.hosts[rank] if cc.hosts and ctx.node_rank is None else None
        cmds.append(NodeCommand(rank, _on_host(host, ctx.cwd, _with_env(cc, argv_of(rank, master))), host))
    return Plan(name, {}, cmds, master, ctx.port)


def composer(cc: ComputeConfig, ctx: Context) -> Plan:
    return _per_node("composer", cc, ctx, lambda rank, master: [
        tool(cc, "composer"), "--world_size", str(cc.world_size), "--nproc", str(cc.nproc), "--node_rank", str(rank),
        "--master_addr", master, "--master_port", str(ctx.port), *_composer_logs(ctx), *_program(ctx)])


def torchrun(cc: ComputeConfig, ctx: Context) -> Plan:
    # c10d rendezvous assigns node ranks itself; launch.worker hands them to Composer.
    return _per_node("torchrun", cc, ctx, lambda rank, master: [
        tool(cc, "torchrun"), "--nnodes", str(cc.nodes), "--nproc-per-node", str(cc.nproc), "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{master}:{ctx.port}", "--rdzv-id", ctx.job_name, *_program(ctx)])


def deepspeed(cc: ComputeConfig, ctx: Context) -> Plan:
    master = cc.master()
    hosts = cc.hosts or ["localhost"]
    hostfile = os.path.join(ctx.launch_dir, "hostfile")
    files = {hostfile: "".join(f"{h} slots={cc.nproc}\n" for h in hosts)}
    env = process_env(cc)
    if env:
        # The runner reaches remote nodes through pdsh, which passes on only the variables in this file.
        env_file = os.path.join(ctx.launch_dir, "deepspeed_env")
        files[env_file] = "".join(f"{k}={v}\n" for k, v in env.items())
        env = {"DS_ENV_FILE": env_file, **env}
    # --no_local_rank: the job's command line takes no --local_rank; LOCAL_RANK is in the environment.
    argv = [tool(cc, "deepspeed"), "--hostfile", hostfile, "--num_nodes", str(cc.nodes),
            "--num_gpus", str(cc.nproc), "--master_addr", master, "--master_port", str(ctx.port),
            "--no_local_rank", "--module", "launch.worker", ctx.job, ctx.job_yaml]
    argv = _with_env(dataclasses.replace(cc, env=env, dist_timeout=None), argv)
    return Plan("deepspeed", files, [NodeCommand(None, argv)], master, ctx.port)


def slurm(cc: ComputeConfig, ctx: Context) -> Plan:
    script = os.path.join(ctx.launch_dir, "sbatch.sh")
    q = shlex.quote
    sb = [("job-name", ctx.job_name), ("nodes", cc.nodes), ("ntasks-per-node", 1)]
    if cc.gpus:
        sb.append(("gpus-per-node", cc.gpus))
    for key, value in (("cpus-per-task", cc.cpus_per_task), ("mem", cc.mem), ("partition", cc.partition),
                       ("account", cc.account), ("time", cc.time)):
        if value is not None:
            sb.append((key, value))
    sb += [("chdir", ctx.cwd), ("output", os.path.join(ctx.launch_dir, "slurm-%j.out"))]
    lines = ["#!/bin/bash", *(f"#SBATCH --{k}={q(str(v))}" for k, v in sb)]
    lines += _requeue_flags(cc)
    lines += [f"#SBATCH {a}" for a in cc.sbatch_args]
    lines += ["# One task per node; each starts the Composer launcher for its node's processes.",
              "set -euo pipefail"]
    if cc.venv:
        lines.append(f". {q(os.path.join(cc.venv, 'bin', 'activate'))}")
    lines += [f"export {k}={q(v)}" for k, v in process_env(cc).items()]
    lines.append('export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)')
    if cc.master_port is not None:
        lines.append(f"export MASTER_PORT={cc.master_port}")
    else:
        # The batch step runs on the first node of the allocation, the master: a port free there.
        lines.append(f"export MASTER_PORT=$({q(python(cc))} -c {q(FREE_PORT)})")
    # Node rank and master come from Slurm at run time, so the node command is expanded by bash on
    # each node; every fixed value in it is quoted.
    node = " ".join([
        q(tool(cc, "composer")), "--world_size", str(cc.world_size), "--nproc", str(cc.nproc),
        "--node_rank", '"$SLURM_NODEID"', "--master_addr", '"$MASTER_ADDR"', "--master_port", '"$MASTER_PORT"',
        *map(q, _composer_logs(ctx)), *map(q, _program(ctx))])
    # srun does not inherit sbatch's --cpus-per-task (Slurm 22.05-23.02): without it each node's launcher,
    # its ranks and their loader workers share one CPU. --kill-on-bad-exit: a node that fails ends the
    # step at once instead of leaving the others waiting in a collective until the timeout.
    srun = ["srun", "--nodes", str(cc.nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    if cc.cpus_per_task is not None:
        srun += ["--cpus-per-task", str(cc.cpus_per_task)]
    if cc.container:
        srun += [f"--container-image={cc.container}", f"--container-workdir={ctx.cwd}"]
        if cc.container_mounts:
            srun.append(f"--container-mounts={','.join(cc.container_mounts)}")
    lines.append(f"mkdir -p {q(os.path.join(ctx.launch_dir, 'logs'))}")   # the launchers' --stdout/--stderr
    lines += _run_requeueable(f"{shlex.join(srun)} bash -c {q(node)}", ctx.launch_dir)
    files = {script: "\n".join(lines) + "\n"}
    return Plan("slurm", files, [NodeCommand(None, ["sbatch", script])], "$MASTER_ADDR", "$MASTER_PORT")


def _requeue_flags(cc: ComputeConfig) -> list[str]:
    flags = []
    if cc.requeue:   # --open-mode=append: a requeued run adds to the log instead of truncating it
        flags += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
    if cc.signal_before_s:
        flags.append(f"#SBATCH --signal=B:USR1@{cc.signal_before_s}")
    return flags


def _run_requeueable(step: str, launch_dir: str) -> list[str]:
    """The job step in the background, so that the batch shell can take USR1 (--signal=B:USR1@N, or
    `scancel --signal=USR1 --batch`): it writes the stop file, every training rank sees it at the next
    batch (rank 0 looks, all agree), checkpoints, and exits with REQUEUE_EXIT; the script then requeues
    the job (same id: afterok dependents keep waiting), which resumes from that checkpoint."""
    stop = os.path.join(launch_dir, "stop-$SLURM_JOB_ID")
    return [
        f'export {STOP_FILE_ENV}="{stop}"',
        'rm -f "$LATENTVERSE_STOP_FILE"',
        "trap 'echo \"latentverse: USR1: checkpoint at the next batch, then requeue\"; "
        "touch \"$LATENTVERSE_STOP_FILE\"' USR1",
        f"{step} &",
        "step=$!",
        "while true; do   # wait returns early when the trap runs: wait again until the step has ended",
        '  set +e; wait "$step"; rc=$?; set -e',
        '  kill -0 "$step" 2>/dev/null || break',
        "done",
        f'if [ "$rc" -eq {REQUEUE_EXIT} ] || {{ [ "$rc" -ne 0 ] && [ -e "$LATENTVERSE_STOP_FILE" ]; }}; then',
        '  echo "latentverse: requeue job $SLURM_JOB_ID (step exited $rc)"',
        '  rm -f "$LATENTVERSE_STOP_FILE"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$rc"',
    ]


BACKENDS = {"local": local, "composer": composer, "torchrun": torchrun, "slurm": slurm, "deepspeed": deepspeed}


def plan(cc: ComputeConfig, ctx: Context) -> Plan:
    return BACKENDS[cc.backend](cc, ctx)
