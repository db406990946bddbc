"""`latentverse train CONFIG.yaml`: train the autoencoder, the token LM or the diffusion model with Composer.

The top-level `task:` key picks the job: `autoencoder` (trainer/jobs/train_autoencoder.py), `diffusion`
(trainer/jobs/train_diffusion.py) or `token_lm` (trainer/jobs/train_token_lm.py). Without it,
`autoencoder` is assumed. `latentverse train CONFIG.yaml --help` lists the keys of CONFIG's task.
"""
from __future__ import annotations

import importlib

from trainer.base.config import KeyProblem

TASKS = {"autoencoder": "trainer.jobs.train_autoencoder", "diffusion": "trainer.jobs.train_diffusion",
         "token_lm": "trainer.jobs.train_token_lm"}
DEFAULT_TASK = "autoencoder"


def _task_module(task):
    if task not in TASKS:
        raise KeyProblem("task", f"expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    return importlib.import_module(TASKS[task])


def config_class(raw: dict) -> type:
    """The config dataclass of the task named by the YAML's top-level `task:` key."""
    return _task_module(raw.get("task", DEFAULT_TASK)).CONFIG


def run(cfg):
    return _task_module(cfg.task).run(cfg)
