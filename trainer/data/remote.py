"""Shards in object storage, read through a node-local cache.

`stream_local(uri)` is the cache folder a StreamingDataset uses as `local` for `remote=uri`: the index
(fetched fresh at every start; a changed index empties the folder) and latent_stats.json are copied
there first, and the shards arrive as streaming reads them. LocalMDS (one-off reads: the prompt mean,
the samples of an evaluation) fetches a shard missing from such a folder itself.

Streaming refuses two live datasets with one `local` folder and a remote (their shared memory would
clash), so a process holds a slot of the URI's cache, <cache>/<hash of uri>/stream-<k>, under an flock:
a second job on the node takes the next slot, and a later job reuses a free slot's shards. The ranks of
one multi-process job (WORLD_SIZE > 1) share the slot named by its MASTER_PORT.

`shared_memory_lock()`: streaming picks a dataset's shared-memory prefix by looking for a free one and
then creating it, so two jobs starting at once on one node can pick the same one (FileExistsError
'/000850_locals'); the local leader of each job builds its dataset under one node-wide flock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile

from trainer.base import uris
from trainer.base.files import read_json
from trainer.base.schema import DONE, LATENT_STATS

_slots: dict = {}     # uri -> (local folder, open lock file)
_remote_of: dict = {}  # local folder -> uri


def remote_of(local: str):
    return _remote_of.get(os.path.abspath(local))


def _slot(uri: str) -> str:
    base = uris.cache_dir(uri)
    os.makedirs(base, exist_ok=True)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_PORT"):
        return os.path.join(base, f"job-{os.environ['MASTER_PORT']}")
    for k in range(1024):
        lock = open(os.path.join(base, f"stream-{k}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _slots[uri] = (os.path.join(base, f"stream-{k}"), lock)   # held until the process ends
        return _slots[uri][0]
    raise RuntimeError(f"{base}: no free cache slot")


def stream_local(uri: str, key: str = "") -> str:
    """The node-local cache folder for the shards at `uri`, with its index.json fresh from the bucket."""
    if uri in _slots:
        return _slots[uri][0]
    local = _slot(uri)
    os.makedirs(local, exist_ok=True)
    index = os.path.join(local, "index.json")
    new = uris.download(uris.join(uri, "index.json"), f"{index}.new", key or uri)
    if read_json(new) != read_json(index):    # another dataset under this name: its shards are stale
        for entry in os.listdir(local):
            p = os.path.join(local, entry)
            if p != new:
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.replace(new, index)
    uris.download_tree(uri, local, key, only=[LATENT_STATS])
    _slots.setdefault(uri, (local, None))
    _remote_of[os.path.abspath(local)] = uri
    return local


def fetch_shard(local: str, basename: str) -> bool:
    """Copy one shard file of a cached dataset from its bucket; False when `local` is no cache folder."""
    uri = remote_of(local)
    if uri is None:
        return False
    uris.download(uris.join(uri, basename), os.path.join(local, basename))
    return True


@contextlib.contextmanager
def shared_memory_lock():
    """Held by each job's local leader (LOCAL_RANK 0 or unset) while it builds a StreamingDataset: one
    job at a time picks and registers its shared-memory prefix on this node. The other ranks of a job
    take no lock (they wait for their leader inside streaming)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        yield
        return
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()   # where the names live
    with open(os.path.join(folder, "latentverse-streaming-prefix.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_through_stage(cfg, run, fingerprint: str, result: str = "_done.json") -> dict:
    """Run a shard-writing job (prep, encode) whose `cfg.out_dir` is a URI: it writes to a node-local
    stage folder (<cache>/<hash of the URI>/stage) under the local rules (finished slots kept on a
    rerun, another config refused without `overwrite`), then rank 0 uploads the folder: shards first,
    then the index files, the done marker `_done.json` last, so a reader that finds the marker finds
    every shard. A bucket that already holds the marker of this config is not written again (`result`,
    the job's summary there, is returned). Every rank must be on one node: the stage is its disk."""
    from trainer.base.config import UserError
    from trainer.base.log import get_logger

    uri = cfg.out_dir
    uris.check(uri, "out_dir")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > int(os.environ.get("LOCAL_WORLD_SIZE", world)):
        raise UserError(f"out_dir: {uri}: a URI out_dir is written from one node ({world} ranks over several "
                        "started); use a local out_dir on a shared disk, or one node")
    if DONE in uris.list_keys(uri, "out_dir"):
        done = read_json(uris.download(uris.join(uri, DONE), uris.cache_dir(uri, "done.json"), "out_dir"))
        if done.get("fingerprint") == fingerprint:
            get_logger("data").info(f"{uri}: finished earlier; nothing to do")
            return read_json(uris.download(uris.join(uri, result), uris.cache_dir(uri, "result.json"), "out_dir"))
        if not cfg.overwrite:
            raise UserError(f"out_dir: {uri} holds the shards of another config; set overwrite=true to replace "
                            "them, or use another out_dir")
    import dataclasses

    stage = uris.cache_dir(uri, "stage")
    os.makedirs(stage, exist_ok=True)
    out = run(dataclasses.replace(cfg, out_dir=stage))
    if int(os.environ.get("RANK", "0")) == 0:
        files = [os.path.relpath(os.path.join(d, f), stage) for d, _, fs in os.walk(stage) for f in fs]
        indexes = sorted(f for f in files if os.path.basename(f) == "index.json")
        uris.upload_tree(stage, uri, "out_dir", last=[*indexes, DONE])
    return out
