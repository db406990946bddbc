"""The end-to-end demo on the bundled corpus, every stage a real job with its own YAML, all writing
below one output folder:

    prep -> autoencoder -> decoder adaptation -> encode -> masked pretraining -> unmasked finetuning
         (exports the pipeline)
         -> generate for a few prompts -> evaluate (autoencoder and generation)

`quick: true` (yamls/demo/quick.yaml) runs the same stages on a small slice with short budgets for a
first look; `data.path=DIR_OR_FILE` runs them on your own poems. Every budget is a number of batches,
so the same demo gives the same model on any machine. Every job skips finished work, so a demo run
again after an interruption continues.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Literal, Optional

from launch.cli import load_config, load_job_module
from trainer.base.check_imports import check
from trainer.base.config import ConfigError
from trainer.base.files import check_out_dir, read_json, write_json_atomic
from trainer.base.log import get_logger

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
    # The adapted autoencoder: the same encoder (the same latents), a decoder that reads the diffusion
    # model's samples; every stage after adapt_decoder uses it.
    ae = "{out}/autoencoder_adapted/autoencoder"
    return [
        # 2-line stanzas: what the CPU autoencoder learns to reconstruct within minutes
        Stage("prep", "prep", "yamls/prep/bundled.yaml", ["out_dir={out}/text_shards",
              "sources.gutenberg.min_lines=2", "sources.gutenberg.max_lines=2"],
              ["sources.gutenberg.max_stanzas=2000"]),
        Stage("autoencoder", "train", "yamls/autoencoder/tiny_cpu.yaml",
              # 4,800 batches (~20 minutes at ~4 batches/s): the budget is batches, never minutes.
              # (model.latent_noise=0.5 reconstructs better but the DiT's poems got worse: see docs/experiments.md)
              ["out_dir={out}/autoencoder", "data.path={out}/text_shards", "model.max_tokens=32",
               "max_duration=4800ba"],
              ["max_duration=400ba"]),
        Stage("adapt_decoder", "train", "yamls/autoencoder/adapt_decoder_tiny_cpu.yaml",
              ["out_dir={out}/autoencoder_adapted", "adapt.init_from={out}/autoencoder/autoencoder",
               "data.path={out}/text_shards"], ["max_duration=60ba", "adapt.samples=2000"]),
        Stage("encode", "encode", "yamls/encode/bundled.yaml",
              ["out_dir={out}/latents", f"autoencoder={ae}", "data.path={out}/text_shards"]),
        Stage("pretrain_masked", "train", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml",
              ["out_dir={out}/diffusion_pretrain", "data.root={out}/latents/train",
               "data.eval_path={out}/latents/val", f"autoencoder={ae}"], ["max_duration=60ba", "eval_interval=60ba"]),
        Stage("finetune_unmasked", "train", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml",
              ["out_dir={out}/diffusion_finetune", "data.root={out}/latents/train",
               "data.eval_path={out}/latents/val", f"autoencoder={ae}",
               "load_path={out}/diffusion_pretrain/checkpoints/latest-rank0.pt"],
              ["max_duration=30ba", "eval_interval=30ba"]),
        Stage("generate", "generate", args=[
            "{out}/diffusion_finetune/pipeline", "--prompt", "sonnet about love", "--prompt", "tanka by Ono no Komachi",
            "--prompt", "stanza in iambic pentameter", "--num-samples", "2", "--seed", "0", "--show-steps", "6",
            "--out", "{out}/poems.json"]),
        Stage("evaluate_autoencoder", "evaluate", "yamls/eval/autoencoder.yaml",
              ["out_dir={out}/eval_autoencoder", f"autoencoder_dir={ae}", "data_path={out}/text_shards"],
              ["n_samples=100"]),
        Stage("evaluate_generation", "evaluate", "yamls/eval/generation.yaml",
              ["out_dir={out}/eval", "pipeline={out}/diffusion_finetune/pipeline", "latent_data={out}/latents"],
              ["samples_per_prompt=8"]),
    ]


def _token_stages() -> list[Stage]:
    """The second latent space on the same text shards and split, with the same diffusion budget:
    a token LM -> token-embedding latents -> the same two diffusion stages -> the same evaluation."""
    lm = "{out}/token_lm/latent_encoder"
    tok = ["data.root={out}/token_latents/train", "data.eval_path={out}/token_latents/val", f"autoencoder={lm}"]
    return [
        Stage("token_lm", "train", "yamls/autoencoder/token_embeddings_tiny_cpu.yaml",
              ["out_dir={out}/token_lm", "data.path={out}/text_shards"], ["max_duration=100ba"]),
        Stage("token_encode", "encode", "yamls/encode/token_embeddings.yaml",
              ["out_dir={out}/token_latents", f"autoencoder={lm}", "data.path={out}/text_shards"]),
        Stage("token_pretrain_masked", "train", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml",
              ["out_dir={out}/token_diffusion_pretrain", "run_name=dit-tiny-cpu-tokens-masked", *tok],
              ["max_duration=60ba", "eval_interval=60ba"]),
        Stage("token_finetune_unmasked", "train", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml",
              ["out_dir={out}/token_diffusion_finetune", "run_name=dit-tiny-cpu-tokens-unmasked", *tok,
               "load_path={out}/token_diffusion_pretrain/checkpoints/latest-rank0.pt"],
              ["max_duration=30ba", "eval_interval=30ba"]),
        Stage("token_evaluate_generation", "evaluate", "yamls/eval/generation.yaml",
              ["out_dir={out}/token_eval", "pipeline={out}/token_diffusion_finetune/pipeline",
               "latent_data={out}/token_latents"], ["samples_per_prompt=8"]),
    ]


@dataclasses.dataclass
class DemoData:
    """Your own poems instead of the bundled corpus: a folder tree, a JSONL or a CSV file (or a
    webdataset tar). Every stage runs on them as on the bundled corpus; a poem longer than the demo's
    autoencoder window is split at stanza and line boundaries into pieces, none dropped."""
    path: Optional[str] = None
    format: Optional[Literal["folder", "jsonl", "csv", "wds"]] = None   # None: from the path
    text_column: str = "text"                # JSONL / CSV: the poem's column
    max_tokens: int = 32                     # a piece's length bound (the demo autoencoder's window)

    def prep_overrides(self) -> list[str]:
        if self.path is None:
            return []
        if not os.path.exists(self.path):
            raise ConfigError(f"data.path: no such file or folder: {self.path!r}")
        fmt = self.format or ("folder" if os.path.isdir(self.path) else
                              {".jsonl": "jsonl", ".csv": "csv", ".tar": "wds"}.get(os.path.splitext(self.path)[1]))
        if fmt is None:
            raise ConfigError(f"data.format: cannot tell the format of {self.path!r}; set folder, jsonl, csv or wds")
        return [f"data.path={self.path}", f"data.format={fmt}", f"data.text_column={self.text_column}",
                f"clean.max_tokens={self.max_tokens}", "sources.gutenberg.enabled=false",
                "sources.shakespeare.enabled=false", "sources.ogura.enabled=false"]


@dataclasses.dataclass
class DemoConfig:
    out_dir: str = "out/demo"
    quick: bool = False
    data: DemoData = dataclasses.field(default_factory=DemoData)
    only: list[str] = dataclasses.field(default_factory=list)   # run just these stages (by name)
    stages: list[Stage] = dataclasses.field(default_factory=_default_stages)
    # Also train the second latent space (a causal LM's token embeddings) on the same shards with the
    # same diffusion budget, evaluate it the same way and write latent_comparison.{json,md,png}.
    token_latents: bool = False
    token_stages: list[Stage] = dataclasses.field(default_factory=_token_stages)


CONFIG = DemoConfig


def _command(stage: Stage, cfg: DemoConfig) -> tuple[list[str], list[str]]:
    """(overrides, argv) of a stage, with `{out}` filled in and the user's poems in the prep stage."""
    fill = (lambda xs: [x.replace("{out}", cfg.out_dir) for x in xs])
    extra = cfg.data.prep_overrides() if stage.job == "prep" else []
    return fill(stage.overrides + (stage.quick if cfg.quick else []) + extra), fill(stage.args)


def _budget(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("max_duration=")), "")


def run_stage(stage: Stage, cfg: DemoConfig) -> None:
    module = load_job_module(stage.job)
    overrides, argv = _command(stage, cfg)
    if argv:
        log.info(f"stage {stage.name}: latentverse {stage.job} {' '.join(argv)}")
        parser = argparse.ArgumentParser(prog=f"latentverse {stage.job}")
        module.add_arguments(parser)
        module.main(parser.parse_args(argv))
    else:
        log.info(f"stage {stage.name}: latentverse {stage.job} {stage.yaml} {' '.join(overrides)}")
        module.run(load_config(module, stage.yaml, overrides))


def write_summary(cfg: DemoConfig, summary: dict) -> None:
    """out_dir/demo_summary.json; a run in the same folder (the latent comparison after the demo, a
    resumed demo) keeps the summaries before it, so the first run's stage times are not lost."""
    path = os.path.join(cfg.out_dir, "demo_summary.json")
    try:
        before = read_json(path)
    except ValueError:   # unreadable: kept beside, not overwritten
        os.replace(path, f"{path}.unreadable-{int(time.time())}")
        log.warning(f"{path}: not JSON; kept as {path}.unreadable-*")
        before = None
    if isinstance(before, dict):
        summary["earlier"] = before.pop("earlier", []) + [before]
    write_json_atomic(path, summary)


def run(cfg: DemoConfig) -> dict:
    cfg.data.prep_overrides()   # a bad data.path is refused before any work
    check_out_dir(cfg.out_dir)
    log.info("import check: " + ", ".join(f"{k} {v}" for k, v in check().items()))
    stages = [s for s in cfg.stages + (cfg.token_stages if cfg.token_latents else []) if not cfg.only or s.name in cfg.only]
    log.info("the stages, each trained to a budget of batches (the same model on any machine; each stage "
             "estimates its time after its first batches): "
             + ", ".join(f"{s.name}" + (f" ({_budget(_command(s, cfg)[0])})" if _budget(_command(s, cfg)[0]) else "")
                         for s in stages))
    done, timings, t_all = [], {}, time.time()
    for k, stage in enumerate(stages, 1):
        t = time.time()
        run_stage(stage, cfg)
        timings[stage.name] = round(time.time() - t, 1)
        done.append(stage.name)
        log.info(f"stage {stage.name} ({k}/{len(stages)}): done in {timings[stage.name]} s; "
                 f"{time.time() - t_all:.0f} s so far")
    reports = [os.path.join(cfg.out_dir, d, "report.json") for d in ("eval", "token_eval")]
    if cfg.token_latents and all(os.path.isfile(r) for r in reports):
        compare_latent_spaces(*reports, os.path.join(cfg.out_dir, "latent_comparison"))
    summary = {"out_dir": os.path.abspath(cfg.out_dir), "done": done, "seconds": round(time.time() - t_all, 1),
               "stage_seconds": timings, "quick": cfg.quick, "data": cfg.data.path or "bundled corpus"}
    write_summary(cfg, summary)
    print(f"demo: ran {done or 'no stages'} in {summary['seconds']} s; output in {summary['out_dir']}")
    return summary


# ---------------------------------------------------------------------------------------------
# the two latent spaces side by side

# (name, how to read it from a generation report, which direction is better)
COMPARED = [
    ("Fréchet ÷ real-vs-real (latents)", lambda r: r["frechet"]["ratio"], "lower"),
    # Spelt freely: only the BART autoencoder can spell from a lexicon, so that is no comparison of spaces.
    ("word validity (free spelling)", lambda r: r["word_validity"].get("generated_free", r["word_validity"]["generated"]),
     "higher"),
    ("4-gram memorisation − held-out's own", lambda r: r["memorisation_4gram"]["generated"]
     - r["memorisation_4gram"]["held_out"], "lower"),
    ("adherence: form", lambda r: r["adherence"].get("form", {}).get("accuracy"), "higher"),
    ("adherence: meter", lambda r: r["adherence"].get("meter", {}).get("accuracy"), "higher"),
    ("distinct-2 − held-out's", lambda r: abs(r["distinct"]["distinct_2"]["generated"]
                                              - r["distinct"]["distinct_2"]["real"]), "lower"),
    ("MAUVE (MiniLM features)", lambda r: r["mauve"] if isinstance(r["mauve"], float) else None, "higher"),
]
SPACES = ("BART-Perceiver [32 x 64]", "token embeddings [32 x 64]")


def compare_latent_spaces(report_a: str, report_b: str, out_prefix: str) -> list[dict]:
    """Rows (metric, value per space, better, winner) from two generation reports of the same held-out
    split; writes <out_prefix>.json, .md (a table) and .png (one bar pair per metric)."""
    ra, rb = (json.load(open(p)) for p in (report_a, report_b))
    rows = []
    for name, get, better in COMPARED:
        a, b = _get(get, ra), _get(get, rb)
        winner = None
        if a is not None and b is not None and a != b:
            winner = SPACES[0] if (a < b) == (better == "lower") else SPACES[1]
        rows.append({"metric": name, SPACES[0]: a, SPACES[1]: b, "better": better, "winner": winner})
    with open(out_prefix + ".json", "w") as f:
        json.dump({"reports": [report_a, report_b], "rows": rows}, f, indent=1)
    fmt = (lambda v: "n/a" if v is None else f"{v:.3f}")
    lines = [f"| metric (better) | {SPACES[0]} | {SPACES[1]} | wins |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} ({r['better']}) | {fmt(r[SPACES[0]])} | {fmt(r[SPACES[1]])} | "
                     f"{(r['winner'] or 'tie / n/a').split(' [')[0]} |")
    with open(out_prefix + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot_comparison(rows, out_prefix + ".png")
    print("\n".join(lines))
    return rows


def _get(get, report):
    try:
        v = get(report)
    except (KeyError, TypeError):
        return None
    return None if v is None else float(v)


def _plot_comparison(rows: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(11, 4))
    xs = np.arange(len(rows))
    for k, (space, colour) in enumerate(zip(SPACES, ("tab:blue", "tab:orange"))):
        ax.bar(xs + (k - 0.5) * 0.4, [r[space] or 0 for r in rows], 0.4, label=space, color=colour)
    ax.set_xticks(xs, [f"{r['metric']}\n({r['better']} is better)" for r in rows], fontsize=7)
    ax.set_title("the two latent spaces on the same held-out split and diffusion budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
