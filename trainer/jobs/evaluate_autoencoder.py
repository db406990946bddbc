"""`latentverse evaluate task=autoencoder`: how well an exported autoencoder reproduces held-out poems
from their latents (token accuracy, exact match, BLEU, and the latent-shuffle check; the figures are
defined in trainer/evaluation/autoencoder.py). Writes report.json, and the training curve's PNG where
the autoencoder's metrics.jsonl lies beside it."""
from __future__ import annotations

import dataclasses
import os
from typing import Literal

from trainer.base import uris
from trainer.base.config import ExistingPath, UserError
from trainer.base.files import check_out_dir
from trainer.data.mds import read_texts
from trainer.evaluation.autoencoder import evaluate_autoencoder
from trainer.evaluation.report import autoencoder_summary, write_report
from trainer.training.callbacks import plot_training_curve


@dataclasses.dataclass
class EvalAutoencoderConfig:
    task: Literal["autoencoder"] = "autoencoder"
    autoencoder_dir: ExistingPath = "out/demo/autoencoder/autoencoder"
    data_path: ExistingPath = "out/demo/text_shards"  # text shards: <data_path>/<split>/index.json
    split: str = "test"
    text_column: str = "text"
    n_samples: int = 500
    batch_size: int = 64
    num_beams: int = 1
    out_dir: str = "out/demo/eval_autoencoder"


CONFIG = EvalAutoencoderConfig


def run(cfg: EvalAutoencoderConfig) -> dict:
    """Evaluate on the first n_samples of a split; write report.json (+ the training-curve PNG if found).
    A URI autoencoder_dir or data_path is read from its node-local copy (trainer/base/uris.py)."""
    cfg = dataclasses.replace(cfg, autoencoder_dir=uris.local_path(cfg.autoencoder_dir, "autoencoder_dir"),
                              data_path=uris.local_path(cfg.data_path, "data_path"))
    local = os.path.join(cfg.data_path, cfg.split)
    if not os.path.isfile(os.path.join(local, "index.json")):
        raise UserError(f"data_path: {local}/index.json not found")
    check_out_dir(cfg.out_dir, create=False)
    texts = read_texts(local, cfg.text_column, cfg.n_samples)
    report = evaluate_autoencoder(cfg.autoencoder_dir, texts, cfg.batch_size, cfg.num_beams)
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = os.path.join(os.path.dirname(os.path.abspath(cfg.autoencoder_dir)), "metrics.jsonl")
    if os.path.isfile(metrics):
        report["training_curve"] = plot_training_curve(metrics, os.path.join(cfg.out_dir, "training_curve.png"))
    write_report(cfg.out_dir, report)
    print(autoencoder_summary(report, cfg.autoencoder_dir, cfg.split))
    return report
