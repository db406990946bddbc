"""Real launches on this machine: `latentverse launch` starts the Composer launcher(s), which start
`latentverse train` (the autoencoder trainer) on tiny text shards with gloo on CPU.

  - local backend: one launcher, 2 processes;
  - torchrun backend: one torchrun, 2 processes (through launch.worker);
  - composer backend on loopback: two launchers (nodes 0 and 1, 1 process each, world size 2,
    master 127.0.0.1, a free port), as two machines would run them.

Each trains a few batches and writes one checkpoint whose saved RNG states come from both ranks,
and every process says (in its log) that it joined the process group with the run YAML's
`compute.dist_timeout` and got its `compute.env` (an NCCL_* setting).
"""
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from launch.launcher import build
from launch.run_yaml import load_run

from .conftest import ROOT, free_port, run_cli

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

BATCHES = 3
DIST_TIMEOUT = 77  # seconds; not Composer's 300


def _texts(n: int) -> list[str]:
    words = "sea wind night rose stone light river moon bell field snow ash".split()
    return [f"the {words[i % 12]} and the {words[(i * 5) % 12]}\n{words[(i * 7) % 12]} under {words[(i * 3) % 12]}"
            for i in range(n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny text shards in the prep job's layout: <dir>/train/, <dir>/val/ (TEXT_COLUMNS)."""
    from streaming import MDSWriter

    from trainer.base.schema import LABELS, TEXT_COLUMNS

    root = tmp_path_factory.mktemp("text_shards")
    for split, n in (("train", 48), ("val", 8)):
        with MDSWriter(out=str(root / split), columns=TEXT_COLUMNS) as w:
            for i, text in enumerate(_texts(n)):
                w.write({"id": f"{split}-{i}", "text": text, "prompt": "", "source": "jsonl",
                         **{k: "" for k in LABELS}, "n_tokens": len(text.split())})
    return root


def _run_yaml(tmp_path, shards, compute: dict) -> str:
    run = {
        "job": "train",
        "task": "autoencoder",
        "out_dir": str(tmp_path / "ae"),
        "run_name": "launch-test",
        "data": {"path": str(shards), "eval_samples": 4},
        "tokenizer": {"kind": "bpe", "vocab_size": 300, "min_frequency": 1},
        "model": {"max_tokens": 24, "num_latents": 8, "dim_latent": 16, "d_model": 32, "encoder_layers": 1,
                  "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 64, "perceiver_depth": 1,
                  "perceiver_heads": 2, "perceiver_dim_head": 16, "reconstruction_depth": 1},
        "batch_size": 4,  # global: 2 per rank
        "max_duration": f"{BATCHES}ba",
        "eval_interval": f"{BATCHES}ba",
        "save_interval": f"{BATCHES}ba",
        "precision": "fp32",
        "threads": 1,
        # LATENTVERSE_LOG_ALL_RANKS: rank 1 logs too, so its log shows what reached it.
        "compute": {"env": {"OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN", "LATENTVERSE_LOG_ALL_RANKS": "1"},
                    "dist_timeout": DIST_TIMEOUT, **compute},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return str(path)


def _check_trained_on_two_ranks(tmp_path, launches=1):
    import torch

    out = tmp_path / "ae"
    ckpts = [p for p in glob.glob(str(out / "checkpoints" / "*.pt")) if not os.path.islink(p)]
    assert [os.path.basename(p) for p in ckpts] == [f"ep0-ba{BATCHES}-rank0.pt"]
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    # Composer gathers every rank's RNG state into the checkpoint: one per process.
    assert len(state["rng"]) == 2
    ts = state["state"]["timestamp"]
    ts = ts.get("Timestamp", ts)
    # samples are counted over all ranks: 2 ranks x 2 per rank x BATCHES
    assert (ts["batch"], ts["sample"]) == (BATCHES, 4 * BATCHES)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["batches"] == BATCHES
    # Each launch wrote the job part (no compute/job keys) to its own file and ran the job from it.
    jobs = glob.glob(str(out / "launch" / "job-*.yaml"))
    assert len(jobs) == launches
    for path in jobs:
        job = yaml.safe_load(open(path).read())
        assert "compute" not in job and "job" not in job and job["run_name"] == "launch-test"


def _check_group_settings(log: str):
    """Both ranks joined the group with the YAML's timeout (read back from the group) and its NCCL env."""
    ranks = re.findall(rf"rank (\d): process group gloo, world size 2, timeout {DIST_TIMEOUT} s; NCCL_DEBUG=WARN$",
                       log, re.M)
    assert sorted(ranks) == ["0", "1"], log[-3000:]


def test_local_two_processes(tmp_path, shards):
    run = _run_yaml(tmp_path, shards, {"backend": "local", "procs_per_node": 2})
    r = run_cli("launch", run, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_trained_on_two_ranks(tmp_path)
    # rank 1 ran under the same launcher; its output is kept beside the job YAML
    rank1 = (tmp_path / "ae" / "launch" / "logs" / "rank1.stderr.txt").read_text()
    _check_group_settings(r.stderr + rank1)


# Two "nodes" on one machine would share /dev/shm, where streaming's node leaders register their
# shared memory under fixed names (they collide); real machines each have their own. Node 1 gets a
# private /dev/shm in its own mount namespace -- the one thing that is emulated here.
PRIVATE_SHM = ["unshare", "-rm", "sh", "-c", 'mount -t tmpfs tmpfs /dev/shm && exec "$@"', "node1"]


def _private_shm_works() -> bool:
    try:
        return subprocess.run([*PRIVATE_SHM, "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_two_nodes_on_loopback(tmp_path, shards):
    if not _private_shm_works():
        why = "needs `unshare -rm` (a private /dev/shm for the second emulated node)"
        if os.environ.get("LATENTVERSE_REQUIRE_CLUSTER") == "1":   # CI (.ci/run): the namespaces are there
            pytest.fail(why)
        pytest.skip(why)
    port = free_port()
    run = _run_yaml(tmp_path, shards, {"backend": "composer", "nodes": 2, "procs_per_node": 1,
                                       "master_addr": "127.0.0.1", "master_port": port})
    # Autoresume stays ON with both nodes on one disk: Composer 0.32.1 gives every node rank 0's signal
    # file name and the nodes race to delete it (mosaicml/llm-foundry#1736) unless
    # trainer/training/composer_fixes.py gives each node its own.
    assert yaml.safe_load(open(run)).get("autoresume", True)
    # What each node runs: its own Composer launcher, world size 2, its node rank, the same master.
    for rank in (0, 1):
        (cmd,) = build(load_run(run), dry_run=True, node_rank=rank).commands
        argv = shlex.split(shlex.join(cmd.argv))
        argv = argv[next(i for i, a in enumerate(argv) if a.startswith("--")):]  # past `env K=V ... composer`
        f = dict(zip(argv[0::2], argv[1::2]))
        assert (f["--world_size"], f["--nproc"], f["--node_rank"]) == ("2", "1", str(rank))
        assert (f["--master_addr"], f["--master_port"]) == ("127.0.0.1", str(port))
    # Both nodes for real, each started the way a user starts it on its machine.
    procs, logs = [], []
    for rank, prefix in ((0, []), (1, PRIVATE_SHM)):
        logs.append(open(tmp_path / f"launch_node{rank}.txt", "w"))
        procs.append(subprocess.Popen([*prefix, sys.executable, "-m", "launch.cli", "launch", run, "--node-rank",
                                       str(rank)], cwd=ROOT, stdout=logs[-1], stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    out = {r: (tmp_path / f"launch_node{r}.txt").read_text() for r in (0, 1)}
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    _check_trained_on_two_ranks(tmp_path, launches=2)  # one per node
    _check_group_settings(out[0] + out[1])


def test_torchrun_two_processes(tmp_path, shards):
    # torchrun names the node rank GROUP_RANK and shares one store between process groups:
    # launch.worker bridges both (a checkpoint from 2 ranks says it did).
    run = _run_yaml(tmp_path, shards, {"backend": "torchrun", "procs_per_node": 2})
    r = run_cli("launch", run, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _check_trained_on_two_ranks(tmp_path)
    _check_group_settings(r.stderr)
