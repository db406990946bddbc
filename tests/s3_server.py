"""A real S3 API for the tests: moto's server mode on 127.0.0.1, on a free port.

`s3_server` (one per test session) starts it and stops it; `s3_bucket` makes a fresh bucket for one
test and points this process and every subprocess it starts at the server the way streaming, Composer
and boto3 read it: S3_ENDPOINT_URL, dummy AWS credentials, AWS_DEFAULT_REGION. The node-local cache
(LATENTVERSE_CACHE) goes under the test's tmp_path.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket

import pytest

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_buckets = itertools.count()


class S3Server:
    def __init__(self):
        from moto.server import ThreadedMotoServer

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    def start(self) -> "S3Server":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # not a line per request
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def env(self) -> dict:
        return {"S3_ENDPOINT_URL": self.endpoint, **ENV}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"], region_name=ENV["AWS_DEFAULT_REGION"])

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"lv-test-{os.getpid()}-{next(_buckets)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


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
