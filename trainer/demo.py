"""The end-to-end demo on the bundled corpus, every stage a real job with its own YAML, all writing
below one output folder:

    prep -> autoencoder -> encode -> masked pretraining -> unmasked finetuning (exports the pipeline)
         -> generate for a few prompts -> evaluate (autoencoder and generation)

`quick: true` (yamls/demo/quick.yaml) runs the same stages on a small slice with short budgets for a
first look. Every job skips finished work, so a demo run again after an interruption continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from trainer.log import get_logger

log = get_logger("demo")


@dataclasses.dataclass
class Stage:
    name: str
    job: str
    yaml: str = ""                                                     # a job YAML (config jobs)
    overrides: list[str] = dataclasses.field(default_factory=list)    # `{out}` = the demo's out_dir
    quick: list[str] = dataclasses.field(default_factory=list)        # extra overrides when quick
    args: list[str] = dataclasses.field(default_factory=list)         # command line (generate)


def _default_stages() -> list[Stage]:
    ae = "{out}/autoencoder/autoencoder"
    return [
        # 2-line stanzas: what the CPU autoencoder learns to reconstruct within minutes
        Stage("prep", "prep", "yamls/prep/bundled.yaml", ["out_dir={out}/text_shards",
              "sources.gutenberg.min_lines=2", "sources.gutenberg.max_lines=2"],
              ["sources.gutenberg.max_stanzas=2000"]),
        Stage("autoencoder", "train", "yamls/autoencoder/tiny_cpu.yaml",
              ["out_dir={out}/autoencoder", "data.path={out}/text_shards", "model.max_tokens=32", "max_minutes=8"],
              ["max_minutes=1.5"]),
        Stage("encode", "encode", "yamls/encode/bundled.yaml",
              ["out_dir={out}/latents", f"autoencoder={ae}", "data.path={out}/text_shards"]),
        Stage("pretrain_masked", "train", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml",
              ["out_dir={out}/diffusion_pretrain", "data.path={out}/latents/train",
               "data.eval_path={out}/latents/val", f"autoencoder={ae}", "max_minutes=4"], ["max_duration=60ba"]),
        Stage("finetune_unmasked", "train", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml",
              ["out_dir={out}/diffusion_finetune", "data.path={out}/latents/train",
               "data.eval_path={out}/latents/val", f"autoencoder={ae}",
               "load_path={out}/diffusion_pretrain/checkpoints/latest-rank0.pt", "max_minutes=3"],
              ["max_duration=30ba"]),
        Stage("generate", "generate", args=[
            "{out}/diffusion_finetune/pipeline", "--prompt", "sonnet about love", "--prompt", "tanka by Ono no Komachi",
            "--prompt", "stanza in iambic pentameter", "--num-samples", "2", "--steps", "18", "--guidance", "3",
            "--seed", "0", "--show-steps", "6", "--out", "{out}/poems.json"]),
        Stage("evaluate_autoencoder", "evaluate", "yamls/eval/autoencoder.yaml",
              ["out_dir={out}/eval_autoencoder", f"autoencoder_dir={ae}", "data_path={out}/text_shards"],
              ["n_samples=100"]),
        Stage("evaluate_generation", "evaluate", "yamls/eval/generation.yaml",
              ["out_dir={out}/eval", "pipeline={out}/diffusion_finetune/pipeline", "latent_data={out}/latents"],
              ["samples_per_prompt=8"]),
    ]


@dataclasses.dataclass
class DemoConfig:
    out_dir: str = "out/demo"
    quick: bool = False
    only: list[str] = dataclasses.field(default_factory=list)   # run just these stages (by name)
    stages: list[Stage] = dataclasses.field(default_factory=_default_stages)


CONFIG = DemoConfig


def run(cfg: DemoConfig) -> dict:
    from trainer.check_imports import check
    from trainer.cli import NotBuilt, load_config, load_job_module

    os.makedirs(cfg.out_dir, exist_ok=True)
    log.info("import check: " + ", ".join(f"{k} {v}" for k, v in check().items()))
    fill = (lambda xs: [x.replace("{out}", cfg.out_dir) for x in xs])
    done, skipped, timings = [], [], {}
    t_all = time.time()
    for stage in cfg.stages:
        if cfg.only and stage.name not in cfg.only:
            continue
        try:
            module = load_job_module(stage.job)
        except NotBuilt as e:
            log.warning(f"stage {stage.name}: skipped: {e}")
            skipped.append(stage.name)
            continue
        t = time.time()
        if stage.args:
            log.info(f"stage {stage.name}: latentverse {stage.job} {' '.join(fill(stage.args))}")
            parser = argparse.ArgumentParser(prog=f"latentverse {stage.job}")
            module.add_arguments(parser)
            module.main(parser.parse_args(fill(stage.args)))
        else:
            overrides = fill(stage.overrides + (stage.quick if cfg.quick else []))
            log.info(f"stage {stage.name}: latentverse {stage.job} {stage.yaml} {' '.join(overrides)}")
            module.run(load_config(module, stage.yaml, overrides))
        timings[stage.name] = round(time.time() - t, 1)
        log.info(f"stage {stage.name}: done in {timings[stage.name]} s")
        done.append(stage.name)
    summary = {"out_dir": os.path.abspath(cfg.out_dir), "done": done, "skipped": skipped,
               "seconds": round(time.time() - t_all, 1), "stage_seconds": timings, "quick": cfg.quick}
    with open(os.path.join(cfg.out_dir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"demo: ran {done or 'no stages'}; not built yet: {skipped or 'none'}; "
          f"{summary['seconds']} s; output in {summary['out_dir']}")
    return summary
