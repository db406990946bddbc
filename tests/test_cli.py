"""The one CLI: help for each job, unknown jobs, jobs not built yet, config errors and --print-config."""
import pytest

from trainer import cli

from .conftest import run_cli


def test_top_help_lists_every_job():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in cli.JOBS:
        assert name in r.stdout


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_job_help_or_not_built(job, capsys):
    try:
        module = cli.load_job_module(job)
    except cli.NotBuilt:
        rc = cli.main([job, "--help"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"latentverse {job}: not built yet") and "\n" not in err
        return
    with pytest.raises(SystemExit) as e:
        cli.main([job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"latentverse {job}" in out
    assert module is not None


def test_unknown_job():
    r = run_cli("frobnicate")
    assert r.returncode == 2 and "unknown job 'frobnicate'" in r.stderr


def test_config_error_is_one_line_and_exit_2(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text("out_dir: 3\n")
    r = run_cli("demo", p)
    assert r.returncode == 2
    assert r.stderr.strip() == f"{p}: out_dir: expected str, got 3"


def test_print_config_merges_overrides(tmp_path):
    p = tmp_path / "demo.yaml"
    p.write_text("out_dir: a\n")
    r = run_cli("demo", p, "out_dir=b", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "out_dir: b" in r.stdout
