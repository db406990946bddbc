"""What each launch backend writes and runs says what the docs of its launcher say.

Commands are parsed with shlex.split and checked flag by flag; sbatch scripts by their #SBATCH lines
and the srun line; hostfiles line by line. Bad compute blocks are one-line errors naming the key.
"""
import glob
import os
import re
import shlex

import pytest
import yaml

from launch import backends
from launch.compute import ComputeConfig, check
from launch.launcher import build, describe, write_files
from launch.run_yaml import load_run
from launch.worker import DIST_TIMEOUT_ENV, bridge_env
from trainer.base import config as C

from .conftest import ROOT, run_cli


def flags(argv: list[str]) -> dict[str, str]:
    """--key value pairs of a launcher command line (up to the program)."""
    out, i = {}, 1
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-m", "--module"):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[argv[i]] = argv[i + 1]
            i += 2
        else:
            out[argv[i]] = True
            i += 1
    return out


def program(argv: list[str]) -> list[str]:
    """What follows the launcher's -m / --module flag: the module and its arguments."""
    i = next(i for i, a in enumerate(argv) if a in ("-m", "--module"))
    return argv[i + 1:]


def ctx(tmp_path, **kw) -> backends.Context:
    d = str(tmp_path / "launch")
    return backends.Context(job="train", job_yaml=os.path.join(d, "job.yaml"), launch_dir=d, cwd=str(tmp_path),
                            port=kw.pop("port", 29511), job_name="latentverse-train", **kw)


def strip_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0] and not argv[0].startswith("/"):
            k, v = argv[0].split("=", 1)
            env[k] = v
            argv = argv[1:]
    return env, argv


def test_local_is_composer_with_n_processes(tmp_path):
    cc = ComputeConfig(backend="local", procs_per_node=2, env={"OMP_NUM_THREADS": "1"})
    plan = backends.plan(cc, ctx(tmp_path))
    (cmd,) = plan.commands
    argv = shlex.split(shlex.join(cmd.argv))
    env, argv = strip_env(argv)
    assert env == {"OMP_NUM_THREADS": "1"}
    assert os.path.basename(argv[0]) == "composer"
    f = flags(argv)
    assert f["-n"] == "2" and f["--master_port"] == "29511"
    assert "{rank}" in f["--stdout"] and f["--stdout"].startswith(str(tmp_path / "launch" / "logs"))
    assert program(argv) == ["launch.worker", "train", str(tmp_path / "launch" / "job.yaml")]


def test_gpus_set_processes_per_node():
    assert ComputeConfig(gpus=8).nproc == 8
    assert ComputeConfig(gpus=8, procs_per_node=4).nproc == 4
    assert ComputeConfig().nproc == 1
    assert ComputeConfig(nodes=4, gpus=8).world_size == 32


def test_composer_one_launcher_per_node(tmp_path):
    cc = ComputeConfig(backend="composer", nodes=4, gpus=8, hosts=["n0", "n1", "n2", "n3"])
    plan = backends.plan(cc, ctx(tmp_path))
    assert [c.node_rank for c in plan.commands] == [0, 1, 2, 3]
    for rank, cmd in enumerate(plan.commands):
        argv = shlex.split(shlex.join(cmd.argv))
        # A remote node is reached through ssh, in the same directory, on a terminal (-tt) that hangs
        # up when the run is stopped here, which ends the remote launcher.
        assert argv[:3] == ["ssh", "-tt", f"n{rank}"]
        cd, _, inner = argv[3].partition(" && ")
        assert shlex.split(cd) == ["cd", str(tmp_path)]
        inner = shlex.split(inner)
        assert os.path.basename(inner[0]) == "composer"
        f = flags(inner)
        assert f["--world_size"] == "32" and f["--nproc"] == "8" and f["--node_rank"] == str(rank)
        assert f["--master_addr"] == "n0" and f["--master_port"] == "29511"
        assert program(inner)[:2] == ["launch.worker", "train"]


def test_composer_loopback_nodes_run_here_and_node_rank_picks_one(tmp_path):
    cc = ComputeConfig(backend="composer", nodes=2, procs_per_node=1, hosts=["127.0.0.1", "localhost"])
    plan = backends.plan(cc, ctx(tmp_path))
    for rank, cmd in enumerate(plan.commands):
        assert os.path.basename(cmd.argv[0]) == "composer"  # no ssh for this machine
        f = flags(cmd.argv)
        assert (f["--world_size"], f["--nproc"], f["--node_rank"], f["--master_addr"]) == \
            ("2", "1", str(rank), "127.0.0.1")
    cc = ComputeConfig(backend="composer", nodes=2, master_addr="10.0.0.1", master_port=4000)
    (cmd,) = backends.plan(cc, ctx(tmp_path, port=4000, node_rank=1)).commands
    f = flags(cmd.argv)
    assert f["--node_rank"] == "1" and f["--master_addr"] == "10.0.0.1" and f["--master_port"] == "4000"


def test_torchrun_rendezvous(tmp_path):
    cc = ComputeConfig(backend="torchrun", nodes=4, gpus=8, hosts=["a", "b", "c", "d"])
    plan = backends.plan(cc, ctx(tmp_path))
    assert len(plan.commands) == 4
    for cmd in plan.commands:
        inner = shlex.split(shlex.split(shlex.join(cmd.argv))[3].partition(" && ")[2])
        assert os.path.basename(inner[0]) == "torchrun"
        f = flags(inner)
        assert f["--nnodes"] == "4" and f["--nproc-per-node"] == "8"
        assert f["--rdzv-backend"] == "c10d" and f["--rdzv-endpoint"] == "a:29511"
        assert f["--rdzv-id"] == "latentverse-train"
        # torchrun's env names are bridged to Composer's by launch.worker
        assert program(inner) == ["launch.worker", "train", str(tmp_path / "launch" / "job.yaml")]


def test_deepspeed_hostfile_and_launcher(tmp_path):
    cc = ComputeConfig(backend="deepspeed", nodes=2, gpus=8, hosts=["gpu-a", "gpu-b"], env={"NCCL_DEBUG": "INFO"})
    plan = backends.plan(cc, ctx(tmp_path))
    hostfile = str(tmp_path / "launch" / "hostfile")
    rows = [line.split() for line in plan.files[hostfile].splitlines()]
    assert rows == [["gpu-a", "slots=8"], ["gpu-b", "slots=8"]]
    (cmd,) = plan.commands
    env, argv = strip_env(shlex.split(shlex.join(cmd.argv)))
    assert env["NCCL_DEBUG"] == "INFO"
    # Remote nodes get the variables through the DeepSpeed env file.
    assert plan.files[env["DS_ENV_FILE"]].splitlines() == ["NCCL_DEBUG=INFO"]
    assert os.path.basename(argv[0]) == "deepspeed"
    f = flags(argv)
    assert f["--hostfile"] == hostfile and f["--num_nodes"] == "2" and f["--num_gpus"] == "8"
    assert f["--master_addr"] == "gpu-a" and f["--master_port"] == "29511"
    assert f["--no_local_rank"] is True
    assert program(argv)[:2] == ["launch.worker", "train"]


def sbatch_lines(script: str) -> dict[str, str]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            (arg,) = shlex.split(line[len("#SBATCH"):])
            k, _, v = arg.partition("=")
            out[k] = v
    return out


def test_slurm_script(tmp_path):
    cc = ComputeConfig(backend="slurm", nodes=4, gpus=8, partition="gpu batch", account="proj", time="24:00:00",
                       cpus_per_task=64, env={"NCCL_IB_DISABLE": "0"}, container="nvcr.io/x:1",
                       container_mounts=["/data:/data"], sbatch_args=["--exclusive"])
    plan = backends.plan(cc, ctx(tmp_path))
    script = plan.files[str(tmp_path / "launch" / "sbatch.sh")]
    assert script.startswith("#!/bin/bash\n")
    sb = sbatch_lines(script)
    assert sb["--nodes"] == "4" and sb["--ntasks-per-node"] == "1" and sb["--gpus-per-node"] == "8"
    assert sb["--partition"] == "gpu batch" and sb["--account"] == "proj" and sb["--time"] == "24:00:00"
    assert sb["--cpus-per-task"] == "64" and sb["--chdir"] == str(tmp_path) and "--exclusive" in sb
    lines = script.splitlines()
    assert "export NCCL_IB_DISABLE=0" in lines
    # The master is the first node of the allocation; the port is found free there unless set.
    assert 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    port_line = next(ln for ln in lines if ln.startswith("export MASTER_PORT="))
    assert "socket" in port_line and "bind" in port_line
    (srun_line,) = [ln for ln in lines if ln.startswith("srun ")]
    assert srun_line.endswith(" &")    # the step runs in the background: the USR1 trap can run meanwhile
    srun = shlex.split(srun_line.removesuffix(" &"))
    assert srun[srun.index("--nodes") + 1] == "4" and srun[srun.index("--ntasks-per-node") + 1] == "1"
    # srun gets sbatch's CPUs per task (Slurm 22.05-23.02 does not pass them on), and a failed node
    # ends the step.
    assert srun[srun.index("--cpus-per-task") + 1] == "64" and "--kill-on-bad-exit=1" in srun
    assert "--container-image=nvcr.io/x:1" in srun and "--container-mounts=/data:/data" in srun
    assert srun[-3:-1] == ["bash", "-c"]
    node = shlex.split(srun[-1])
    assert node[0] == "composer"  # inside the container: its own PATH
    f = flags(node)
    assert f["--world_size"] == "32" and f["--nproc"] == "8"
    # shlex.split keeps the variables for bash to expand on each node
    assert f["--node_rank"] == "$SLURM_NODEID"
    assert f["--master_addr"] == "$MASTER_ADDR" and f["--master_port"] == "$MASTER_PORT"
    assert program(node)[:2] == ["launch.worker", "train"]
    assert plan.commands[0].argv == ["sbatch", str(tmp_path / "launch" / "sbatch.sh")]


def test_slurm_fixed_port_and_venv(tmp_path):
    cc = ComputeConfig(backend="slurm", nodes=2, partition="cpu", master_port=6000, venv="/opt/venv")
    script = backends.plan(cc, ctx(tmp_path)).files[str(tmp_path / "launch" / "sbatch.sh")]
    lines = script.splitlines()
    assert "export MASTER_PORT=6000" in lines
    assert ". /opt/venv/bin/activate" in lines
    assert "--gpus-per-node" not in sbatch_lines(script)
    srun = shlex.split(next(ln for ln in lines if ln.startswith("srun ")).removesuffix(" &"))
    assert "--kill-on-bad-exit=1" in srun and "--cpus-per-task" not in srun  # sbatch got none either
    node = shlex.split(srun[-1])
    assert node[0] == "/opt/venv/bin/composer"


# ---------------------------------------------------------------- bad compute blocks


@pytest.mark.parametrize("compute, key", [
    ({"nodes": 0}, "compute.nodes"),
    ({"backend": "slurm", "nodes": 2}, "compute.partition"),
    ({"procs_per_node": 0}, "compute.procs_per_node"),
    ({"backend": "local", "nodes": 2}, "compute.nodes"),
    ({"backend": "composer", "nodes": 2}, "compute.hosts"),
    ({"backend": "deepspeed", "nodes": 2}, "compute.hosts"),
    ({"backend": "composer", "nodes": 2, "hosts": ["a"]}, "compute.hosts"),
    ({"backend": "torchrun", "container": "img"}, "compute.container"),
    ({"backend": "pbs"}, "compute.backend"),
    ({"nodes": "four"}, "compute.nodes"),
    ({"gpu": 8}, "compute.gpu"),
    ({"dist_timeout": 0}, "compute.dist_timeout"),
    ({"dist_timeout": "1h"}, "compute.dist_timeout"),
])
def test_bad_compute_is_one_line_naming_the_key(tmp_path, compute, key):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"job": "train", "compute": compute, "out_dir": str(tmp_path / "o")}))
    r = run_cli("launch", run, "--dry-run")
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{run}: {key}:"), r.stderr


def test_bad_key_on_the_command_line_is_named_so(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"job": "train", "compute": {"backend": "slurm", "partition": "p"}}))
    with pytest.raises(C.ConfigError, match=r"^command line: compute.nodes: must be at least 1, got 0$"):
        build(load_run(str(run), ["compute.nodes=0"]), dry_run=True)
    with pytest.raises(C.ConfigError, match=r"run.yaml: compute.master_port: must be set"):
        build(load_run(str(run), ["compute.backend=composer", "compute.nodes=2", "compute.master_addr=h"]),
              dry_run=True, node_rank=1)


def test_unknown_job_and_run_key_in_job_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("job: frobnicate\n")
    with pytest.raises(C.ConfigError, match=r"run.yaml: job: expected one of .*got 'frobnicate'"):
        load_run(str(run))
    base = tmp_path / "job.yaml"
    base.write_text("compute: {nodes: 2}\n")
    run.write_text(f"job: train\njob_yaml: {base}\n")
    with pytest.raises(C.ConfigError, match=r"job.yaml: compute: a run key in a job YAML"):
        load_run(str(run))
    run.write_text(f"job: train\njob_yaml: {tmp_path}/missing.yaml\n")
    with pytest.raises(C.ConfigError, match=r"run.yaml: job_yaml: path does not exist"):
        load_run(str(run))


# ---------------------------------------------------------------- run YAML -> job YAML


def test_job_part_merges_job_yaml_inline_overrides_and_command_line(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("out_dir: a\nbatch_size: 8\nmax_duration: 10ba\nseed: 1\n")
    run = tmp_path / "run.yaml"
    run.write_text(f"job: train\njob_yaml: {base}\nbatch_size: 16\nmax_duration: 20ba\n"
                   "overrides: {max_duration: 30ba, optim.lr: 0.5}\ncompute: {backend: local, procs_per_node: 2}\n")
    r = load_run(str(run), ["seed=3", "compute.procs_per_node=4", f"out_dir={tmp_path}/o"])
    assert r.spec.compute.nproc == 4
    assert r.job_data == {"out_dir": f"{tmp_path}/o", "batch_size": 16, "max_duration": "30ba", "seed": 3,
                          "optim": {"lr": 0.5}}
    plan = build(r, dry_run=True)
    job_yaml = plan.job_yaml
    assert os.path.dirname(job_yaml) == str(tmp_path / "o" / "launch")
    written = yaml.safe_load(plan.files[job_yaml])
    assert written == r.job_data and "compute" not in written and "job" not in written
    assert not os.path.exists(job_yaml)  # building a plan writes nothing


def test_dry_run_prints_the_files_and_quoted_commands(tmp_path):
    run = tmp_path / "run.yaml"
    out = tmp_path / "out dir"  # a space: the commands must quote it
    run.write_text(yaml.safe_dump({"job": "train", "out_dir": str(out),
                                   "compute": {"backend": "composer", "nodes": 2, "procs_per_node": 1,
                                               "hosts": ["127.0.0.1", "127.0.0.1"]}}))
    r = run_cli("launch", run, "--dry-run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("# backend composer: 2 node(s) x 1 process(es), world size 2, master 127.0.0.1:")
    port = lines[0].rsplit(":", 1)[1]
    (job_yaml,) = [ln[len("# file "):] for ln in lines if ln.startswith(f"# file {out}/launch/job-")]
    cmds = [shlex.split(lines[i + 1]) for i, ln in enumerate(lines) if ln.startswith("# node ")]
    assert len(cmds) == 2
    for rank, argv in enumerate(cmds):
        f = flags(argv)
        assert f["--node_rank"] == str(rank) and f["--master_port"] == port
        assert program(argv) == ["launch.worker", "train", job_yaml]
    assert not out.exists()


def test_master_port_is_free_unless_set(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"job": "train", "out_dir": str(tmp_path)}))
    ports = {build(load_run(str(run)), dry_run=True).port for _ in range(3)}
    assert all(isinstance(p, int) and 1024 <= p < 65536 for p in ports)
    assert build(load_run(str(run), ["compute.master_port=4321"]), dry_run=True).port == 4321


# ---------------------------------------------------------------- what reaches the processes


def _node_env_and_program(cmd: backends.NodeCommand) -> tuple[dict, list[str]]:
    argv = shlex.split(shlex.join(cmd.argv))
    if argv[0] == "ssh":
        argv = shlex.split(argv[-1].partition(" && ")[2])
    return strip_env(argv)


@pytest.mark.parametrize("backend", ["local", "composer", "torchrun"])
def test_dist_timeout_and_nccl_env_reach_every_process(tmp_path, backend):
    hosts = {"local": [], "composer": ["a", "b"], "torchrun": ["a", "b"]}[backend]
    cc = ComputeConfig(backend=backend, nodes=len(hosts) or 1, hosts=hosts, dist_timeout=1800,
                       env={"NCCL_SOCKET_IFNAME": "ib0"})
    for cmd in backends.plan(cc, ctx(tmp_path)).commands:
        env, argv = _node_env_and_program(cmd)
        assert env == {"NCCL_SOCKET_IFNAME": "ib0", DIST_TIMEOUT_ENV: "1800"}
        assert program(argv)[0] == "launch.worker"  # which joins the group with that timeout


def test_dist_timeout_and_nccl_env_in_slurm_and_deepspeed(tmp_path):
    cc = ComputeConfig(backend="slurm", nodes=2, partition="p", dist_timeout=600, env={"NCCL_DEBUG": "WARN"})
    lines = backends.plan(cc, ctx(tmp_path)).files[str(tmp_path / "launch" / "sbatch.sh")].splitlines()
    assert "export NCCL_DEBUG=WARN" in lines and f"export {DIST_TIMEOUT_ENV}=600" in lines
    cc = ComputeConfig(backend="deepspeed", nodes=2, hosts=["a", "b"], dist_timeout=600)
    plan = backends.plan(cc, ctx(tmp_path))
    env, _ = strip_env(plan.commands[0].argv)
    assert plan.files[env["DS_ENV_FILE"]].splitlines() == [f"{DIST_TIMEOUT_ENV}=600"]


# ---------------------------------------------------------------- one job YAML per submission


def test_each_submission_runs_its_own_job_yaml(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"job": "train", "out_dir": str(tmp_path / "o"),
                                   "compute": {"backend": "slurm", "nodes": 2, "partition": "p"}}))
    pointed = []
    for seed in (1, 2):  # a second submission while the first still waits in the queue
        plan = build(load_run(str(run), [f"seed={seed}"]), dry_run=True)
        script = plan.files[str(tmp_path / "o" / "launch" / "sbatch.sh")]
        srun = shlex.split(next(ln for ln in script.splitlines() if ln.startswith("srun ")).removesuffix(" &"))
        pointed.append(program(shlex.split(srun[-1]))[2])
        write_files(plan.files, keep=plan.job_yaml)
    assert pointed[0] != pointed[1]
    for seed, path in zip((1, 2), pointed):
        assert os.path.dirname(path) == str(tmp_path / "o" / "launch")
        assert yaml.safe_load(open(path))["seed"] == seed  # the first is not rewritten by the second
        assert not os.stat(path).st_mode & 0o222  # read-only


# ---------------------------------------------------------------- the master port, found on the master

# Stands in for the ssh client: runs the remote command here, as sshd on the host would, and notes
# which host was asked (the launcher's own code runs unchanged).
SSH_SHIM = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do [ "$1" = "-o" ] && shift; shift; done
echo "$1" >> "$SSH_LOG"
shift
[ -n "$SSH_FAIL" ] && { echo "ssh: connect to host: Connection refused" >&2; exit 255; }
exec sh -c "$*"
"""


def test_master_port_is_asked_of_the_remote_master(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(SSH_SHIM)
    (bin_dir / "ssh").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SSH_LOG", str(tmp_path / "ssh.log"))
    run = tmp_path / "run.yaml"
    for backend in ("composer", "torchrun", "deepspeed"):
        run.write_text(yaml.safe_dump({"job": "train", "out_dir": str(tmp_path / "o"),
                                       "compute": {"backend": backend, "nodes": 2, "hosts": ["gpu-a", "gpu-b"]}}))
        (tmp_path / "ssh.log").write_text("")
        plan = build(load_run(str(run)))
        # asked of the master (hosts[0]), once, before anything starts; every node uses that port
        assert (tmp_path / "ssh.log").read_text().split() == ["gpu-a"]
        assert isinstance(plan.port, int) and 1024 <= plan.port < 65536
        assert f"{plan.master}:{plan.port}" in describe(plan, load_run(str(run)).spec.compute)
        (tmp_path / "ssh.log").write_text("")
        assert build(load_run(str(run)), dry_run=True).port == "<free port on gpu-a>"  # --dry-run asks nothing
        assert (tmp_path / "ssh.log").read_text() == ""
    monkeypatch.setenv("SSH_FAIL", "1")
    with pytest.raises(C.ConfigError) as e:
        build(load_run(str(run)))
    msg = str(e.value)
    assert msg.startswith(f"{run}: compute.master_port: not set, and asking the master gpu-a") and "\n" not in msg
    assert "Connection refused" in msg
    assert build(load_run(str(run), ["compute.master_port=4000"])).port == 4000  # a set port: no ssh


# ---------------------------------------------------------------- the example run YAMLs


# Run YAMLs (one job); the chain YAMLs (`stages:`) are checked in tests/test_chain.py.
EXAMPLES = sorted(p for p in glob.glob(os.path.join(ROOT, "yamls", "runs", "*.yaml"))
                  if not os.path.basename(p).startswith("chain_"))


def test_examples_cover_each_stage_and_scale():
    names = {os.path.basename(p) for p in EXAMPLES}
    for stage in ("autoencoder", "pretrain_masked", "finetune_unmasked"):
        assert f"{stage}_1x8.yaml" in names
        assert f"{stage}_4x8_slurm.yaml" in names
        assert f"{stage}_4x8_torchrun.yaml" in names or f"{stage}_4x8_composer.yaml" in names
    assert "autoencoder_cpu_2proc.yaml" in names


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_run_yamls(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    rel = os.path.relpath(path, ROOT)
    m = re.search(r"_(\d+)x(\d+)", os.path.basename(path))
    raw = C.read_yaml(rel)
    assert not raw.get("job_yaml") or os.path.exists(raw["job_yaml"]), f"{rel}: job_yaml {raw['job_yaml']} is missing"
    r = load_run(rel)
    pretrained = r.job_data.get("model", {}).get("pretrained_path")
    if pretrained and not os.path.exists(pretrained):
        # A downloaded checkpoint that lives on the GPU machines, not here: any existing dir passes the check.
        r = load_run(rel, [f"model.pretrained_path={tmp_path}"])
    cc = r.spec.compute
    if m:
        assert (cc.nodes, cc.nproc) == (int(m.group(1)), int(m.group(2)))
    plan = build(r, dry_run=True)
    text = describe(plan, cc)
    assert f"world size {cc.world_size}" in text
    assert plan.backend == cc.backend


# ---------------------------------------------------------------- the env bridge


def test_worker_bridges_torchrun_and_deepspeed_env_names():
    env = {"GROUP_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    assert bridge_env(env) == {"NODE_RANK": "3"} and env["NODE_RANK"] == "3"
    env = {"CROSS_RANK": "1", "LOCAL_SIZE": "4"}
    assert bridge_env(env) == {"NODE_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    env = {"NODE_RANK": "2", "GROUP_RANK": "5", "LOCAL_WORLD_SIZE": "1"}
    assert bridge_env(env) == {} and env["NODE_RANK"] == "2"  # Composer's own names win
