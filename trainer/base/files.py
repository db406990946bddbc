"""Files written so that a reader never sees half of one: write to a temporary name, then rename."""
from __future__ import annotations

import json
import os
import shutil

from trainer.base.config import ConfigError


def write_json_atomic(path: str, obj) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the old file or the whole new one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def replace_dir(tmp: str, path: str) -> None:
    """Move a fully written temporary directory into place; the old one goes only after."""
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{os.getpid()}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def check_out_dir(out_dir: str, key: str = "out_dir", create: bool = True) -> None:
    """Refuse in one line, before any work, an output folder that is a file or lies under one; then
    create it (`create`), or leave that to the job once it has something to write."""
    p = os.path.abspath(out_dir)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ConfigError(f"{key}: {out_dir!r} is a file or lies under one, not a folder; give another folder "
                          f"(nothing was written)")
    if create:
        os.makedirs(out_dir, exist_ok=True)
