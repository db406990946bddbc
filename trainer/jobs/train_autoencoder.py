"""Train the BART-Perceiver latent autoencoder with Composer on the prep job's text shards.

Reads data.path/<train_split> with a StreamingDataset (mid-epoch resume), evaluates on
data.path/<eval_split> (loss, token accuracy teacher-forced and greedy from the latent), saves
checkpoints under out_dir/checkpoints (autoresume by run_name), and exports out_dir/autoencoder
(safetensors + JSON config + tokenizer + lexicon). A run that finds its export already there skips.
With `adapt.init_from` it adapts an exported autoencoder's decoder instead (the latents stay).
The steps every training job shares are in trainer/training/job.py.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Literal, Optional

import torch
from composer.core import Callback
from composer.utils import dist

from trainer.base.config import UserError
from trainer.base.log import get_logger
from trainer.data.mds import read_texts
from trainer.data.texts import TextDataConfig, text_dataloader, text_split_dir
from trainer.evaluation.metrics import GaussianLatents
from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
from trainer.models.lexicon import Lexicon
from trainer.models.tokenizers import TokenizerConfig
from trainer.training.autoencoder_model import AutoencoderComposerModel
from trainer.training.callbacks import plot_training_curve
from trainer.training.job import Parts, TrainingConfig, TrainingJob, run_training
from trainer.training.tokenizer_run import run_tokenizer

log = get_logger("train.autoencoder")


@dataclasses.dataclass
class AdaptConfig:
    """Decoder adaptation: start from an exported autoencoder, freeze what makes the latents (token
    embeddings, BART encoder, Perceiver: latents, and a diffusion model trained on them, stay valid)
    and train the decoder side on latents pulled toward the Gaussian fitted to the encoder's latents
    (LatentAutoencoder.set_latent_prior). Off while init_from is None."""
    init_from: Optional[str] = None     # an exported autoencoder directory (a run's out_dir/autoencoder)
    prior_mix: float = 0.5              # a ~ U(0, prior_mix); 1 reaches pure Gaussian draws (fewer near-words, less faithful)
    samples: int = 20000                # training poems encoded for the latents' mean and covariance

    def __post_init__(self):
        if not 0.0 < self.prior_mix <= 1.0:
            raise ValueError(f"prior_mix must be in (0, 1], got {self.prior_mix}")
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2, got {self.samples}")


@dataclasses.dataclass
class LexiconConfig:
    # The words the export's decoder may spell with decode.lexicon (trainer/models/lexicon.py): those
    # seen at least min_count times in up to `texts` training texts spread over the split (a
    # min_count of 2 leaves out one-off misspellings). An adaptation keeps its init_from's lexicon.
    min_count: int = 2
    texts: int = 200_000

    def __post_init__(self):
        if self.min_count < 1 or self.texts < 1:
            raise ValueError(f"min_count and texts must be >= 1, got {self.min_count} and {self.texts}")


@dataclasses.dataclass
class AutoencoderTrainConfig(TrainingConfig):
    task: Literal["autoencoder"] = "autoencoder"
    out_dir: str = "out/autoencoder"
    run_name: str = "autoencoder"
    model: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)
    lexicon: LexiconConfig = dataclasses.field(default_factory=LexiconConfig)
    max_duration: str = "3000ba"
    greedy_eval: bool = True


CONFIG = AutoencoderTrainConfig


class TextCollate:
    """A list of shard records -> {'input_ids', 'attention_mask'} for the autoencoder's tokenizer."""

    def __init__(self, tokenizer, max_tokens: int, column: str):
        self.tokenizer, self.max_tokens, self.column = tokenizer, max_tokens, column

    def __call__(self, records: list[dict]) -> dict:
        enc = self.tokenizer([r[self.column] for r in records], truncation=True, max_length=self.max_tokens,
                             padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class TrainStep(Callback):
    """Tells the model the optimizer step, for its decoder-token-dropout schedule (right after resume too)."""

    def batch_start(self, state, logger):
        m = state.model.module if hasattr(state.model, "module") else state.model
        m.autoencoder.train_step = int(state.timestamp.batch)


def adaptable_autoencoder(cfg: AutoencoderTrainConfig, train_local: str):
    """The exported autoencoder at adapt.init_from with only its decoder side trainable (reconstruction
    network, BART decoder layers, bag-of-words head; the token embeddings are shared with the encoder
    and stay frozen), the decoder-input dropout held at the value its training ended with, and the
    latent prior fitted on adapt.samples training poems spread over the split."""
    a = cfg.adapt
    if not os.path.isfile(os.path.join(a.init_from, "autoencoder_config.json")):
        raise UserError(f"adapt.init_from: {a.init_from!r} is not an exported autoencoder directory "
                        "(no autoencoder_config.json)")
    ae = LatentAutoencoder.from_pretrained(a.init_from)
    ae.requires_grad_(False)
    for name, p in ae.named_parameters():
        if name.startswith(("reconstruction.", "bow_head.")) or (
                name.startswith("bart.model.decoder.") and "embed_tokens" not in name):
            p.requires_grad_(True)
    c = ae.cfg
    ae.exported_cfg = c
    end = c.decoder_token_dropout if c.decoder_token_dropout_start is None else c.decoder_token_dropout_end
    ae.cfg = dataclasses.replace(c, decoder_token_dropout=min(end, 0.99), decoder_token_dropout_start=None,
                                 decoder_token_dropout_end=None, decoder_token_dropout_anneal_steps=0)
    t = time.time()
    texts = read_texts(train_local, cfg.data.text_column, a.samples, spread=True)  # every source, not the first
    with torch.no_grad():
        prior = GaussianLatents(torch.cat([ae.encode(texts[i:i + 256]) for i in range(0, len(texts), 256)]))
    ae.set_latent_prior(prior.mean, prior.factor, a.prior_mix)
    log.info(f"latent prior fitted on {len(texts)} training poems in {time.time() - t:.1f} s; "
             f"{sum(p.numel() for p in ae.parameters() if p.requires_grad) / 1e6:.2f}M decoder-side parameters trained")
    return ae



class AutoencoderJob(TrainingJob):
    export_name, export_marker, summary_key = "autoencoder", "autoencoder_config.json", "autoencoder_dir"

    @property
    def clean_shared_memory(self) -> bool:
        return self.cfg.data.clean_shared_memory

    def check(self) -> None:
        self.train_local = text_split_dir(self.cfg.data, self.cfg.data.train_split)
        self.eval_local = text_split_dir(self.cfg.data, self.cfg.data.eval_split)

    def build(self, world: int, per_rank: int) -> Parts:
        cfg = self.cfg
        if cfg.adapt.init_from:
            autoencoder = adaptable_autoencoder(cfg, self.train_local)
            tokenizer = autoencoder.tokenizer
            self.cfg = cfg = dataclasses.replace(cfg, model=autoencoder.exported_cfg)  # the export's model section
        else:
            tokenizer = run_tokenizer(cfg.out_dir, cfg.tokenizer, self.train_local, cfg.data.text_column,
                                      cfg.model.pretrained_path)
            autoencoder = LatentAutoencoder(cfg.model, tokenizer)
        self.autoencoder = autoencoder
        model = AutoencoderComposerModel(autoencoder, greedy_eval=cfg.greedy_eval)
        n_train = sum(p.numel() for p in autoencoder.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in autoencoder.parameters())
        log.info(f"autoencoder: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained; vocab {len(tokenizer)}")
        collate = TextCollate(tokenizer, cfg.model.max_tokens, cfg.data.text_column)
        return Parts(model, text_dataloader(self.train_local, collate, cfg.data, per_rank, True, cfg.seed),
                     text_dataloader(self.eval_local, collate, cfg.data, per_rank, False, cfg.seed),
                     max(1, math.ceil(cfg.data.eval_samples / per_rank)), callbacks=[TrainStep()],
                     plot=plot_training_curve, plot_name="training_curve.png")

    def export(self, trainer, parts: Parts, summary: dict) -> dict:
        cfg, autoencoder = self.cfg, self.autoencoder
        if dist.get_global_rank() == 0:
            autoencoder.cfg = getattr(autoencoder, "exported_cfg", autoencoder.cfg)  # as it was exported
            if autoencoder.lexicon is None:
                texts = read_texts(self.train_local, cfg.data.text_column, cfg.lexicon.texts, spread=True)
                autoencoder.lexicon = Lexicon.from_texts(texts, cfg.lexicon.min_count)
                log.info(f"lexicon: {len(autoencoder.lexicon)} words seen >= {cfg.lexicon.min_count} times in "
                         f"{len(texts)} texts")
            autoencoder.save_pretrained(self.export_dir)
            log.info(f"exported {self.export_dir} after {summary['batches']} batches")
        return {}


def run(cfg: AutoencoderTrainConfig) -> dict:
    return run_training(AutoencoderJob(cfg))
