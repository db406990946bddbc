import os
import socket
import subprocess
import sys

import pytest

from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the local Slurm fixture)
from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (moto's S3 server on 127.0.0.1)

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A port the OS says is free on 127.0.0.1 (never a fixed one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, timeout=600, env=None, cwd=ROOT):
    """`latentverse ARGS` in a subprocess, as a user runs it."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "launch.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=e, cwd=cwd)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def reconstructing_ae(request, tmp_path_factory):
    """The folder of a tiny autoencoder that reconstructs tests.tiny.POEMS (>= 90% of their tokens, checked
    here), trained once and kept in pytest's cache folder under its recipe's hash (in this session's
    temporary folder under `-p no:cacheprovider`)."""
    from tests.tiny import reconstructing_autoencoder

    cache = getattr(request.config, "cache", None)
    return reconstructing_autoencoder(str(cache.mkdir("tiny-autoencoders") if cache else tmp_path_factory.mktemp("ae")))
