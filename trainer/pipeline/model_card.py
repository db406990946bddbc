"""README.md, the model card of an exported pipeline folder, written at export.

    model_card.write(pipeline_dir, {"data": [...], "training": {...}, "report": "out/eval/report.json"})

It says what the folder holds and how big each part is (parameters counted from the safetensors
headers), what the denoiser was trained on and for how long (the `card` the training job passes, and
the denoiser's own record: batches, EMA), and the evaluation's figures when `card["report"]` names a
report.json that exists (the flat numbers in it). After an evaluation of the folder,
`add_evaluation(pipeline_dir, report_json)` (the generation evaluation calls it) rewrites only that
section.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


CARD = "README.md"
EVALUATION = "## Evaluation"
_PARTS = (("denoiser", "the EMA denoiser (diffusers ModelMixin)"),
          ("autoencoder", "the latent encoder / decoder"),
          ("prompt_encoder", "the prompt encoder (weights and tokenizer inside)"))


def parameters(folder: str) -> int:
    """Parameters in the safetensors files of a folder, from their headers (nothing loaded)."""
    from safetensors import safe_open

    n = 0
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                for k in f.keys():
                    shape = f.get_slice(k).get_shape()
                    n += math.prod(shape)
    return n


def _figures(report: str) -> dict[str, Any]:
    """The report's figures, flat ("adherence.form.accuracy"): every number in it but the run's
    configuration (its settings, not its results)."""
    with open(report) as f:
        data = json.load(f)
    out = {}

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{prefix}{k}"] = v
    walk({k: v for k, v in data.items() if k != "config"})
    return out


def evaluation_section(report: str | None) -> list[str]:
    """The card's "## Evaluation" section: the figures of `report` (a report.json), if it exists."""
    lines = [EVALUATION, ""]
    if report and os.path.isfile(report):
        lines += [f"From `{report}`:", "", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.4g} |" for k, v in _figures(report).items()]
    else:
        lines.append("No evaluation report yet (`latentverse evaluate task=generation` on this folder writes its figures here).")
    return lines


def render(path: str, card: dict) -> str:
    with open(os.path.join(path, "denoiser", "config.json")) as f:
        den = json.load(f)
    info = den.get("info") or {}
    lines = ["---", "library_name: diffusers", "tags: [latent-diffusion, text-generation, poetry, latentverse]", "---",
             "", f"# {card.get('name') or info.get('run_name') or 'latentverse poem generator'}", "",
             "A latent-diffusion poem generator exported by latentverse: a prompt is encoded, the denoiser samples",
             "a latent, the autoencoder reads it out as a poem.", "",
             "```python", "from trainer.pipeline.pipeline import LatentversePipeline",
             "pipe = LatentversePipeline.from_pretrained(\"<this folder>\")",
             "print(pipe([\"a sonnet about the sea\"], num_samples=2))", "```", "", "## Parts and sizes", "",
             "| part | what | parameters |", "| --- | --- | --- |"]
    for name, what in _PARTS:
        lines.append(f"| `{name}/` | {what} | {parameters(os.path.join(path, name)):,} |")
    dcfg = den.get("denoiser", {})
    lines += ["", f"Denoiser: `{dcfg.get('kind')}`, latents [{dcfg.get('latent_tokens')}, {dcfg.get('latent_dim')}], "
              f"prompt width {dcfg.get('prompt_dim')}, sigma_data {den.get('sigma_data'):.4f}, "
              f"normalisation `{den.get('normalize')}`.", "", "## Data", ""]
    data = card.get("data") or []
    lines += [f"- {d}" for d in data] or ["- not recorded"]
    lines += ["", "## Training", ""]
    training = {"batches": info.get("batches"), "weights": info.get("weights"), "ema_decay": info.get("ema_decay"),
                "mask_ratio": info.get("mask_ratio"), **(card.get("training") or {})}
    lines += [f"- {k}: {v}" for k, v in training.items() if v is not None]
    lines += ["", *evaluation_section(card.get("report"))]
    return "\n".join(lines) + "\n"


def _write_atomic(out: str, text: str) -> None:
    tmp = f"{out}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)   # a reader sees the old card or the whole new one


def write(path: str, card: dict) -> str:
    out = os.path.join(path, CARD)
    _write_atomic(out, render(path, card))
    return out


def add_evaluation(path: str, report: str) -> str:
    """After an evaluation of the pipeline folder `path`: its card's Evaluation section becomes the
    figures of `report`; every other section stays as the export wrote it (a folder without a card
    gets one, its data and training unrecorded)."""
    out = os.path.join(path, CARD)
    if not os.path.isfile(out):
        return write(path, {"report": report})
    with open(out, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index(EVALUATION) if EVALUATION in lines else len(lines)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head = lines[:start] if start < len(lines) else lines + [""]
    _write_atomic(out, "\n".join([*head, *evaluation_section(report), *([""] + lines[end:] if end < len(lines) else [])]) + "\n")
    return out
