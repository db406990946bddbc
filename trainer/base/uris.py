"""Paths that are URIs (s3://bucket/key): checks, the node-local cache, copies in and out.

Every job path may be an object-store URI. The transfers go through Composer's object stores
(`maybe_create_object_store_from_uri`: s3 tested against moto's S3 server; gs and oci through the same
calls, untested); S3 takes its endpoint from S3_ENDPOINT_URL and credentials the way boto3 finds them.
A bad URI is refused in one line before any work: unknown scheme, missing bucket, no credentials, no
object at the path.

The node-local cache is $LATENTVERSE_CACHE, else $TMPDIR/latentverse-cache (on each node's own disk):
one folder per URI, named by a hash of it.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.parse
from typing import Iterable

from trainer.base.errors import UserError

SCHEMES = ("s3", "gs", "oci")   # what Composer's object stores open; only s3 is tested


def is_uri(path) -> bool:
    return isinstance(path, str) and "://" in path and urllib.parse.urlparse(path).scheme != ""


def split(uri: str, key: str = "") -> tuple[str, str, str]:
    """(scheme, bucket, path without the leading /); an unknown scheme or no bucket is one line."""
    u = urllib.parse.urlparse(uri)
    where = f"{key}: " if key else ""
    if u.scheme not in SCHEMES:
        raise UserError(f"{where}{uri}: unknown scheme {u.scheme + '://'!r}; "
                        f"use a local path or one of {', '.join(s + '://' for s in SCHEMES)}")
    if not u.netloc:
        raise UserError(f"{where}{uri}: no bucket (expected {u.scheme}://<bucket>/<path>)")
    return u.scheme, u.netloc, u.path.lstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


_stores: dict = {}
_origins: dict = {}   # node-local copy -> the URI it was made from (this process's local_copy calls)


def store(uri: str):
    """Composer's ObjectStore for the bucket of `uri` (one per bucket and process)."""
    scheme, bucket, _ = split(uri)
    if (scheme, bucket) not in _stores:
        from composer.utils import maybe_create_object_store_from_uri

        _stores[(scheme, bucket)] = maybe_create_object_store_from_uri(f"{scheme}://{bucket}/")
    return _stores[(scheme, bucket)]


def _explain(uri: str, e: Exception, key: str) -> UserError:
    """One line for what the object store said about `uri`."""
    where = f"{key}: " if key else ""
    name = type(e).__name__
    code = ""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    _, bucket, _ = split(uri)
    if name in ("NoCredentialsError", "PartialCredentialsError") or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return UserError(f"{where}{uri}: no valid credentials for the bucket (set AWS_ACCESS_KEY_ID and "
                         f"AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; see docs/object_storage.md)")
    if code in ("NoSuchBucket", "404") or "NoSuchBucket" in str(e):
        return UserError(f"{where}{uri}: bucket {bucket!r} does not exist"
                         f"{' at ' + os.environ['S3_ENDPOINT_URL'] if os.environ.get('S3_ENDPOINT_URL') else ''}")
    if code in ("AccessDenied", "403"):
        return UserError(f"{where}{uri}: access denied to bucket {bucket!r}")
    if name in ("EndpointConnectionError", "ConnectionError", "ConnectTimeoutError"):
        return UserError(f"{where}{uri}: cannot reach the object store ({e})")
    return UserError(f"{where}{uri}: {name}: {e}")


def list_keys(uri: str, key: str = "") -> list[str]:
    """Paths (relative to `uri`, a folder) of every object under it; errors are one line."""
    _, _, prefix = split(uri, key)
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    try:
        names = store(uri).list_objects(prefix)
    except Exception as e:   # the store's own error types differ per backend
        raise _explain(uri, e, key) from None
    return sorted(n[len(prefix):] for n in names)


def check(uri: str, key: str = "", must_exist: bool = False) -> None:
    """Refuse, in one line naming `key`, a URI that cannot be used: unknown scheme, missing bucket,
    no credentials, and with `must_exist` no object at the path (an object, or a folder of them)."""
    _, _, path = split(uri, key)
    _, bucket, _ = split(uri)
    try:
        s = store(uri)
        names = s.list_objects(path)   # a prefix: the object itself or a folder's objects
    except Exception as e:
        raise _explain(uri, e, key) from None
    if must_exist and not any(n == path or n.startswith(path.rstrip("/") + "/") for n in names):
        raise UserError(f"{key + ': ' if key else ''}{uri}: no object at this path in bucket {bucket!r}")


def cache_root() -> str:
    return os.environ.get("LATENTVERSE_CACHE") or os.path.join(tempfile.gettempdir(), "latentverse-cache")


def cache_dir(uri: str, *sub: str) -> str:
    """The node-local folder for `uri`: <cache root>/<16 hex of sha256(uri)>[/sub...]."""
    h = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache_root(), h, *sub)


def download(uri: str, local: str, key: str = "") -> str:
    """Copy one object to `local` (a temporary name, then renamed); returns `local`."""
    _, _, path = split(uri, key)
    os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
    tmp = f"{local}.part.{os.getpid()}"
    try:
        store(uri).download_object(path, tmp, overwrite=True)
    except FileNotFoundError:
        check(uri, key, must_exist=True)   # a missing bucket says so; else: no object at the path
        raise UserError(f"{key + ': ' if key else ''}{uri}: no object at this path") from None
    except Exception as e:
        raise _explain(uri, e, key) from None
    os.replace(tmp, local)
    return local


def download_tree(uri: str, local: str, key: str = "", only: Iterable[str] | None = None) -> list[str]:
    """Copy the objects under `uri` into `local` (those named in `only`, when given), skipping files
    already there with the same size; returns the relative paths copied."""
    s = store(uri)
    _, _, prefix = split(uri, key)
    names = list_keys(uri, key) if only is None else list(only)
    got = []
    for rel in names:
        dest = os.path.join(local, rel)
        obj = f"{prefix.rstrip('/')}/{rel}" if prefix else rel
        if os.path.isfile(dest):
            try:
                if s.get_object_size(obj) == os.path.getsize(dest):
                    continue
            except FileNotFoundError:
                continue
        if only is not None:
            try:
                s.get_object_size(obj)
            except FileNotFoundError:
                continue
        download(join(uri, rel), dest, key)
        got.append(rel)
    return got


def upload(local: str, uri: str, key: str = "") -> None:
    _, _, path = split(uri, key)
    try:
        store(uri).upload_object(path, local)
    except Exception as e:
        raise _explain(uri, e, key) from None


def upload_tree(local: str, uri: str, key: str = "", last: Iterable[str] = ()) -> list[str]:
    """Copy every file under the folder `local` to the folder `uri`; the files named (relative) in
    `last` go after all the others, so that a reader that looks for them finds a whole folder."""
    rels = sorted(os.path.relpath(os.path.join(dp, f), local) for dp, _, fs in os.walk(local) for f in fs)
    rels = [r for r in rels if r not in last] + [r for r in last if r in rels]
    for rel in rels:
        upload(os.path.join(local, rel), join(uri, rel), key)
    return rels


def local_copy(uri: str, key: str = "") -> str:
    """A node-local copy of the folder (or object) at `uri`, made once and reused: the cache folder.
    A folder is complete once its `.complete` marker is written (after every object); objects put at
    the same URI later are not fetched again (delete <cache>/<hash>/copy, or use a new URI)."""
    root = cache_dir(uri, "copy")
    marker = os.path.join(root, ".complete")
    _origins[root] = uri
    if os.path.isfile(marker):
        return root
    names = list_keys(uri, key)
    if not names:
        # one object, not a folder
        check(uri, key, must_exist=True)
        _origins[root] = None
        out = download(uri, os.path.join(root, os.path.basename(split(uri)[2])), key)
        _origins[out] = uri
        return out
    download_tree(uri, root, key, only=names)
    with open(marker, "w") as f:
        f.write(uri + "\n")
    return root


def origin(path: str) -> str:
    """The URI a node-local copy made by `local_copy` in this process came from; else `path` itself.
    Fingerprints of a config name its inputs by this, so that they do not depend on the cache's place."""
    return _origins.get(path) or path


def local_path(path: str, key: str = "") -> str:
    """`path` itself when it is local; a URI's node-local copy otherwise."""
    return local_copy(path, key) if is_uri(path) else path
