"""Data files inside installed registry packages, located without importing the package."""
from __future__ import annotations

import importlib.util
import os

from trainer.base.config import UserError


def package_file(package: str, relpath: str, key: str) -> str:
    """A data file inside an installed package, located without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{key}: package {package!r} is not installed (it is in requirements.lock)")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, relpath)
        if os.path.isfile(path):
            return path
    raise UserError(f"{key}: {package}/{relpath} not found in the installed package")
