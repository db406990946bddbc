"""Checkpoints: never resume from half a file. Composer writes them; this sets aside what a kill left
half-written and points `latest-rank0.pt` at the newest complete one before autoresume reads it."""
from __future__ import annotations

import os
import re
import time
import zipfile
from typing import Optional

from trainer.base.log import get_logger

log = get_logger("train.checkpoints")


_CKPT = re.compile(r"^ep(\d+)-ba(\d+)(-rank(\d+))?(\.pt)?$")


def checkpoint_complete(path: str) -> bool:
    """A sharded checkpoint is complete when DCP wrote its .metadata (written last); a monolithic one
    when its zip central directory (written last by torch.save) is readable."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, ".metadata"))
    try:
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def repair_checkpoints(folder: str) -> Optional[str]:
    """Set aside checkpoints a crash left half-written (renamed *.incomplete, not deleted) and make
    `latest-rank0.pt` point at the newest complete one. Returns that checkpoint's name (or None).

    Composer updates the symlink only after a write finishes, but a kill between removing and
    re-creating the symlink loses it (autoresume would then start from zero), and a half-written
    file left under the name of a later batch blocks that batch's save on resume."""
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        m = _CKPT.match(name)
        path = os.path.join(folder, name)
        if m and not os.path.islink(path) and (m.group(4) in (None, "0")):
            found.append((int(m.group(2)), name))
    newest = None
    for _, name in sorted(found, reverse=True):
        path = os.path.join(folder, name)
        if checkpoint_complete(path):
            newest = newest or name
        else:
            os.replace(path, f"{path}.incomplete-{int(time.time())}")
            log.warning(f"{path}: half-written checkpoint (the run was killed while saving it): set aside")
    link = os.path.join(folder, "latest-rank0.pt")
    target = os.path.realpath(link) if os.path.lexists(link) else None
    if newest is None:
        if os.path.lexists(link):
            os.remove(link)
        return None
    want = os.path.join(folder, newest)
    if target != os.path.realpath(want):
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(newest, tmp)
        os.replace(tmp, link)
        log.warning(f"{link}: now points at {newest}, the newest complete checkpoint")
    return newest
