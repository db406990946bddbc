"""Where a training run reports, and what optional callbacks it runs: the `loggers:`, `callbacks:`,
`progress_bar`, `log_to_console` and `console_log_interval` keys, as llm-foundry spells them.

    loggers:                      # Composer's own logger classes; each mapping is the class's kwargs
      tensorboard: {}             # TensorboardLogger, log_dir defaults to <out_dir>/tensorboard
      wandb: {project: poems}     # WandBLogger; init_kwargs.dir defaults to <out_dir>
      mlflow: {tracking_uri: file:///tmp/mlruns}   # MLFlowLogger
    callbacks:
      optimizer_monitor: {}       # any of Composer's optional callbacks by snake_case name, with kwargs
      sample_index_log: {}        # or one of the job's own (TrainingJob.optional_callbacks)

Everything here is built before any work starts, so a misspelt name, a keyword the class does not take
or a logger whose package is missing is a one-line error naming the key.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from typing import Any, Callable

from trainer.base.config import ConfigError
from trainer.training import composer_fixes

# Composer's callbacks that the skeleton already runs or that another key owns (checkpoints:
# save_folder; loading: load_path), and those that need a model of another kind (HF generate, images).
_NOT_OPTIONAL = {"LRMonitor", "CheckpointSaver", "LoadCheckpoint", "MLPerfCallback", "Generate",
                 "ImageVisualizer", "ExportForInferenceCallback"}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _logger_classes() -> dict[str, Callable[..., Any]]:
    from composer import loggers

    return {"tensorboard": loggers.TensorboardLogger, "wandb": loggers.WandBLogger, "mlflow": loggers.MLFlowLogger}


def composer_callbacks() -> dict[str, type]:
    """Composer's optional callbacks by snake_case name (optimizer_monitor, memory_monitor, ...)."""
    import composer.callbacks as cc

    return {_snake(n): getattr(cc, n) for n in cc.__all__ if n not in _NOT_OPTIONAL}


def _construct(key: str, cls: Callable[..., Any], kwargs: dict) -> Any:
    """cls(**kwargs), with a keyword it does not take or a package it lacks as a one-line error at `key`."""
    params = inspect.signature(cls).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        bad = sorted(set(kwargs) - set(params))
        if bad:
            raise ConfigError(f"{key}.{bad[0]}: {getattr(cls, '__name__', key)} takes no such keyword; it takes "
                              f"{', '.join(p for p in params if p != 'self')}")
    try:
        return cls(**kwargs)
    except ImportError as e:  # Composer's MissingConditionalImportError is one
        raise ConfigError(f"{key}: needs a package that is not installed ({str(e).splitlines()[0]})") from None
    except Exception as e:  # e.g. MLflow refusing a tracking URI: the first line of its message
        raise ConfigError(f"{key}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def build_loggers(cfg) -> list:
    """Composer logger objects for cfg.loggers (tensorboard / wandb / mlflow), with the run's defaults."""
    classes = _logger_classes()
    out = []
    for name, kwargs in cfg.loggers.items():
        if name not in classes:
            raise ConfigError(f"loggers.{name}: unknown logger; known: {', '.join(classes)}")
        kwargs = dict(kwargs or {})
        if name == "tensorboard":
            kwargs.setdefault("log_dir", os.path.join(cfg.out_dir, "tensorboard"))
            kwargs.setdefault("flush_interval", 50)
        elif name == "wandb":
            if importlib.util.find_spec("wandb"):
                composer_fixes.wandb()
            kwargs["init_kwargs"] = {"dir": cfg.out_dir, **(kwargs.get("init_kwargs") or {})}
        elif name == "mlflow":
            kwargs.setdefault("run_name", cfg.run_name)
        out.append(_construct(f"loggers.{name}", classes[name], kwargs))
    return out


def build_callbacks(cfg, own: dict[str, Callable[..., Any]]) -> list:
    """Callback objects for cfg.callbacks: the job's own optional ones (`own`, built with out_dir when
    they take it) first, else Composer's by snake_case name."""
    known = {**composer_callbacks(), **own}
    out = []
    for name, kwargs in cfg.callbacks.items():
        if name not in known:
            raise ConfigError(f"callbacks.{name}: unknown callback; known: {', '.join(sorted(known))}")
        kwargs = dict(kwargs or {})
        if name in own and "out_dir" in inspect.signature(own[name]).parameters:
            kwargs.setdefault("out_dir", cfg.out_dir)
        out.append(_construct(f"callbacks.{name}", known[name], kwargs))
    return out


def console(cfg) -> dict:
    """The Trainer's progress_bar / log_to_console / console_log_interval: by default a progress bar on a
    terminal, and metrics lines every log_interval batches where stderr is a file (a Slurm log); rank 0 only
    (Composer's console logger prints on every rank: N copies of each line in a Slurm log)."""
    from composer.utils import dist

    bar = sys.stderr.isatty() if cfg.progress_bar is None else cfg.progress_bar
    lines = (not bar) if cfg.log_to_console is None else cfg.log_to_console
    rank0 = dist.get_global_rank() == 0
    bar, lines = bar and rank0, lines and rank0
    return {"progress_bar": bar, "log_to_console": lines,
            "console_log_interval": cfg.console_log_interval or f"{cfg.log_interval}ba"}
