"""Faults for the tests, injected from outside the product.

A test that wants a process to fail puts this folder first on that process's PYTHONPATH
(`tests.faults.env(...)` builds the environment) and arms a fault with an environment variable.
Python imports this file at start-up (it is `sitecustomize`), and so does every process the job
starts (spawned or forked). Nothing in trainer/, data_prep/ or launch/ knows about faults.

Training (a callback added to every Composer Trainer the process makes, through Composer's public
`callbacks` argument; the checkpoint fault wraps torch.save, which Composer's own writer calls):

    LATENTVERSE_FAULT_KILL_AT_BATCH=N         SIGKILL right after batch N's optimizer step (before
                                              its checkpoint), as when a node dies
    LATENTVERSE_FAULT_KILL_GROUP=1            ... the whole process group (Python's resource tracker too)
    LATENTVERSE_FAULT_NAN_AT_BATCH=N          batch N's loss becomes NaN
    LATENTVERSE_FAULT_NAN_RANK=R              ... on rank R only (default: every rank)
    LATENTVERSE_FAULT_KILL_IN_CHECKPOINT=N    SIGKILL inside Composer's real write of batch N's checkpoint,
                                              once half its bytes are on disk

Rank-sliced datasets (the prep job's text shards, the encode job's MDS latent shards: every
`trainer.data.mds.RankWriter`, whose rank is the job's slot):

    LATENTVERSE_FAULT_KILL_AFTER_RECORDS=N    a slot's writer SIGKILLs its process right after its Nth
                                              record, its shards unfinished and without a done-marker
    LATENTVERSE_FAULT_KILL_SLOT=S             ... only slot S's writer (default: any slot's)
    LATENTVERSE_FAULT_KILL_WAITS_FOR=0,2      ... and only once these slots have their done-markers (in a
                                              process pool one death takes the siblings down; this is
                                              a kill after they finished)

A record, not a fault (nothing the job computes is changed):

    LATENTVERSE_FAULT_RECORD_SAMPLES=DIR      the latents the training job's PoemSampler samples, before
                                              decoding, saved as DIR/batch-<B>.pt
"""
import os

PREFIX = "LATENTVERSE_FAULT_"


def _int(name):
    v = os.environ.get(PREFIX + name, "")
    return int(v) if v.strip() else None


def _fault_callbacks():
    import signal

    import torch
    from composer.core import Callback

    kill_at, nan_at, nan_rank = _int("KILL_AT_BATCH"), _int("NAN_AT_BATCH"), _int("NAN_RANK")

    class KillAtBatch(Callback):
        def batch_end(self, state, logger):
            if int(state.timestamp.batch) == kill_at:
                if os.environ.get(PREFIX + "KILL_GROUP") == "1":
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    class NaNAtBatch(Callback):
        def after_loss(self, state, logger):
            if int(state.timestamp.batch) + 1 == nan_at and nan_rank in (None, int(os.environ.get("RANK", 0))):
                state.loss = state.loss * torch.tensor(float("nan"))

    return ([KillAtBatch()] if kill_at is not None else []) + ([NaNAtBatch()] if nan_at is not None else [])


class _DiesHalfWay:
    """A file that passes `budget` bytes on to `f`, flushes them to disk, then SIGKILLs the process."""

    def __init__(self, f, budget: int):
        self.f, self.left = f, budget

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) < self.left:
            self.left -= len(data)
            return self.f.write(data)
        import signal
        import sys

        self.f.write(data[: self.left])
        self.f.flush()
        os.fsync(self.f.fileno())
        print(f"fault: SIGKILL inside the checkpoint write of {self.f.name}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def flush(self):
        self.f.flush()


def _kill_inside_checkpoint_write(at):
    """torch.save (public; Composer's own checkpoint code calls it on the file it opened) passes, for the
    checkpoint of batch `at` only, half of the serialized bytes to that file and SIGKILLs the process:
    a crash in the middle of Composer's real write. Nothing of Composer is replaced."""
    import io
    import re

    import torch

    save = torch.save
    target = re.compile(rf"-ba{at}(-|\.|$)")

    def save_and_die_half_way(obj, f, *args, **kwargs):
        if not (hasattr(f, "write") and target.search(os.path.basename(str(getattr(f, "name", ""))))):
            return save(obj, f, *args, **kwargs)
        size = io.BytesIO()
        save(obj, size, *args, **kwargs)                # how many bytes the whole checkpoint takes
        save(obj, _DiesHalfWay(f, size.tell() // 2), *args, **kwargs)

    torch.save = save_and_die_half_way


def _install():
    import composer

    init = composer.Trainer.__init__

    def __init__(self, *args, callbacks=None, **kwargs):
        given = list(callbacks) if isinstance(callbacks, (list, tuple)) else ([callbacks] if callbacks else [])
        init(self, *args, callbacks=_fault_callbacks() + given, **kwargs)   # first: before the loss guard

    composer.Trainer.__init__ = __init__
    at = _int("KILL_IN_CHECKPOINT")
    if at is not None:
        _kill_inside_checkpoint_write(at)


def _kill_after_records(n, slot, waits_for):
    """RankWriter.write followed, once the writer of `slot` (any when None) holds n records, by a
    wait for the done-markers of the slots `waits_for` and a SIGKILL of this process."""
    import signal
    import sys

    from trainer.data import mds

    write = mds.RankWriter.write

    def write_then_die(self, *args, **kwargs):
        write(self, *args, **kwargs)
        if (slot is None or self.rank == slot) and sum(self.counts.values()) == n:
            mds.wait_for([self.ds.marker(s) for s in waits_for], 300, what="the slots that finish first")
            print(f"fault: slot {self.rank} SIGKILLs its process after {n} records", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    mds.RankWriter.write = write_then_die


def _record_samples(folder):
    """Wraps the sampler the PoemSampler callback calls: its output is saved, then returned as it is."""
    import torch

    from trainer.training import callbacks

    sample, sampler, batch = callbacks.PoemSampler._sample, callbacks.edm_sampler, [None]

    def _sample(self, state):
        batch[0] = int(state.timestamp.batch)
        return sample(self, state)

    def edm_sampler(*args, **kwargs):
        x = sampler(*args, **kwargs)
        os.makedirs(folder, exist_ok=True)
        torch.save(x.detach().cpu().clone(), os.path.join(folder, f"batch-{batch[0]}.pt"))
        return x

    callbacks.PoemSampler._sample, callbacks.edm_sampler = _sample, edm_sampler


if any(_int(name) is not None for name in ("KILL_AT_BATCH", "NAN_AT_BATCH", "KILL_IN_CHECKPOINT")):
    _install()
if _int("KILL_AFTER_RECORDS") is not None:
    _kill_after_records(_int("KILL_AFTER_RECORDS"), _int("KILL_SLOT"),
                        [int(s) for s in os.environ.get(PREFIX + "KILL_WAITS_FOR", "").split(",") if s.strip()])
if os.environ.get(PREFIX + "RECORD_SAMPLES"):
    _record_samples(os.environ[PREFIX + "RECORD_SAMPLES"])
