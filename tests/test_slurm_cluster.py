"""The local Slurm of tests/slurm_cluster.py behaves as a two-node cluster: jobs span both nodes, run as
root in the shared folder, each node has its own hostname, /dev/shm and TMPDIR, failures and
cancellations are reported and stop the job's processes."""
import uuid
from pathlib import Path

import pytest

from tests.slurm_cluster import wait_until

pytestmark = pytest.mark.cluster


@pytest.fixture
def job_dir(slurm_cluster, request):
    """A folder of the cluster's shared filesystem for one test's scripts and outputs."""
    d = slurm_cluster.shared / request.node.name
    d.mkdir()
    return d


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\nset -eu\n" + body)
    return path


def sbatch_wait(cluster, script, *opts):
    """`sbatch --wait`: (exit code, job id)."""
    r = cluster.run("sbatch", "--parsable", "--wait", "--chdir", script.parent,
                    "-o", script.parent / "slurm-%j.out", *opts, script, check=False, timeout=180)
    return r.returncode, r.stdout.strip().split(";")[0]


def host_pids_named(name: str):
    """Host pids of the processes whose argv[0] is `name`."""
    pids = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and (p / "cmdline").read_bytes().split(b"\0")[0] == name.encode():
                pids.append(int(p.name))
        except OSError:
            pass
    return pids


def test_two_node_job_sees_two_separate_nodes(slurm_cluster, job_dir):
    tag = f"lv-{uuid.uuid4().hex[:8]}"
    script = write_script(job_dir / "job.sh", f"""
srun --ntasks-per-node=1 bash -c '
  touch /dev/shm/{tag}-$SLURM_NODEID
  touch written-$SLURM_NODEID
  while [ $(ls written-* | wc -l) -lt 2 ]; do sleep 0.1; done   # both nodes wrote to /dev/shm
  {{ echo "nodeid=$SLURM_NODEID"; echo "host=$(hostname)"; echo "uid=$(id -u)"; echo "cwd=$PWD"
    echo "tmpdir=$TMPDIR"; echo "shm=$(ls /dev/shm | grep {tag} | tr "\\n" " ")"
    echo "resolve=$(getent hosts n1 n2 | cut -d" " -f1 | sort -u | tr "\\n" " ")"
  }} > node-$SLURM_NODEID.txt'
""")
    try:
        code, job = sbatch_wait(slurm_cluster, script, "--nodes=2")
    finally:  # were /dev/shm shared, the tasks wrote into the host's
        leaked = sorted(Path("/dev/shm").glob(f"{tag}-*"))
        for f in leaked:
            f.unlink()
    assert code == 0, (job_dir / f"slurm-{job}.out").read_text()
    assert not leaked, "the nodes' /dev/shm is not the host's"
    seen = {}
    for f in sorted(job_dir.glob("node-*.txt")):
        info = dict(line.split("=", 1) for line in f.read_text().splitlines())
        seen[info["nodeid"]] = info
    assert sorted(seen) == ["0", "1"]
    assert {i["host"] for i in seen.values()} == {"n1", "n2"}
    for nodeid, info in seen.items():
        assert info["uid"] == "0"
        assert Path(info["cwd"]) == job_dir
        assert info["shm"].split() == [f"{tag}-{nodeid}"], "each node has its own /dev/shm"
        assert info["resolve"].split() == ["127.0.0.1"], "n1 and n2 resolve inside a job"
    assert seen["0"]["tmpdir"] != seen["1"]["tmpdir"]


def test_job_failing_on_one_node_is_reported_failed(slurm_cluster, job_dir):
    script = write_script(job_dir / "job.sh", """
srun bash -c 'if [ "$SLURM_NODEID" = 1 ]; then exit 3; fi'
""")
    code, job = sbatch_wait(slurm_cluster, script, "--nodes=2")
    assert code == 3
    info = slurm_cluster.job(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")


def start_sleepers(cluster, job_dir, token):
    """Submit a 2-node job whose task on each node sleeps under the name `token`; its id once both run."""
    script = write_script(job_dir / "job.sh", f"""
srun bash -c 'exec -a {token} sleep 300'
""")
    job = cluster.run("sbatch", "--parsable", "--nodes=2", "--chdir", job_dir, "-o", job_dir / "slurm-%j.out",
                      script).stdout.strip()
    wait_until(lambda: len(host_pids_named(token)) == 2, 60)
    assert sorted(cluster.node_of(p) for p in host_pids_named(token)) == ["n1", "n2"]
    return job


def test_scancel_stops_the_job_processes_on_both_nodes(slurm_cluster, job_dir):
    token = f"lv-scancel-{uuid.uuid4().hex[:8]}"
    job = start_sleepers(slurm_cluster, job_dir, token)
    slurm_cluster.run("scancel", job)
    wait_until(lambda: not host_pids_named(token), 30)
    assert host_pids_named(token) == []
    assert slurm_cluster.wait(job)["JobState"] == "CANCELLED"


def test_a_killed_node_takes_its_processes_along_and_comes_back(slurm_cluster, job_dir):
    token = f"lv-kill-{uuid.uuid4().hex[:8]}"
    job = start_sleepers(slurm_cluster, job_dir, token)
    slurm_cluster.kill_node("n2")
    assert [slurm_cluster.node_of(p) for p in host_pids_named(token)] == ["n1"]
    slurm_cluster.run("scontrol", "update", "nodename=n2", "state=down", "reason=killed")
    wait_until(lambda: slurm_cluster.job(job)["JobState"] not in ("RUNNING", "COMPLETING"), 30)
    info = slurm_cluster.job(job)
    assert (info["JobState"], info["Restarts"]) == ("PENDING", "1"), "requeued after the node failure"
    slurm_cluster.run("scancel", job)
    slurm_cluster.wait(job)
    slurm_cluster.restart_node("n2")
