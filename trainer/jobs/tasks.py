"""A command whose YAML picks one of several jobs by its top-level `task:` key (train, evaluate)."""
from __future__ import annotations

import importlib

from trainer.base.config import KeyProblem


class Tasks:
    def __init__(self, modules: dict[str, str], default: str):
        self.modules, self.default = modules, default

    def module(self, task: str):
        if task not in self.modules:
            raise KeyProblem("task", f"expected one of {', '.join(map(repr, self.modules))}, got {task!r}")
        return importlib.import_module(self.modules[task])

    def config_class(self, raw: dict) -> type:
        """The config dataclass of the task named by the YAML's `task:` key (the default without one)."""
        return self.module(raw.get("task", self.default)).CONFIG

    def run(self, cfg):
        return self.module(cfg.task).run(cfg)
