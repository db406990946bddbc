"""The one CLI: help for each job (the keys of the task a YAML selects), unknown jobs, config errors,
--print-config."""
import pytest

from launch import cli

from .conftest import run_cli


def test_top_help_lists_every_job():
    r = run_cli("--help")
    assert r.returncode == 0
    for name in cli.JOBS:
        assert name in r.stdout


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_job_help(job, capsys):
    module = cli.load_job_module(job)
    with pytest.raises(SystemExit) as e:
        cli.main([job, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert f"latentverse {job}" in out
    assert module is not None


@pytest.mark.parametrize("yaml, has, lacks", [
    ("yamls/diffusion/pretrain_masked_tiny_cpu.yaml", ["mask_ratio", "prompt_mean.enabled", "data.streams"],
     ["tokenizer.kind"]),
    ("yamls/autoencoder/tiny_cpu.yaml", ["tokenizer.kind", "adapt.init_from"], ["mask_ratio"]),
    ("yamls/autoencoder/token_embeddings_tiny_cpu.yaml", ["seq_len"], ["mask_ratio", "adapt.init_from"]),
])
def test_train_help_lists_the_keys_of_the_task_the_yaml_selects(yaml, has, lacks, capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", yaml, "--help"])
    keys = {line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines()}
    assert all(k in keys for k in has) and not any(k in keys for k in lacks), sorted(keys)


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
