"""The end-to-end demo on the bundled corpus: prep -> autoencoder -> encode -> masked pretraining ->
unmasked finetuning -> generate -> evaluate, every stage a real job with its own YAML under yamls/,
all writing below one output folder. Stages whose job is not built yet are reported and skipped."""
from __future__ import annotations

import dataclasses
import os
import time

from trainer import config as C
from trainer.log import get_logger

log = get_logger("demo")


@dataclasses.dataclass
class Stage:
    job: str
    yaml: str
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DemoConfig:
    out_dir: str = "out/demo"
    # Each stage's YAML; `{out}` in an override is replaced by out_dir.
    stages: list[Stage] = dataclasses.field(default_factory=lambda: [
        Stage("prep", "yamls/prep/bundled.yaml", ["out_dir={out}/text_shards"]),
    ])


CONFIG = DemoConfig


def run(cfg: DemoConfig) -> dict:
    from trainer.check_imports import check
    from trainer.cli import NotBuilt, load_config, load_job_module

    os.makedirs(cfg.out_dir, exist_ok=True)
    log.info("import check: " + ", ".join(f"{k} {v}" for k, v in check().items()))
    done, skipped = [], []
    t_all = time.time()
    for stage in cfg.stages:
        try:
            module = load_job_module(stage.job)
        except NotBuilt as e:
            log.warning(f"stage {stage.job}: skipped: {e}")
            skipped.append(stage.job)
            continue
        overrides = [o.replace("{out}", cfg.out_dir) for o in stage.overrides]
        job_cfg = load_config(module, stage.yaml, overrides)
        t = time.time()
        log.info(f"stage {stage.job}: {stage.yaml} {' '.join(overrides)}")
        module.run(job_cfg)
        log.info(f"stage {stage.job}: done in {time.time() - t:.1f} s")
        done.append(stage.job)
    summary = {"out_dir": os.path.abspath(cfg.out_dir), "done": done, "skipped": skipped,
               "seconds": round(time.time() - t_all, 1)}
    print(f"demo: ran {done or 'no stages'}; not built yet: {skipped or 'none'}; "
          f"{summary['seconds']} s; output in {summary['out_dir']}")
    return summary
