"""The import check: every required library imports, offline."""
import subprocess
import sys

from trainer.base.check_imports import REQUIRED, check


def test_every_required_library_imports():
    versions = check()
    assert set(versions) == set(REQUIRED)


def test_offline_by_default():
    code = "import os; import trainer; print(os.environ['HF_HUB_OFFLINE'])"
    env = {"PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_check_names_the_module_that_fails():
    import pytest
    with pytest.raises(ImportError, match="no_such_lib_xyz: does not import"):
        check(["torch", "no_such_lib_xyz"])
