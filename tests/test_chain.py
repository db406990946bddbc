"""The chain run YAML (launch/chain.py): stage inputs by reference, the preflight's one-line refusals
before anything is written, every stage's sbatch script requeueable with a warning signal."""
import json
import os
import re

import pytest
import yaml

from launch import chain
from trainer.base.config import ConfigError

from .conftest import ROOT, run_cli

TINY = os.path.join(ROOT, "yamls/runs/chain_tiny_cpu_slurm.yaml")
STAGES = ("prep", "autoencoder", "encode", "pretrain_masked", "finetune_unmasked", "evaluate")


def variant(tmp_path, edit):
    data = yaml.safe_load(open(TINY))
    data["out_dir"] = str(tmp_path / "chain")
    edit({s["name"]: s for s in data["stages"]})
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def plan(path):
    stages = chain.load_stages(path)
    chain.preflight(stages, dry_run=True)
    return stages


def test_tiny_chain_plan_hands_each_stage_the_one_before(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    stages = plan(variant(tmp_path, lambda s: None))
    assert [s.spec.name for s in stages] == ["prep", "autoencoder", "encode", "pretrain_masked",
                                             "finetune_unmasked", "evaluate"]
    by = {s.spec.name: s for s in stages}
    out = tmp_path / "chain"
    assert by["encode"].run.job_data["autoencoder"] == str(out / "autoencoder" / "autoencoder")
    assert by["finetune_unmasked"].run.job_data["load_path"] == str(
        out / "pretrain_masked" / "checkpoints" / "latest-rank0.pt")
    assert by["pretrain_masked"].run.spec.compute.world_size == 4 and by["prep"].run.spec.compute.world_size == 1
    script = next(t for p, t in by["pretrain_masked"].plan.files.items() if p.endswith("sbatch.sh"))
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@300" in script
    assert "scontrol requeue" in script and "trap " in script
    assert not out.exists(), "the preflight writes nothing"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["encode"]["inputs"].update(autoencoder="autoencoder/export"),
     "stage encode: inputs.autoencoder: stage autoencoder (train/autoencoder) makes 'autoencoder', "
     "'checkpoints' in its out_dir, not 'export'"),
    (lambda s: s["autoencoder"]["inputs"].update({"data.path": "encode"}),
     "stage autoencoder: inputs.data.path: 'encode' names no earlier stage (earlier: prep)"),
    (lambda s: s["encode"]["inputs"].pop("autoencoder"),
     "stage encode: autoencoder: path does not exist: 'out/demo/autoencoder_adapted/autoencoder'"),
    (lambda s: (s["pretrain_masked"]["inputs"].pop("data.eval_path"),
                s["pretrain_masked"]["overrides"].update({"data.eval_path": "/nowhere/val"})),
     "stage pretrain_masked: data.eval_path: '/nowhere/val' does not exist and no earlier stage makes it"),
])
def test_preflight_refuses_in_one_line_naming_stage_and_key(tmp_path, monkeypatch, edit, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError) as e:
        plan(variant(tmp_path, edit))
    assert str(e.value).endswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "chain").exists()


def test_full_size_chain_passes_the_preflight(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    bart = tmp_path / "bart-base"
    bart.mkdir()
    data = yaml.safe_load(open(os.path.join(ROOT, "yamls/runs/chain_4x8_slurm.yaml")))
    data["out_dir"] = str(tmp_path / "chain")
    data["stages"][1]["overrides"] = {"model.pretrained_path": str(bart)}
    path = tmp_path / "chain_4x8.yaml"
    path.write_text(yaml.safe_dump(data))
    stages = plan(str(path))
    assert [s.run.spec.compute.world_size for s in stages] == [1, 32, 8, 32, 32, 1]
    by = {s.spec.name: s for s in stages}
    assert by["pretrain_masked"].run.job_data["autoencoder"] == by["encode"].run.job_data["autoencoder"]


@pytest.mark.slow
def test_the_tiny_chain_runs_here_with_backend_local(tmp_path):
    """The rehearsal's chain YAML with `compute.backend=local` (one process a stage): the six stages run in
    order on this machine, each reading what the one before made (the evaluation scores the finetuned
    pipeline on the encoded latents; finetuning starts from masked pretraining's checkpoint)."""
    out = tmp_path / "chain"
    r = run_cli("launch", TINY, f"out_dir={out}", "compute.backend=local", "compute.nodes=1",
                "compute.procs_per_node=1", timeout=2400)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-4000:]
    order = re.findall(r"latentverse\.chain: stage (\w+) \((\d)/6\)", text)
    assert order == [(s, str(k)) for k, s in enumerate(STAGES, 1)], order
    assert (out / "prep" / "_done.json").is_file() and (out / "encode" / "_done.json").is_file()
    assert (out / "autoencoder" / "autoencoder").is_dir() and (out / "pretrain_masked" / "denoiser").is_dir()
    assert f"started from {out}/pretrain_masked/checkpoints/latest-rank0.pt (weights only)" in text
    report = json.load(open(out / "evaluate" / "report.json"))
    assert report["pipeline"] == str(out / "finetune_unmasked" / "pipeline")
    assert report["config"]["latent_data"] == str(out / "encode") and report["samples"]
    record = json.load(open(out / "chain.json"))["stages"]
    assert sorted(record) == sorted(STAGES) and all(v["out_dir"] == str(out / k) for k, v in record.items())
