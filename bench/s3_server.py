"""A real S3 API on this machine: moto's server mode on 127.0.0.1, on a free port, for the object-store
benchmark and the tests (tests/s3_server.py holds the pytest fixtures around it).

`env()` is how streaming, Composer and boto3 find it: S3_ENDPOINT_URL, dummy AWS credentials and
AWS_DEFAULT_REGION, for this process and every subprocess it starts.
"""
from __future__ import annotations

import itertools
import logging
import os
import socket

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
