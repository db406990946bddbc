"""Fault injection for the tests (see sitecustomize.py here): `env(KILL_AT_BATCH=5)` is the environment
of a process that dies at batch 5."""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def env(**faults) -> dict:
    """os.environ with this folder first on PYTHONPATH, the repository next (sitecustomize runs before
    `python -m` puts the working directory on sys.path, and patches the product's modules) and the
    faults armed (LATENTVERSE_FAULT_<NAME>)."""
    path = os.pathsep.join(p for p in (HERE, ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, **{f"LATENTVERSE_FAULT_{k}": str(v) for k, v in faults.items()})
