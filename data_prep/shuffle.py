"""Hash-partitioned spill files between the two phases of the prep job.

Phase 1 (read + clean) runs on a slice of the input per slot and sends each record to the slot that
owns its content hash; phase 2 (dedup + split + write) on that slot then sees every copy of a poem,
whichever slot read it. Files are written under temporary names and renamed, then a marker.

    work/<slot>/to<dest>.pkl     pickled batches of records from `slot` for `dest`
    work/<slot>.done.json        slot finished phase 1 (its report and counts)
"""
from __future__ import annotations

import os
import pickle
import shutil
from typing import Iterator

from trainer.base.files import read_json, write_json_atomic

BATCH = 1024


class SpillWriter:
    def __init__(self, work: str, slot: int, n_dest: int):
        self.dir = os.path.join(work, str(slot))
        shutil.rmtree(self.dir, ignore_errors=True)  # leftovers of an unfinished attempt
        os.makedirs(self.dir)
        self.work, self.slot = work, slot
        self.files = [open(self._path(d) + ".tmp", "wb") for d in range(n_dest)]
        self.buffers: list[list] = [[] for _ in range(n_dest)]

    def _path(self, dest: int) -> str:
        return os.path.join(self.dir, f"to{dest}.pkl")

    def add(self, dest: int, item) -> None:
        buf = self.buffers[dest]
        buf.append(item)
        if len(buf) >= BATCH:
            pickle.dump(buf, self.files[dest], protocol=pickle.HIGHEST_PROTOCOL)
            buf.clear()

    def finish(self, info: dict) -> None:
        for dest, (f, buf) in enumerate(zip(self.files, self.buffers)):
            if buf:
                pickle.dump(buf, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.close()
            os.replace(self._path(dest) + ".tmp", self._path(dest))
        write_json_atomic(marker(self.work, self.slot), info)


def marker(work: str, slot: int) -> str:
    return os.path.join(work, f"{slot}.done.json")


def done(work: str, slot: int) -> dict | None:
    return read_json(marker(work, slot))


def read_for(work: str, dest: int, n_slots: int) -> Iterator:
    """Every item sent to `dest` by every slot."""
    for slot in range(n_slots):
        with open(os.path.join(work, str(slot), f"to{dest}.pkl"), "rb") as f:
            while True:
                try:
                    batch = pickle.load(f)
                except EOFError:
                    break
                yield from batch
