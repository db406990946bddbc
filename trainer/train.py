"""`latentverse train CONFIG.yaml`: train the autoencoder or the diffusion model with Composer.

The top-level `task:` key picks the job: `autoencoder` (trainer/train_autoencoder.py), `diffusion`
(trainer/train_diffusion.py) or `token_lm` (trainer/train_token_lm.py). Without it, `autoencoder` is assumed.
"""
from __future__ import annotations

import importlib

from trainer.config import KeyProblem, UserError

TASKS = {"autoencoder": "trainer.train_autoencoder", "diffusion": "trainer.train_diffusion",
         "token_lm": "trainer.train_token_lm"}
DEFAULT_TASK = "autoencoder"


def _task_module(task):
    if task not in TASKS:
        raise KeyProblem("task", f"expected one of {', '.join(map(repr, TASKS))}, got {task!r}")
    try:
        return importlib.import_module(TASKS[task])
    except ModuleNotFoundError as e:
        if e.name == TASKS[task]:
            raise UserError(f"latentverse train: task {task!r} is not built yet ({TASKS[task]})") from None
        raise


def config_class(raw: dict) -> type:
    """The config dataclass of the task named by the YAML's top-level `task:` key."""
    return _task_module(raw.get("task", DEFAULT_TASK)).CONFIG


def __getattr__(name):
    # `latentverse train --help` lists the default task's keys.
    if name == "CONFIG":
        return _task_module(DEFAULT_TASK).CONFIG
    raise AttributeError(name)


def run(cfg):
    return _task_module(cfg.task).run(cfg)
