"""`latentverse evaluate CONFIG.yaml`: evaluate an autoencoder or a whole pipeline.

The top-level `task:` key picks the evaluation: `autoencoder` (reconstruction: token accuracy, exact
match, BLEU, and the latent-shuffle check; trainer/eval_autoencoder.py) or `generation` (samples of
an exported pipeline against held-out poems; trainer/eval_generation.py). Each writes report.json
and a PNG into its out_dir.
"""
from __future__ import annotations

import importlib

from trainer.config import KeyProblem

TASKS = {"autoencoder": "trainer.eval_autoencoder", "generation": "trainer.eval_generation"}
DEFAULT_TASK = "generation"


def _task_module(task):
    if task not in TASKS:
        raise KeyProblem("task", f"expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return importlib.import_module(TASKS[task])


def config_class(raw: dict) -> type:
    return _task_module(raw.get("task", DEFAULT_TASK)).CONFIG


def __getattr__(name):
    if name == "CONFIG":  # `latentverse evaluate --help` lists the default task's keys
        return _task_module(DEFAULT_TASK).CONFIG
    raise AttributeError(name)


def run(cfg):
    return _task_module(cfg.task).run(cfg)
