"""Rank-sliced MDS datasets: each rank writes its own sub-folder, a done-marker says it finished,
and the indexes are merged once every rank is done. Used by the prep job (text shards) and the
encode job (latent shards).

Layout under `root` (with splits; without, the rank folders sit directly under root):

    root/<split>/<rank>/index.json + shards   one rank's part, written by MDSWriter
    root/<split>/index.json                   merged index: StreamingDataset(local=root/<split>)
    root/_ranks/<rank>.json                   rank done-marker (written after its shards are final)
    root/_done.json                           the whole job finished (written after the merge)

Resume rule: a rank with a marker is skipped; a rank without one has its folders removed and is
redone from scratch, so after any kill every sample is written exactly once. A finished dataset
(`_done.json`) is left alone.

    ds = RankedDataset(root, columns, splits=("train", "val"))
    if not ds.complete():
        for rank in ranks_of_this_process:
            if ds.rank_done(rank) is None:
                with ds.rank_writer(rank) as w:       # clears leftovers of an unfinished attempt
                    w.write(sample, split="train")
                    w.finish({"count": ...})          # closes the shards, then writes the marker
        ds.wait_ranks(world_size); ds.merge(world_size); ds.mark_complete({...})
"""
from __future__ import annotations

import bisect
import json
import os
import re
import shutil
import time
from typing import Iterable, Optional

from trainer.base.config import UserError
from trainer.base.files import read_json, write_json_atomic
from trainer.base.log import get_logger
from trainer.data.remote import fetch_shard
from trainer.base.schema import DONE, ENCODE_RECORD

log = get_logger("mds")

MARKERS = "_ranks"
HASHES = ["xxh64"]   # per-shard hashes in index.json (streaming's MDSWriter), checked by `check_shards`
# The job records beside a dataset (the encode job's, the prep job's claim record): which command rebuilds it.
REBUILDERS = ((ENCODE_RECORD, "latentverse encode"), ("_job.json", "latentverse prep"))


def world_from_env() -> tuple[int, int]:
    """(rank, world_size) as set by a launcher (composer, torchrun, SLURM wrappers); (0, 1) alone."""
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"RANK / WORLD_SIZE must be integers, got {os.environ.get('RANK')!r} / "
                        f"{os.environ.get('WORLD_SIZE')!r}") from None
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world


def wait_for(paths: Iterable[str], timeout: float, poll: float = 0.5, what: str = "files") -> None:
    """Block until every path exists (ranks on other processes or nodes finish in their own time)."""
    paths = list(paths)
    deadline = time.monotonic() + timeout
    while True:
        missing = [p for p in paths if not os.path.exists(p)]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise UserError(f"timed out after {timeout:.0f} s waiting for {what}: {missing[0]} "
                            f"(and {len(missing) - 1} more)")
        time.sleep(poll)


def _mds_writer(out: str, columns: dict, compression, size_limit: int):
    from streaming import MDSWriter  # imported late: streaming pulls in torch, slow for --help
    return MDSWriter(out=out, columns=columns, compression=compression, size_limit=size_limit, hashes=HASHES)


def partition_name(key: str, value) -> str:
    """Folder name of a partition: `key=value`, the value lower-cased with anything but letters,
    digits, `-` and `_` replaced by `_` (an empty value is `none`)."""
    v = re.sub(r"[^a-z0-9_-]+", "_", str(value or "").strip().lower()).strip("_") or "none"
    return f"{key}={v}"


def _rebuild_hint(local: str) -> str:
    """How to rebuild the dataset that holds `local`: the job whose record lies in it or a folder above."""
    d = os.path.abspath(local)
    for _ in range(4):
        for record, command in REBUILDERS:
            if os.path.isfile(os.path.join(d, record)):
                return f"remove {d} and run the `{command}` that wrote it again (its config: {d}/{record})"
        d = os.path.dirname(d)
    return "rebuild it with the job that wrote it"


_checked: set = set()


def check_shards(local: str) -> None:
    """Compare every shard file of the dataset at `local` with the hash its index.json recorded; a
    changed file is refused in one line naming it and the command that rebuilds it. Shards written
    without hashes are not checked. Each index is checked once per process."""
    from streaming.base.hashing import get_hash

    index_file = os.path.join(local, "index.json")
    index = read_json(index_file)
    if index is None:
        return
    key = (os.path.abspath(index_file), os.path.getmtime(index_file))
    if key in _checked:
        return
    for shard in index["shards"]:
        for part in ("zip_data", "raw_data"):
            info = shard.get(part) or {}
            path = os.path.join(local, info.get("basename", ""))
            if not info.get("hashes") or not os.path.isfile(path):
                continue   # the raw file of a compressed shard exists only once a reader unpacked it
            with open(path, "rb") as f:
                data = f.read()
            for algo, want in info["hashes"].items():
                if get_hash(algo, data) != want:
                    raise UserError(f"{path}: corrupted shard (its {algo} hash is not the one in {index_file}); "
                                    f"{_rebuild_hint(local)}")
    _checked.add(key)


class RankWriter:
    """One rank's MDS writers, one per split, opened on first use."""

    def __init__(self, ds: "RankedDataset", rank: int):
        self.ds, self.rank = ds, rank
        self.writers: dict = {}
        self.counts: dict = {}
        self.finished = False

    def write(self, sample: dict, split: str | None = None, partition: str | None = None) -> None:
        """`partition` (a name from `partition_name`) puts the sample in <split>/<partition>/<rank>/, a
        dataset of its own after the merge (and part of the split's)."""
        if (split is None) != (not self.ds.splits):
            raise ValueError(f"split {split!r} does not fit splits {self.ds.splits}")
        w = self.writers.get((split, partition))
        if w is None:
            if split is not None and split not in self.ds.splits:
                raise ValueError(f"unknown split {split!r}; splits: {self.ds.splits}")
            w = self.writers[(split, partition)] = _mds_writer(self.ds.rank_dir(self.rank, split, partition),
                                                               self.ds.columns, self.ds.compression,
                                                               self.ds.size_limit)
        w.write(sample)
        self.counts[split or ""] = self.counts.get(split or "", 0) + 1

    def finish(self, info: dict | None = None) -> dict:
        """Finalise every shard (a split this rank never wrote gets an empty index, so the merge
        sees every rank), then write the marker: the marker exists only over complete shards."""
        for split in (self.ds.splits or (None,)):
            if (split, None) not in self.writers:
                self.writers[(split, None)] = _mds_writer(self.ds.rank_dir(self.rank, split), self.ds.columns,
                                                  self.ds.compression, self.ds.size_limit)
        for w in self.writers.values():
            w.finish()
        marker = {"rank": self.rank, "counts": self.counts, "info": info or {}}
        write_json_atomic(self.ds.marker(self.rank), marker)
        self.finished = True
        return marker

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # On an error the shards stay unfinished and there is no marker: the rank is redone.
        return False


class RankedDataset:
    def __init__(self, root: str, columns: dict, splits: Iterable[str] | None = None,
                 compression: str | None = "zstd", size_limit: int = 1 << 26):
        self.root = root
        self.columns = dict(columns)
        self.splits = tuple(splits) if splits else ()
        self.compression = compression
        self.size_limit = size_limit

    # paths
    def rank_dir(self, rank: int, split: str | None = None, partition: str | None = None) -> str:
        base = os.path.join(self.root, split) if split else self.root
        return os.path.join(base, partition, str(rank)) if partition else os.path.join(base, str(rank))

    def partitions(self, split: str | None = None) -> list[str]:
        """The partition folders (`key=value`) present under a split, sorted."""
        base = os.path.join(self.root, split) if split else self.root
        return sorted(e for e in os.listdir(base) if "=" in e and os.path.isdir(os.path.join(base, e))) \
            if os.path.isdir(base) else []

    def marker(self, rank: int) -> str:
        return os.path.join(self.root, MARKERS, f"{rank}.json")

    def index(self, split: str | None = None) -> str:
        return os.path.join(self.root, split, "index.json") if split else os.path.join(self.root, "index.json")

    # state
    def complete(self) -> dict | None:
        return read_json(os.path.join(self.root, DONE))

    def rank_done(self, rank: int) -> dict | None:
        return read_json(self.marker(rank))

    def rank_writer(self, rank: int) -> RankWriter:
        """Writers for `rank`, after removing whatever an unfinished earlier attempt left."""
        if self.rank_done(rank) is not None:
            raise RuntimeError(f"rank {rank} of {self.root} is already done")
        for split in (self.splits or (None,)):
            shutil.rmtree(self.rank_dir(rank, split), ignore_errors=True)
            for part in self.partitions(split):
                shutil.rmtree(self.rank_dir(rank, split, part), ignore_errors=True)
        return RankWriter(self, rank)

    def wait_ranks(self, n_slots: int, timeout: float = 24 * 3600.0) -> list[dict]:
        wait_for([self.marker(r) for r in range(n_slots)], timeout, what=f"rank markers in {self.root}")
        return [self.rank_done(r) for r in range(n_slots)]

    def merge(self, n_slots: int) -> None:
        """Merge the ranks' indexes into one per split, ranks in order. Same result as streaming's
        `merge_index` (shard basenames prefixed with the rank folder), but written atomically and
        without its temporary copies, so a kill mid-merge leaves no half index."""
        def prefixed(index_file: str, prefix: str) -> list:
            obj = read_json(index_file)
            shards = obj["shards"] if obj is not None else []
            for shard in shards:
                for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                    if shard.get(key):
                        shard[key]["basename"] = f"{prefix}/{shard[key]['basename']}"
            return shards

        for split in (self.splits or (None,)):
            shards = []
            for r in range(n_slots):
                part = os.path.join(self.rank_dir(r, split), "index.json")
                if not os.path.exists(part):
                    raise UserError(f"cannot merge {self.index(split)}: missing {part}")
                shards += prefixed(part, str(r))
            base = os.path.dirname(self.index(split))
            for p in self.partitions(split):
                # A rank with no sample of this partition wrote no folder for it.
                own = [s for r in range(n_slots) for s in prefixed(os.path.join(self.rank_dir(r, split, p), "index.json"), str(r))]
                write_json_atomic(os.path.join(base, p, "index.json"), {"version": 2, "shards": own})
                shards += prefixed(os.path.join(base, p, "index.json"), p)
            write_json_atomic(self.index(split), {"version": 2, "shards": shards})

    def mark_complete(self, info: dict) -> None:
        write_json_atomic(os.path.join(self.root, DONE), info)

    def claim(self, fingerprint: str, record: dict, overwrite: bool, rank: int, job_file: str,
              what: str, also_remove: Iterable[str] = (), wait_timeout: float = 24 * 3600.0) -> dict | None:
        """Tie root to one job config (its `fingerprint`, recorded with `record` in root/job_file).

        Returns the completion info when this config already finished here (nothing to do), else
        None, after rank 0 recorded the config (other ranks wait for the record). Root written with
        another config is refused with one line, unless `overwrite`: then rank 0 removes the earlier
        run (shards, markers, the record and `also_remove`, paths under root)."""
        path = os.path.join(self.root, job_file)
        old = read_json(path)
        if old is not None and old.get("fingerprint") != fingerprint:
            if not overwrite:
                raise UserError(f"{self.root}: holds {what} of another config or slot count "
                                f"({old.get('fingerprint')} != {fingerprint}); use another out_dir or overwrite=true")
            if rank == 0:
                log.warning(f"{self.root}: overwrite=true: removing the earlier run")
                self.reset()
                for name in (job_file, *also_remove):
                    p = os.path.join(self.root, name)
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.remove(p)
            old = None
        done = self.complete()
        if done is not None and old is not None:
            return done
        if rank == 0:
            write_json_atomic(path, {**record, "fingerprint": fingerprint})
        else:
            wait_for([path], wait_timeout, what="rank 0 to start the job")
        return None

    def reset(self) -> None:
        """Forget every rank (a changed config or world size): remove shards, markers and indexes."""
        for name in (self.splits or ()):
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if not self.splits:
            for entry in os.listdir(self.root) if os.path.isdir(self.root) else ():
                if entry.isdigit():
                    shutil.rmtree(os.path.join(self.root, entry), ignore_errors=True)
            if os.path.exists(self.index()):
                os.remove(self.index())
        shutil.rmtree(os.path.join(self.root, MARKERS), ignore_errors=True)
        for f in (DONE,):
            if os.path.exists(os.path.join(self.root, f)):
                os.remove(os.path.join(self.root, f))


def spread_indices(n: int, limit: int) -> list[int]:
    """`limit` indices evenly spaced over n rows (all of them when there are no more): a split written
    partition after partition (the encode job's form=..., one after another) is sampled across every
    partition, where its first or last rows would be one partition only."""
    if limit >= n:
        return list(range(n))
    return [round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)]


class LocalMDS:
    """Random access to a local MDS dataset without StreamingDataset's shared memory.

    Several processes opening StreamingDatasets at the same moment can race for the same shared-
    memory prefix (FileExistsError on /dev/shm/NNNNNN_locals); a job that only reads local shards in
    order does not need that machinery. Compressed shards are decompressed next to their zip file
    (to a temporary name, then renamed, so concurrent readers never see half a file), as streaming
    itself does."""

    def __init__(self, local: str):
        from streaming.base.format import reader_from_json

        index = read_json(os.path.join(local, "index.json"))
        if index is None:
            raise UserError(f"{local}: no MDS dataset (index.json missing)")
        check_shards(local)
        self.local = local
        self.readers = [reader_from_json(local, None, shard) for shard in index["shards"]]
        self.starts = []
        n = 0
        for r in self.readers:
            self.starts.append(n)
            n += r.samples
        self.n = n
        self._ready: set = set()

    def __len__(self) -> int:
        return self.n

    def spread(self, limit: int) -> list[int]:
        """`limit` indices evenly spaced over the dataset: spread_indices."""
        return spread_indices(self.n, limit)

    def _prepare(self, k: int) -> None:
        if k in self._ready:
            return
        r = self.readers[k]
        raw = os.path.join(self.local, r.raw_data.basename)
        if not os.path.exists(raw):   # a cache folder of shards in a bucket: fetch the shard first

            part = r.zip_data or r.raw_data
            if not os.path.exists(os.path.join(self.local, part.basename)):
                fetch_shard(self.local, part.basename)
        if not os.path.exists(raw) and r.zip_data is not None:
            from streaming.base.compression import decompress

            with open(os.path.join(self.local, r.zip_data.basename), "rb") as f:
                data = decompress(r.compression, f.read())
            tmp = f"{raw}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, raw)
        self._ready.add(k)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        k = bisect.bisect_right(self.starts, i) - 1
        self._prepare(k)
        return self.readers[k].get_item(i - self.starts[k])


def read_texts(local: str, column: str, limit: Optional[int] = None, spread: bool = False) -> list[str]:
    """The first `limit` texts of a split, in order, or with `spread` `limit` texts evenly spaced over
    it (LocalMDS: reads the prep job's zstd shards, and needs no shared memory for a one-off read)."""
    with open(os.path.join(local, "index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        if column not in shard.get("column_names", [column]):
            raise UserError(f"{local}: shards have no column {column!r} (data.text_column)")
    ds = LocalMDS(local)
    n = len(ds) if limit is None else min(len(ds), limit)
    return [ds[i][column] for i in (ds.spread(n) if spread else range(n))]
