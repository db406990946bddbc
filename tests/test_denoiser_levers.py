"""bench/denoiser_levers.py (issue #28's sweep): every lever's three commands are configs the jobs accept,
with the lever's keys in both stages where the model must match, and the budgets scaled."""
import json
import os

import pytest

from bench import denoiser_levers as L
from launch.cli import load_config, load_job_module

from .conftest import ROOT


@pytest.mark.parametrize("lever", sorted(L.LEVERS))
def test_each_lever_is_two_training_configs_and_an_evaluation_the_jobs_accept(lever, tmp_path):
    out, lat = tmp_path / "out", tmp_path / "lat"
    (out / lever / "finetune" / "pipeline").mkdir(parents=True)
    lat.mkdir()
    cmds = L.commands(lever, str(lat), "AE", str(out), 0.5, 1)
    assert [c[0] for c in cmds] == ["train", "train", "evaluate"]
    cfgs = []
    for job, yaml, *overrides in cmds[:2]:
        cfgs.append(load_config(load_job_module(job), os.path.join(ROOT, yaml), overrides))
    pre, fin = cfgs
    assert (pre.max_duration, fin.max_duration) == ("3250ba", "1400ba")
    assert pre.mask_ratio == (0.0 if lever == "unmasked" else 0.75) and fin.mask_ratio == 0.0
    assert fin.load_path == f"{out}/{lever}/pretrain/checkpoints/latest-rank0.pt"
    assert pre.model == fin.model and pre.data.normalize == fin.data.normalize   # stage 2 loads stage 1
    both = L.LEVERS[lever][0]
    for o in both:                                 # the lever's own keys took effect
        key, value = o.split("=", 1)
        obj = pre
        for part in key.split("."):
            obj = getattr(obj, part)
        assert str(obj) == value or float(obj) == float(value)
    ev = load_config(load_job_module("evaluate"), os.path.join(ROOT, cmds[2][1]), cmds[2][2:])
    assert ev.held_out_split == "val" and ev.pipeline == f"{out}/{lever}/finetune/pipeline"


def test_set_overrides_reach_both_stages_and_the_table_counts_the_batches_trained(tmp_path):
    """`--set KEY=VALUE` (e.g. precision=fp32 on a GPU) is in both training stages of every lever; the table
    says how many batches each lever trained, so a sweep stopped at a deadline shows what is partial."""
    out = tmp_path / "out"
    cmds = L.commands("base", str(tmp_path), "AE", str(out), 1.0, 1, ("precision=fp32",))
    assert all("precision=fp32" in c for c in cmds[:2]) and "precision=fp32" not in cmds[2]
    for stage, last in (("pretrain", 6500), ("finetune", 1200)):       # the finetune stopped early
        (out / "base" / stage).mkdir(parents=True)
        rows = [{"batch": b, "train/loss": 1.0} for b in range(100, last + 1, 100)] + [{"batch": last, "eval/x": 0}]
        (out / "base" / stage / "metrics.jsonl").write_text("".join(f"{json.dumps(r)}\n" for r in rows))
    assert L.trained(str(out), "base") == 7700
    table = open(L.write_table(str(out), ["base"], 1.0)).read()
    assert table.splitlines()[4].rstrip().endswith("| 7700 |"), table
