"""The pytest fixtures around moto's S3 server on 127.0.0.1 (bench/s3_server.py, shared with the
object-store benchmark).

`s3_server` (one per test session) starts it and stops it; `s3_bucket` makes a fresh bucket for one
test and points this process and every subprocess it starts at the server the way streaming, Composer
and boto3 read it: S3_ENDPOINT_URL, dummy AWS credentials, AWS_DEFAULT_REGION. The node-local cache
(LATENTVERSE_CACHE) goes under the test's tmp_path.
"""
from __future__ import annotations

import pytest

from bench.s3_server import S3Server


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, tmp_path):
    """A fresh bucket, as `s3://<name>`, with the environment of this test (and its subprocesses)
    pointing at the server."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("LATENTVERSE_CACHE", str(tmp_path / "node-cache"))
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    return f"s3://{s3_server.make_bucket()}"
