"""`latentverse evaluate task=generation`: an exported pipeline's samples against held-out poems.

Samples: `samples_per_prompt` poems for each of the `n_prompts` most common held-out prompts. Their
fidelity (Fréchet distance), diversity (distinct-n), memorisation, word validity and MAUVE, and the
denoiser-vs-linear check, are defined in trainer/evaluation/generation.py; prompt adherence (form,
meter; scansion) in trainer/evaluation/adherence.py. Writes report.json and generation_panel.png, and
the figures into the pipeline folder's model card (README.md, its Evaluation section).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Literal, Optional

from trainer.base import uris
from trainer.base.config import ExistingPath
from trainer.base.files import check_out_dir
from trainer.base.log import get_logger
from trainer.evaluation import generation as G
from trainer.evaluation.adherence import label_adherence
from trainer.evaluation.metrics import GaussianLatents, most_common, vocabulary
from trainer.evaluation.plots import plot_panel
from trainer.evaluation.report import generation_summary, write_report
from trainer.evaluation.samples import Sampling, check_enough, generate, read_latent_split, spelt_freely
from trainer.pipeline import model_card
from trainer.pipeline.hf import MODEL_INDEX
from trainer.pipeline.pipeline import Pipeline

log = get_logger("evaluate")


@dataclasses.dataclass
class EvalGenerationConfig:
    task: Literal["generation"] = "generation"
    out_dir: str = "out/demo/eval"
    pipeline: ExistingPath = "out/demo/pipeline"
    latent_data: ExistingPath = "out/demo/latents"     # latent shards: <latent_data>/<split>/index.json
    train_split: str = "train"
    held_out_split: str = "test"
    n_real: int = 400                    # held-out poems used as the real reference
    max_train: int = 20000               # training poems for the n-gram set, vocabulary and classifiers
    n_prompts: int = 4
    samples_per_prompt: int = 16
    labels: list[str] = dataclasses.field(default_factory=lambda: ["form", "meter"])
    n_label_values: int = 4              # most common values of each label
    pca_dims: int = 32
    steps: Optional[int] = None          # sampler steps (None = the pipeline's)
    guidance: Optional[float] = None
    churn: Optional[float] = None        # the Heun sampler's S_churn (None = the pipeline's)
    sampler: Literal["heun", "ddpm"] = "heun"
    meter_readings: Optional[int] = None  # readings per latent for prompts naming a meter (None = the pipeline's)
    seed: int = 0
    mauve: bool = True
    n_linear_check: int = 128            # held-out latents for the denoiser-vs-linear check

    def __post_init__(self):
        # Checked here, before the pipeline and the latents are read, rather than by the sampler's own
        # config in the middle of the run.
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.churn is not None and self.churn < 0:
            raise ValueError(f"churn: must be >= 0, got {self.churn}")
        if self.churn is not None and self.sampler != "heun":
            raise ValueError("churn: only with sampler heun")
        if self.meter_readings is not None and self.meter_readings < 1:
            raise ValueError(f"meter_readings: must be >= 1, got {self.meter_readings}")


CONFIG = EvalGenerationConfig


def run(cfg: EvalGenerationConfig) -> dict:
    import torch

    check_out_dir(cfg.out_dir, create=False)
    given = cfg.pipeline if uris.is_uri(cfg.pipeline) else os.path.abspath(cfg.pipeline)
    card = not uris.is_uri(cfg.pipeline)   # a pipeline in a bucket keeps its card; the figures are in report.json
    # URIs are read from their node-local copies (trainer/base/uris.py)
    cfg = dataclasses.replace(cfg, pipeline=uris.local_path(cfg.pipeline, "pipeline"),
                              latent_data=uris.local_path(cfg.latent_data, "latent_data"))
    torch.manual_seed(cfg.seed)
    pipe = Pipeline.from_pretrained(cfg.pipeline)
    train = read_latent_split(cfg.latent_data, cfg.train_split, cfg.max_train)
    held = read_latent_split(cfg.latent_data, cfg.held_out_split, cfg.n_real)
    check_enough(train, held)
    report: dict = {"pipeline": given, "n_train": len(train["text"]),
                    "n_held_out": len(held["text"]), "config": dataclasses.asdict(cfg)}
    sampling = Sampling.of(cfg)

    prompts = most_common(held["prompt"], cfg.n_prompts) or [""]
    log.info(f"generating {cfg.samples_per_prompt} samples for each of {prompts}")
    samples = generate(pipe, prompts, sampling)
    n_gen = len(samples.poems)
    report["decode_meter_readings"] = pipe.meter_readings(cfg.meter_readings)
    report["samples"] = samples.records()
    report["frechet"] = G.frechet(train["latent"], held["latent"], samples.latents, cfg.pca_dims)

    gauss = GaussianLatents(train["latent"], pipe.normalizer)
    report["denoiser_vs_linear"] = G.denoiser_vs_linear(pipe, gauss, held["latent"][:cfg.n_linear_check],
                                                        held["prompt"][:cfg.n_linear_check], seed=cfg.seed)
    # The baseline a DiT has to beat: as many draws from the Gaussian fitted to the training latents,
    # decoded the same way (no prompt).
    gauss_x = gauss.sample(n_gen, cfg.seed).to(pipe.device)
    gauss_poems = pipe.decode(gauss_x)

    # Real references as a latent can hold them: cut to the tokens the encoder reads, as every sample is.
    held_txt = pipe.autoencoder.clip_texts(held["text"])
    train_txt = pipe.autoencoder.clip_texts(train["text"])      # for the text classifiers
    report["distinct"] = G.distinct(samples.poems, held_txt[:n_gen])
    report["memorisation_4gram"] = G.memorisation_4gram(samples.poems, held_txt, train["text"])
    vocab = vocabulary(train["text"])
    report["word_validity"] = G.word_validity(vocab, generated=samples.poems, held_out=held_txt,
                                              gaussian_draws=gauss_poems, generated_greedy=samples.greedy)
    report["decode_lexicon"] = pipe.uses_lexicon()
    free = None
    if report["decode_lexicon"]:
        # What the decoder spells without the lexicon: the model's own word validity; the lexicon's share
        # is the difference.
        free = spelt_freely(pipe, samples, sampling)
        report["word_validity"].update(G.word_validity(vocab, generated_free=free.poems, generated_free_greedy=free.greedy,
                                                       gaussian_draws_free=pipe.decode(gauss_x, lexicon=False)))

    report["adherence"] = {label: label_adherence(pipe, label, train, held, train_txt, held_txt, sampling,
                                                  cfg.n_label_values, free_spelling=report["decode_lexicon"])
                           for label in cfg.labels}
    report["mauve"] = None
    if cfg.mauve:
        report.update(G.mauve(held_txt[:max(n_gen, 2)], samples.poems, gauss_poems, free.poems if free else None,
                              None if samples.greedy is samples.poems else samples.greedy, seed=cfg.seed))

    os.makedirs(cfg.out_dir, exist_ok=True)
    report["panel_png"] = plot_panel(report, os.path.join(cfg.out_dir, "generation_panel.png"))
    report_file = write_report(cfg.out_dir, report)
    if card and os.path.isfile(os.path.join(cfg.pipeline, MODEL_INDEX)):   # a Hugging Face-shaped folder: its card gets the figures
        model_card.add_evaluation(cfg.pipeline, report_file)
    log.info(generation_summary(report))
    print(generation_summary(report))
    return report
