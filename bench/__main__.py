"""python -m bench [name ...]: run benchmarks, print their table and write bench/results.md.

bench/results.md is written only by this command, never by hand: a run of some benchmarks replaces
their rows and keeps the others' (each row says when and on what machine it was measured); the docs
quote the file."""
import datetime
import importlib
import os
import pkgutil
import sys

import torch

HEADER = ["| benchmark | ratio | goal | command | measured |", "|---|---|---|---|---|"]


def _rows_of(path: str) -> list[str]:
    """The table rows of an earlier results.md (rows of the older four-column table kept, marked so)."""
    if not os.path.isfile(path):
        return []
    rows = [line.rstrip("\n") for line in open(path)
            if line.startswith("| ") and line.count("|") in (5, 6) and not line.startswith("| benchmark |")]
    return [row if row.count("|") == 6 else row + " an earlier run (date not recorded) |" for row in rows]


def main(names: list[str]) -> int:
    here = os.path.dirname(__file__)
    mods = sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))
    if names:
        mods = [m for m in mods if m in names or m.removeprefix("bench_") in names]
    machine = f"{datetime.date.today()}, {os.cpu_count()} cores, torch {torch.__version__.split('+')[0]}"
    fresh = []
    for name in mods:
        print(f"== {name}", flush=True)
        for r in importlib.import_module(f"bench.{name}").main():
            fresh.append(f"| {r['benchmark']} | {r['ratio']:.2f} | {r['goal']} | `{r['command']}` | {machine} |")
    ran = {f"`python -m bench {m.removeprefix('bench_')}`" for m in mods}
    path = os.path.join(here, "results.md")
    kept = [row for row in _rows_of(path) if row.split(" | ")[3] not in ran]
    table = "\n".join(HEADER + sorted(kept + fresh, key=lambda row: row.split(" | ")[3]))
    print("\n" + "\n".join(HEADER + fresh))
    with open(path + ".tmp", "w") as f:
        f.write("# Benchmark results\n\nWritten by `python -m bench` (each row: the ratio of the things it compares, "
                "measured side by side in one run).\n\n" + table + "\n")
    os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
