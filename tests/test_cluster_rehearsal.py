"""The cluster rehearsal: the whole chain (yamls/runs/chain_tiny_cpu_slurm.yaml) on the local two-node
Slurm of tests/slurm_cluster.py, 2 nodes x 2 processes (gloo), every output in the cluster's shared
folder, FSDP2 with sharded checkpoints for the diffusion stages, autoresume on.

1. uninterrupted: every stage COMPLETED, each after the one before;
2. node n2 killed (SIGKILL to every process of the node) during masked pretraining, after its first
   checkpoint: Slurm requeues the job, it resumes from the last complete checkpoint, and the exported
   EMA denoisers (both diffusion stages) equal run 1's tensor for tensor;
3. preempted by the warning signal (USR1 to the batch script) during masked pretraining: the job
   checkpoints at the next batch, requeues itself, resumes; the sample log shows every batch once with
   the same samples as run 1, and the exports again equal run 1's.

Runs 2 and 3 differ from run 1 from the masked pretraining on; the test prints where each interruption
landed and the wall times."""
import json
import re
import time

import pytest
import torch

from tests.slurm_cluster import wait_until

from .conftest import ROOT, run_cli

pytestmark = [pytest.mark.cluster, pytest.mark.rehearsal, pytest.mark.slow, pytest.mark.timeout(3600)]

CHAIN = f"{ROOT}/yamls/runs/chain_tiny_cpu_slurm.yaml"
STAGES = ("prep", "autoencoder", "encode", "pretrain_masked", "finetune_unmasked", "evaluate")
EXPORTS = ("pretrain_masked/denoiser", "finetune_unmasked/denoiser")   # each stage's EMA export


def launch_chain(cluster, out) -> dict:
    r = run_cli("launch", CHAIN, f"out_dir={out}", env=cluster.env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ids = dict(re.findall(r"^stage (\w+): slurm job (\d+)$", r.stdout, re.M))
    assert list(ids) == list(STAGES), r.stdout
    assert json.load(open(out / "chain.json"))["stages"]["evaluate"]["job_id"] == ids["evaluate"]
    return ids


def wait_chain(cluster, out, ids, timeout=1800) -> dict:
    """Wait for every stage; each must have COMPLETED (with its log in the failure message)."""
    infos = {}
    for name in STAGES:
        infos[name] = cluster.wait(ids[name], timeout=timeout)
        if infos[name]["JobState"] != "COMPLETED":
            logs = sorted((out / name / "launch").glob("**/*.txt")) + sorted((out / name / "launch").glob("*.out"))
            tail = "\n".join(f"--- {p}\n{p.read_text()[-1500:]}" for p in logs)
            pytest.fail(f"stage {name} (job {ids[name]}): {infos[name]['JobState']} {infos[name]['ExitCode']}\n{tail}")
    return infos


def batches_done(out) -> int:
    """The last batch masked pretraining logged (rank 0's sample log)."""
    path = out / "pretrain_masked" / "sample_log-rank0.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return rows[-1]["batch"] if rows else 0


def checkpoints(out) -> list[str]:
    ck = out / "pretrain_masked" / "checkpoints"
    return sorted(p.name for p in ck.glob("ep*-ba*")) if ck.exists() else []


def denoiser(path):
    from trainer.pipeline.export import load_denoiser

    net, meta = load_denoiser(str(path))
    return meta, {k: v.clone() for k, v in net.state_dict().items()}


def assert_same_exports(a, b):
    for rel in EXPORTS:
        (ma, wa), (mb, wb) = denoiser(a / rel), denoiser(b / rel)
        assert ma["weights"] == mb["weights"] == "ema"
        assert wa.keys() == wb.keys() and len(wa) > 10
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{rel}: {len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"


def sample_log(out, world=4) -> dict:
    """(batch, rank) -> the sample ids of that batch on that rank; a batch logged twice fails."""
    seen = {}
    for r in range(world):
        for line in (out / "pretrain_masked" / f"sample_log-rank{r}.jsonl").read_text().splitlines():
            row = json.loads(line)
            assert (row["batch"], r) not in seen, f"batch {row['batch']} logged twice on rank {r}"
            seen[row["batch"], r] = row["sample_index"]
    return seen


def wait_for_batch(cluster, out, job, after: int, timeout=900):
    """Until masked pretraining has a checkpoint and has logged a batch past `after`; the batch."""
    ok = wait_until(lambda: checkpoints(out) and batches_done(out) > after
                    or cluster.job(job)["JobState"] not in ("PENDING", "RUNNING"), timeout, every=0.1)
    assert ok and cluster.job(job)["JobState"] == "RUNNING", (cluster.job(job), checkpoints(out))
    return batches_done(out)


def test_chain_survives_a_dead_node_and_a_preemption_with_the_same_weights(slurm_cluster):
    cluster, times = slurm_cluster, {}

    t = time.monotonic()
    ref = cluster.shared / "uninterrupted"
    ids = launch_chain(cluster, ref)
    infos = wait_chain(cluster, ref, ids)
    times["uninterrupted"] = time.monotonic() - t
    assert infos["pretrain_masked"]["Restarts"] == "0"
    ref_log = sample_log(ref)
    assert max(b for b, _ in ref_log) == 12

    # ---- a node dies during masked pretraining
    t = time.monotonic()
    killed = cluster.shared / "killed"
    ids = launch_chain(cluster, killed)
    job = ids["pretrain_masked"]
    at = wait_for_batch(cluster, killed, job, after=5)     # past the checkpoint of batch 4
    ckpts = checkpoints(killed)
    cluster.kill_node("n2")
    cluster.run("scontrol", "update", "nodename=n2", "state=down", "reason=rehearsal")
    assert wait_until(lambda: cluster.job(job)["Restarts"] == "1", 60), cluster.job(job)
    cluster.restart_node("n2")
    wait_chain(cluster, killed, ids)
    times["killed"] = time.monotonic() - t
    print(f"\nkill: node n2 SIGKILLed at batch {at} of 12 of masked pretraining (checkpoints then: {ckpts}); "
          f"requeued by Slurm, resumed, finished")
    assert cluster.job(job)["Restarts"] == "1"
    assert_same_exports(ref, killed)
    assert sample_log(killed) == ref_log

    # ---- preempted: the warning signal to the batch script
    t = time.monotonic()
    pre = cluster.shared / "preempted"
    ids = launch_chain(cluster, pre)
    job = ids["pretrain_masked"]
    at = wait_for_batch(cluster, pre, job, after=5)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    assert wait_until(lambda: cluster.job(job)["Restarts"] == "1", 300), cluster.job(job)
    stopped = checkpoints(pre)
    wait_chain(cluster, pre, ids)
    times["preempted"] = time.monotonic() - t
    out = (pre / "pretrain_masked" / "launch").glob("slurm-*.out")
    text = "".join(p.read_text() for p in out)
    assert "latentverse: requeue job" in text, text[-3000:]
    log = sample_log(pre)
    print(f"preemption: USR1 at batch {at}; checkpoints when requeued: {stopped}; sample log: "
          f"{len(log)} (batch, rank) entries, batches 1..{max(b for b, _ in log)}, each once, same as uninterrupted")
    assert log == ref_log           # no batch lost or seen twice, the same samples in each
    assert_same_exports(ref, pre)
    print("wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
