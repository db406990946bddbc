"""Benchmarks: each `bench/bench_<name>.py` runs the things it compares side by side in one process
and returns rows {"benchmark", "ratio", "goal", "command"}; `python -m bench [name ...]` runs them and
writes bench/results.md (see bench/__main__.py), which the docs quote. Not tests: nothing here asserts."""
