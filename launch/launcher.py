"""Start or submit a multi-process / multi-node job from a run YAML (a job YAML plus a `compute:` block).

    latentverse launch RUN.yaml [key=value ...] [--dry-run] [--node-rank R]

The job part of the run YAML (without `compute` and `job`) is written to its own file per launch,
<launch_dir>/job-<UTC time>-<random>.yaml (default launch_dir: <job out_dir>/launch), written once and
read-only, and every process runs `latentverse JOB that.yaml`: a job still waiting in a queue runs
what was submitted with it, not what a later submission wrote.
Backends: local (composer -n), composer (one Composer launcher per node), torchrun (c10d
rendezvous), slurm (sbatch script, srun one launcher per node), deepspeed (hostfile + launcher).
`key=value` overrides apply to the run YAML: `compute.nodes=2`, or any job key. `--dry-run`
prints the files and commands (shell-quoted) and starts nothing.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
import uuid

import yaml

from launch import backends
from launch.compute import check
from launch.run_yaml import Run, load_run
from trainer.base import config as C
from trainer.base.log import get_logger

log = get_logger("launch")

STOP_GRACE_S = 30.0  # how long launchers get to stop their processes before SIGKILL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run YAML: a job YAML plus `job:` and a `compute:` block; or a chain YAML "
                               "(`stages:`, launch/chain.py)")
    p.add_argument("overrides", nargs="*", help="dotted key=value over the run YAML, e.g. compute.nodes=2 out_dir=x")
    p.add_argument("--dry-run", action="store_true", help="print the files and commands; start nothing")
    p.add_argument("--node-rank", type=int, default=None,
                   help="composer/torchrun: start only this node's launcher here (run it on every node)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def master_port(cc, source: str, dry_run: bool) -> int | str:
    """compute.master_port, else a port free on the master: asked of it over ssh when it is another
    machine (--dry-run asks nothing and shows a placeholder), else found here."""
    if cc.master_port is not None:
        return cc.master_port
    probe = backends.port_probe(cc)
    if probe is None:
        return free_port()
    if dry_run:
        return f"<free port on {cc.master()}>"
    try:
        r = subprocess.run(probe, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        out, why = r.stdout.strip(), (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        out, why = "", str(e)
    if not out.isdigit():
        raise C.ConfigError(f"{source}: compute.master_port: not set, and asking the master {cc.master()} for a "
                            f"free port failed ({shlex.join(probe[:-1])} ...: {why}); set compute.master_port")
    return int(out)


def submission_name() -> str:
    """job-<UTC time>-<8 hex>.yaml: unique to one launch, sortable by time."""
    return f"job-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}.yaml"


def job_out_dir(run: Run, dry_run: bool) -> str | None:
    """Check the job part with the job's own typed config (before anything starts); its out_dir."""
    from launch.cli import config_class, load_job_module

    cls = config_class(load_job_module(run.spec.job), run.job_data)
    cfg = C.from_dict(cls, run.job_data, source=run.path, cli_keys=run.cli_keys)
    return getattr(cfg, "out_dir", None)


def build(run: Run, dry_run: bool = False, node_rank: int | None = None) -> backends.Plan:
    """Run -> Plan with the job YAML among its files; every check happens here, nothing is written."""
    cc = run.spec.compute
    check(cc, run.path, run.cli_keys, node_rank)
    out_dir = job_out_dir(run, dry_run)
    if cc.launch_dir:
        launch_dir = cc.launch_dir
    elif out_dir:
        launch_dir = os.path.join(out_dir, "launch")
    else:
        raise C.ConfigError(f"{run.path}: compute.launch_dir: required, the job config has no out_dir")
    launch_dir = os.path.abspath(launch_dir)
    ctx = backends.Context(
        job=run.spec.job, job_yaml=os.path.join(launch_dir, submission_name()), launch_dir=launch_dir,
        cwd=os.getcwd(), port=master_port(cc, run.path, dry_run), node_rank=node_rank,
        job_name=cc.job_name or f"latentverse-{run.spec.job}")
    plan = backends.plan(cc, ctx)
    header = f"# written by `latentverse launch {run.path}`: the job part, run as `latentverse {run.spec.job}`\n"
    job_text = header + yaml.safe_dump(run.job_data, sort_keys=False, default_flow_style=None)
    plan.files = {ctx.job_yaml: job_text, **plan.files}
    plan.job_yaml = ctx.job_yaml
    return plan


def describe(plan: backends.Plan, cc) -> str:
    """Exactly what would be written and run: file contents, then each command shell-quoted."""
    out = [f"# backend {plan.backend}: {cc.nodes} node(s) x {cc.nproc} process(es), "
           f"world size {cc.world_size}, master {plan.master}:{plan.port}"]
    for path, text in plan.files.items():
        out += [f"# file {path}", text.rstrip("\n")]
    for cmd in plan.commands:
        where = f"node {cmd.node_rank}" if cmd.node_rank is not None else "run"
        out += [f"# {where}" + (f" on {cmd.host}" if cmd.host else ""), shlex.join(cmd.argv)]
    return "\n".join(out)


def write_files(files: dict[str, str], keep: str | None = None) -> None:
    """Write each file whole (a temporary name, then rename); `keep`: a file written once, read-only,
    never replaced (a launch's job YAML)."""
    for path, text in files.items():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if path == keep and os.path.exists(path):
            raise C.UserError(f"{path}: already written by another launch; launch again")
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        if path.endswith(".sh"):
            os.chmod(tmp, 0o755)
        if path == keep:
            os.chmod(tmp, 0o444)
        os.replace(tmp, path)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGINT each launcher's process group (the Composer launcher cleans up on it), then SIGKILL."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        try:
            os.killpg(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.time() + STOP_GRACE_S
    while time.time() < deadline and any(p.poll() is None for p in live):
        time.sleep(0.2)
    for p in live:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def run_commands(plan: backends.Plan, launch_dir: str) -> int:
    """Start every command here together; the first failure stops the rest (they would wait forever)."""
    logs = os.path.join(launch_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    procs, files = [], []
    try:
        for i, cmd in enumerate(plan.commands):
            log.info(f"start {'node ' + str(cmd.node_rank) if cmd.node_rank is not None else plan.backend}: "
                     f"{shlex.join(cmd.argv)}")
            out = None
            if i > 0:  # the first command owns the terminal; the others log to files
                out = open(os.path.join(logs, f"node{cmd.node_rank}.txt"), "a", encoding="utf-8")
                files.append(out)
            # Only a local first command reads the keyboard: `ssh -tt` would set our terminal raw and take
            # Ctrl-C from us. So Ctrl-C stops the run here, which ends each ssh and hangs up its remote launcher.
            stdin = subprocess.DEVNULL if i > 0 or cmd.argv[0] == "ssh" else None
            procs.append(subprocess.Popen(cmd.argv, stdin=stdin, stdout=out, stderr=subprocess.STDOUT if out else None,
                                          start_new_session=True))
        while True:
            codes = [p.poll() for p in procs]
            rc = next((c for c in codes if c not in (None, 0)), 0)
            if rc or all(c == 0 for c in codes):
                break
            time.sleep(0.2)
        if rc:
            failed = [c.node_rank for c, p in zip(plan.commands, procs) if p.returncode not in (None, 0)]
            log.error(f"node(s) {failed} exited with {rc}; stopping the others (logs in {logs})")
        return rc
    except KeyboardInterrupt:
        log.warning("interrupted; stopping every launcher")
        return 130
    finally:
        _stop(procs)
        for f in files:
            f.close()


def submit(plan: backends.Plan) -> int:
    (cmd,) = plan.commands
    if shutil.which(cmd.argv[0]) is None:
        raise C.UserError(f"{cmd.argv[0]}: not found on this machine; the script is written: {cmd.argv[-1]}")
    r = subprocess.run(cmd.argv, capture_output=True, text=True)
    print(r.stdout.strip() or r.stderr.strip())
    return r.returncode


def main(args: argparse.Namespace) -> int:
    """One run YAML (a chain YAML goes through launch/chain.py, the `latentverse launch` entry)."""
    run = load_run(args.run, args.overrides)
    plan = build(run, dry_run=args.dry_run, node_rank=args.node_rank)
    cc = run.spec.compute
    if args.dry_run:
        print(describe(plan, cc))
        return 0
    write_files(plan.files, keep=plan.job_yaml)
    launch_dir = os.path.dirname(plan.job_yaml)
    log.info(f"{plan.backend}: {cc.nodes} node(s) x {cc.nproc} process(es); job YAML {plan.job_yaml}, "
             f"logs in {launch_dir}")
    if plan.backend == "slurm":
        return submit(plan)
    return run_commands(plan, launch_dir)
