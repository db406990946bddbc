"""Prep job throughput: records/s on the whole bundled corpus (yamls/prep/bundled.yaml with
sources.gutenberg.max_stanzas=null: ~515k Gutenberg stanzas + 154 sonnets + 100 tanka) with 2 worker
processes vs 1, run side by side in one process. Each run starts cold: the Gutenberg pickle is read
again (it is part of the job) and the output folder is new.

The serial part (un-gzipping the 56 MB pickle, ~1.5 s; merging indexes; the PNG) caps the ratio on
small slices (Amdahl): on the 30k-stanza demo slice it is ~1.4 at best. Pass overrides to measure
another slice: python -m bench.bench_prep sources.gutenberg.max_stanzas=30000"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

GOAL = 1.7


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _one(workers: int, root: str, extra: list[str]) -> tuple[float, int, float]:
    from trainer.base import config as C
    from data_prep import prep_job, sources
    sources._gutenberg_cache.clear()
    out = os.path.join(root, f"w{workers}")
    cfg = C.load(prep_job.CONFIG, "yamls/prep/bundled.yaml", [f"out_dir={out}", f"num_workers={workers}", *extra])
    t, cpu = time.perf_counter(), _cpu()
    stats = prep_job.run(cfg)
    return time.perf_counter() - t, stats["records"], _cpu() - cpu


def main(extra: list[str] | None = None) -> list[dict]:
    extra = ["sources.gutenberg.max_stanzas=null", *(extra or [])]
    root = tempfile.mkdtemp(prefix="bench_prep_")
    try:
        _one(1, os.path.join(root, "warm"), ["sources.gutenberg.max_stanzas=10"])  # imports, not timed
        t1, n1, c1 = _one(1, root, extra)
        t2, n2, c2 = _one(2, root, extra)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert n1 == n2, (n1, n2)
    r1, r2 = n1 / t1, n2 / t2
    print(f"prep bundled corpus, {n1} records: 1 worker {t1:.1f} s ({r1:.0f} rec/s), "
          f"2 workers {t2:.1f} s ({r2:.0f} rec/s) on {os.cpu_count()} cores; CPU seconds 1 worker {c1:.1f}, "
          f"2 workers {c2:.1f} (equal = no work duplicated); load average {os.getloadavg()[0]:.1f}")
    return [{"benchmark": f"prep: records/s, 2 workers / 1 worker ({n1} records, bundled corpus)",
             "ratio": r2 / r1, "goal": f">= {GOAL}", "command": "python -m bench prep"}]


if __name__ == "__main__":
    import sys
    for row in main(sys.argv[1:]):
        print(row)
