"""Benchmarks: each `bench/bench_<name>.py` runs the things it compares side by side in one process
and returns rows {"benchmark", "ratio", "goal", "command"}; `python -m bench` runs them all and prints
the table kept in the README. Not tests: nothing here asserts."""
