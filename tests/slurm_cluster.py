"""A real Slurm on one machine, for the tests: one controller and two compute nodes, n1 and n2.

The `slurm_cluster` fixture (session scope, registered in tests/conftest.py) runs Debian's Slurm 22.05
(`slurmctld`, `slurmd`) and `munged`, as root, everything under one temporary folder
(/tmp/lv-slurm-XXXX, short because Slurm and munge put unix sockets there):

    slurm.conf, plugstack.conf (empty), task_prolog.sh, hosts, jobcomp.txt (one line per finished job)
    munge/      munge.key (random, 0600), munge.sock, stdout.log (munged's log)
    ctld/       slurmctld's state, log and pid
    nodes/n1/   slurmd's spool, log and pid, and the node's TMPDIR (same for n2)
    shared/     the cluster's "shared filesystem": tests put job scripts and outputs here

How the two nodes are kept apart, as on separate machines. Each node is a set of Linux namespaces made
by `unshare --mount --uts --ipc --pid --fork --mount-proc`, whose init (a few lines of sh, NODE_INIT)
sets the node up and starts its `slurmd -D -N <node>`; slurmd starts each job step's slurmstepd, which
starts the tasks, so every process of a node's jobs lives in the node's namespaces:
- hostname: the node's own (`hostname` in a task prints n1 or n2);
- /dev/shm: a fresh tmpfs per node (POSIX shared memory and semaphores, e.g. mosaicml-streaming's,
  are seen neither by the other node nor by the host); also a private SysV IPC namespace;
- /etc/hosts: bind-mounted from the cluster folder with `n1` and `n2` at 127.0.0.1, so the node names
  resolve inside jobs (MASTER_ADDR=n1 works); the host's /etc/hosts is not touched, so the test
  process itself cannot resolve n1/n2 (it never needs to: clients talk to the daemons by address);
- processes: a PID namespace per node (`ps` in a task lists the node's processes only), so
  `kill_node` (SIGKILL to its init) takes every process of the node down at once, as when a machine
  fails; `restart_node` brings it back;
- TMPDIR: the task prolog exports nodes/<node>/tmp (Python's tempfile and streaming's file locks follow
  it). /tmp itself stays shared, and so do the network (loopback: every node is 127.0.0.1) and the
  rest of the filesystem, which plays the shared filesystem.
Each daemon listens on a free port of 127.0.0.1 (SlurmctldPort, and Port= per node). The nodes claim
2 CPUs each whatever the machine has (SlurmdParameters=config_overrides); no cgroups (proctrack/
linuxproc, task/none). Tasks run as root; a job's working directory is where sbatch was called or its
--chdir (use `shared`).

Nothing reads a system-wide configuration: every daemon gets `-f <folder>/slurm.conf`, the clients get
SLURM_CONF (in `cluster.env`, and in os.environ while the fixture lives; the task prolog exports it
again), munge runs with its own key and socket (AuthInfo=socket=...), PlugStackConfig names an empty
file. There is no slurmdbd, so `sacct` does not work: a finished job stays in `scontrol show job`
(`cluster.job(id)`) for MinJobAge (3600 s here: the rehearsal waits on jobs that ended long before) and in jobcomp.txt; `sbatch --wait` exits with the job's
exit code, but polls at 2 s then 8 s: `cluster.wait(id)` polls every 0.2 s. A node that stops
answering is marked down after SlurmdTimeout (10 s here; about 25 s from a kill to the job's requeue),
or at once by `scontrol update nodename=n2 state=down`.

Stopping: the fixture cancels any job left, stops each node (SIGTERM to its init, passed on to slurmd;
the PID namespace ends with every process in it), slurmctld and munged, each by the process id it
started, then removes the folder. The daemons also get PR_SET_PDEATHSIG: if the test process is
killed, they die with it (only the folder stays behind).

Without root, Linux namespaces, or the packages, the fixture skips with a one-line reason; with
LATENTVERSE_REQUIRE_CLUSTER=1 (set by .ci/run) it fails instead. `make test` installs the packages
when it runs as root (`make cluster-deps`: apt-get, about 10 s). On 2 busy cores the cluster is up
(both nodes idle in sinfo) in 0.5-1.7 s and stops in 0.1-3.5 s; a 2-node job takes about 2 s.
"""
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "scancel", "unshare")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}
# The daemons live in /usr/sbin, which a non-login PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
REQUIRE_ENV = "LATENTVERSE_REQUIRE_CLUSTER"


def missing() -> str:
    """Why this machine cannot run the local cluster, in one line ('' when it can)."""
    absent = [cmd for cmd in DAEMONS if shutil.which(cmd, path=SEARCH_PATH) is None]
    if absent:
        return (f"Slurm/munge not installed (missing {', '.join(absent)}): "
                "as root run `make cluster-deps` (apt-get install slurmctld slurmd munge)")
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs tasks as root in Linux namespaces)"
    probe = subprocess.run(["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "true"],
                           capture_output=True, text=True)
    if probe.returncode:
        return f"Linux namespaces unavailable (unshare: {probe.stderr.strip()})"
    return ""


def wait_until(ready, timeout: float, every: float = 0.2) -> bool:
    """Poll `ready()` until it is true (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def _die_with_parent():
    """preexec_fn: the daemon is killed if the test process dies without stopping it (a node's unshare
    then takes its namespace along: --kill-child)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


SLURM_CONF = """\
ClusterName=latentverse
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.sock
PlugStackConfig={root}/plugstack.conf
StateSaveLocation={root}/ctld/state
SlurmctldPidFile={root}/ctld/slurmctld.pid
SlurmctldLogFile={root}/ctld/slurmctld.log
SlurmdSpoolDir={root}/nodes/%n/spool
SlurmdPidFile={root}/nodes/%n/slurmd.pid
SlurmdLogFile={root}/nodes/%n/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: processes are tracked through /proc, tasks are not bound to CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
TaskProlog={root}/task_prolog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes claim {cpus} CPUs each on whatever machine the tests run on.
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
ReturnToService=2
SlurmdTimeout={slurmd_timeout}
KillWait=5
MinJobAge=3600
InactiveLimit=0
MessageTimeout=30
{nodes}
PartitionName=debug Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""

TASK_PROLOG = """\
#!/bin/sh
# Runs before every task of every job step (the batch script included); its "export" lines
# go into the task's environment.
echo "export TMPDIR={root}/nodes/$SLURMD_NODENAME/tmp"
echo "export SLURM_CONF={root}/slurm.conf"
"""

# The init (pid 1) of a node's namespaces (see the module docstring): sets the node up, starts its slurmd,
# passes SIGTERM on to it, and reaps the orphans it is given (slurmd would leave them as zombies).
NODE_INIT = """\
set -e
hostname "$1"
mount -t tmpfs -o mode=1777 lv-shm-$1 /dev/shm
mount --bind "$2/hosts" /etc/hosts
slurmd -D -N "$1" -f "$2/slurm.conf" &
slurmd=$!
trap 'kill -TERM $slurmd' TERM
while kill -0 $slurmd 2>/dev/null; do wait $slurmd || true; done
"""


class SlurmCluster:
    """The daemons of one local cluster; see the module docstring."""

    def __init__(self, root: Path, cpus: int = 2, slurmd_timeout: int = 10):
        self.root = Path(root)
        self.shared = self.root / "shared"
        self.conf = self.root / "slurm.conf"
        self.cpus, self.slurmd_timeout = cpus, slurmd_timeout
        # Nothing of an outer Slurm job (the tests may run inside one) leaks into this cluster.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        self.env.update(SLURM_CONF=str(self.conf), PATH=SEARCH_PATH)
        self.ports = {}
        self.procs = {}  # name ("munged", "slurmctld", "n1", "n2") -> Popen

    # --- configuration -------------------------------------------------------------------------
    def write_config(self):
        from tests.conftest import free_port  # not at the top: conftest imports this module
        root = self.root
        node_dirs = [f"nodes/{n}/{sub}" for n in NODES for sub in ("spool", "tmp")]
        for d in ("munge", "ctld/state", "shared", *node_dirs):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.ports = {"slurmctld": free_port(), **{n: free_port() for n in NODES}}
        nodes = "\n".join(f"NodeName={n} NodeHostname={n} NodeAddr=127.0.0.1 Port={self.ports[n]} "
                          f"CPUs={self.cpus} State=UNKNOWN" for n in NODES)
        self.conf.write_text(SLURM_CONF.format(
            root=root, ctld_port=self.ports["slurmctld"], cpus=self.cpus, slurmd_timeout=self.slurmd_timeout,
            nodes=nodes, node_list=",".join(NODES)))
        (root / "plugstack.conf").write_text("")
        prolog = root / "task_prolog.sh"
        prolog.write_text(TASK_PROLOG.format(root=root))
        prolog.chmod(0o755)
        hosts = Path("/etc/hosts").read_text() + "".join(f"127.0.0.1 {n}\n" for n in NODES)
        (root / "hosts").write_text(hosts)

    # --- daemons -------------------------------------------------------------------------------
    def _spawn(self, name, argv, log):
        out = open(self.root / log, "ab")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        out.close()

    def start(self, timeout: float = 60):
        self.write_config()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--socket={m}/munge.sock",
                               f"--key-file={m}/munge.key", f"--log-file={m}/munged.log",
                               f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed"],
                    "munge/stdout.log")
        self._wait(lambda: (m / "munge.sock").exists(), timeout, "munged to open its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)], "ctld/stdout.log")
        for n in NODES:
            self.start_node(n)
        self.wait_idle(timeout)

    def start_node(self, node):
        """Start (or restart) node `node`'s slurmd in its own namespaces."""
        self._spawn(node, ["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--mount-proc",
                           "--propagation", "private", "--kill-child=SIGTERM",
                           "sh", "-c", NODE_INIT, "node-init", node, str(self.root)],
                    f"nodes/{node}/stdout.log")

    def kill_node(self, node):
        """Every process of `node` dies at once (SIGKILL to its namespace's init), as when a machine fails.
        slurmctld notices when the node stops answering its pings (SlurmdTimeout: about 25 s with 10 s),
        then requeues the node's jobs; `scontrol update nodename=<node> state=down` tells it at once."""
        init = self.node_init_pid(node)
        if init:
            os.kill(init, signal.SIGKILL)
        self.procs.pop(node).wait(30)

    def restart_node(self, node, timeout: float = 60):
        """Start a killed node again and wait until it is back and idle."""
        self.start_node(node)
        # If it was marked down (scontrol refuses this for a node that was not).
        self.run("scontrol", "update", f"nodename={node}", "state=resume", check=False)
        self.wait_idle(timeout, nodes=(node,))

    def node_init_pid(self, node):
        """Host pid of the node's init (pid 1 of its PID namespace, parent of its slurmd), or None."""
        unshare = self.procs.get(node)
        if unshare is None or unshare.poll() is not None:
            return None
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        pids = children.read_text().split() if children.exists() else []
        return int(pids[0]) if pids else None

    def node_of(self, pid: int):
        """The node a host process runs on ('n1', 'n2'), or None (the host, or gone)."""
        try:
            ns = os.readlink(f"/proc/{pid}/ns/pid")
        except OSError:
            return None
        for n in NODES:
            init = self.node_init_pid(n)
            if init and ns == _readlink(f"/proc/{init}/ns/pid"):
                return n
        return None

    def wait_idle(self, timeout: float = 60, nodes=NODES):
        def idle():
            r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in nodes)
        self._wait(idle, timeout, f"nodes {', '.join(nodes)} to be idle in sinfo")

    def _wait(self, ready, timeout, what):
        """Wait for `ready()`; a daemon that exits meanwhile, or the timeout, raises with the logs."""
        def dead():
            return [n for n, p in self.procs.items() if p.poll() is not None]
        if not wait_until(lambda: dead() or ready(), timeout) or dead():
            why = f"{', '.join(dead())} exited" if dead() else f"timed out after {timeout:.0f} s"
            raise RuntimeError(f"local Slurm: waiting for {what}: {why}\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        """The last lines of every daemon log, for error messages."""
        out = []
        for log in sorted(self.root.glob("**/*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.relative_to(self.root)}\n" + "\n".join(tail))
        return "\n".join(out)

    def run(self, *args, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command (sbatch, squeue, ...) against this cluster."""
        r = subprocess.run([str(a) for a in args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(map(str, args))} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def job(self, job_id) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...)."""
        text = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(f.split("=", 1) for f in text.split() if "=" in f)

    def wait(self, job_id, timeout: float = 120) -> dict:
        """Poll until the job has ended (a final JobState, not completing); its `job` dict."""
        if not wait_until(lambda: self.job(job_id)["JobState"] in FINAL_STATES, timeout):
            raise TimeoutError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout:.0f} s")
        return self.job(job_id)

    def stop(self):
        """Cancel every job, stop the daemons this object started, by pid."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--partition=debug", check=False, timeout=30)
            wait_until(lambda: not self.run("squeue", "-h", check=False, timeout=30).stdout.strip(), 20)
        for name in (*NODES, "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            # unshare ignores SIGTERM while it waits for its child: a node is stopped through its init.
            pid = self.node_init_pid(name) if name in NODES else p.pid
            if pid:
                os.kill(pid, signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """A started two-node local Slurm (SlurmCluster); skips, or fails under LATENTVERSE_REQUIRE_CLUSTER=1,
    when this machine cannot run one."""
    reason = missing()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    cluster = SlurmCluster(tempfile.mkdtemp(prefix="lv-slurm-"))
    saved = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        shutil.rmtree(cluster.root, ignore_errors=True)
