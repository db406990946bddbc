"""python -m bench [name ...]: run benchmarks and print the README table (also bench/results.md)."""
import importlib
import os
import pkgutil
import sys

import torch


def main(names: list[str]) -> int:
    here = os.path.dirname(__file__)
    mods = sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))
    if names:
        mods = [m for m in mods if m in names or m.removeprefix("bench_") in names]
    rows = []
    for name in mods:
        print(f"== {name}", flush=True)
        rows += importlib.import_module(f"bench.{name}").main()
    lines = ["| benchmark | ratio | goal | command |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['benchmark']} | {r['ratio']:.2f} | {r['goal']} | `{r['command']}` |")
    table = "\n".join(lines)
    print(f"\nmachine: {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(table)
    if not names:
        with open(os.path.join(here, "results.md"), "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
