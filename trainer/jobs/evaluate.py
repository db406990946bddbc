"""`latentverse evaluate CONFIG.yaml`: evaluate an autoencoder or a whole pipeline.

The top-level `task:` key picks the evaluation: `autoencoder` (reconstruction: token accuracy, exact
match, BLEU, and the latent-shuffle check; trainer/jobs/evaluate_autoencoder.py) or `generation` (samples of
an exported pipeline against held-out poems; trainer/jobs/evaluate_generation.py). Each writes report.json
and a PNG into its out_dir. `latentverse evaluate CONFIG.yaml --help` lists the keys of CONFIG's task.
"""
from __future__ import annotations

import importlib

from trainer.base.config import KeyProblem

TASKS = {"autoencoder": "trainer.jobs.evaluate_autoencoder", "generation": "trainer.jobs.evaluate_generation"}
DEFAULT_TASK = "generation"


def _task_module(task):
    if task not in TASKS:
        raise KeyProblem("task", f"expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return importlib.import_module(TASKS[task])


def config_class(raw: dict) -> type:
    return _task_module(raw.get("task", DEFAULT_TASK)).CONFIG


def run(cfg):
    return _task_module(cfg.task).run(cfg)
