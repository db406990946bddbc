"""python -m bench [name ...]: run benchmarks, print their table and write bench/results.md.

bench/results.md is written only by this command, never by hand: a run of some benchmarks replaces
their rows and keeps the others'; each row names the run that measured it, and the notes under the
table say, for each run, its command, date, machine, load and each benchmark's wall time. The docs
quote the file."""
import datetime
import importlib
import os
import pkgutil
import platform
import re
import sys
import time
import traceback

import torch

HEADER = ["| benchmark | ratio | goal | command | run |", "|---|---|---|---|---|"]
RUN_LINE = re.compile(r"^- run `([^`]+)`: ")


def _earlier(path: str) -> tuple[list[str], dict[str, str]]:
    """The table rows of an earlier results.md and its run notes by run key."""
    if not os.path.isfile(path):
        return [], {}
    lines = [line.rstrip("\n") for line in open(path)]
    rows = [line for line in lines
            if line.startswith("| ") and line.count("|") == 6 and not line.startswith("| benchmark |")]
    notes = {m.group(1): line for line in lines if (m := RUN_LINE.match(line))}
    return rows, notes


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.isfile("/proc/cpuinfo") else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 if hasattr(os, "sysconf") else 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} cores ({platform.machine()}, {cpu}), {mem:.0f} GiB, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(names: list[str]) -> int:
    here = os.path.dirname(__file__)
    mods = sorted(m.name for m in pkgutil.iter_modules([here]) if m.name.startswith("bench_"))
    if names:
        unknown = [n for n in names if f"bench_{n.removeprefix('bench_')}" not in mods]
        if unknown:
            print(f"python -m bench: unknown benchmark(s) {', '.join(unknown)}; known: "
                  f"{', '.join(m.removeprefix('bench_') for m in mods)}", file=sys.stderr)
            return 2
        mods = [m for m in mods if m in names or m.removeprefix("bench_") in names]
    key = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    load0 = os.getloadavg()[0]
    fresh, walls, failed = [], {}, []
    for name in mods:
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        try:
            rows = importlib.import_module(f"bench.{name}").main()
        except Exception:  # the others' rows are still written; this one keeps its earlier rows
            traceback.print_exc()
            failed.append(name)
            continue
        fresh += [f"| {r['benchmark']} | {r['ratio']:.2f} | {r['goal']} | `{r['command']}` | {key} |" for r in rows]
        walls[name.removeprefix("bench_")] = time.perf_counter() - t
        print(f"== {name}: {walls[name.removeprefix('bench_')]:.0f} s", flush=True)
    ran = {f"`python -m bench {m.removeprefix('bench_')}`" for m in mods if m not in failed}
    path = os.path.join(here, "results.md")
    rows, notes = _earlier(path)
    kept = [row for row in rows if row.split(" | ")[3] not in ran]
    command = "python -m bench" + "".join(f" {n}" for n in names)
    notes[key] = (f"- run `{key}`: `{command}` on {machine()}; load average {load0:.1f} at the start, "
                  f"{os.getloadavg()[0]:.1f} at the end; wall time " +
                  ", ".join(f"{n} {s:.0f} s" for n, s in walls.items()))
    used = {row.rsplit(" | ", 1)[1].rstrip(" |") for row in kept + fresh}
    table = "\n".join(HEADER + sorted(kept + fresh, key=lambda row: row.split(" | ")[3]))
    print("\n" + "\n".join(HEADER + fresh))
    with open(path + ".tmp", "w") as f:
        f.write("# Benchmark results\n\nWritten by `python -m bench`, never by hand. Each row: the ratio of the "
                "things it compares, measured side by side in one run; the `run` column names the run (below: its "
                "command, machine, load and each benchmark's wall time).\n\n" + table + "\n\nRuns:\n\n"
                + "\n".join(line for k, line in sorted(notes.items()) if k in used) + "\n")
    os.replace(path + ".tmp", path)
    if failed:
        print(f"python -m bench: {', '.join(failed)} failed (traceback above); their earlier rows are kept",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
