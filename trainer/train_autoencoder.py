"""Train the BART-Perceiver latent autoencoder with Composer on the prep job's text shards.

Reads data.path/<train_split> with a StreamingDataset (mid-epoch resume), evaluates on
data.path/<eval_split> (loss, token accuracy teacher-forced and greedy from the latent), saves
checkpoints under out_dir/checkpoints (autoresume by run_name), and exports out_dir/autoencoder
(safetensors + JSON config + tokenizer). A run that finds its export already there skips.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Literal, Optional

from trainer.config import UserError
from trainer.log import get_logger
from trainer.models.autoencoder import AutoencoderConfig
from trainer.models.tokenizers import TokenizerConfig

log = get_logger("train.autoencoder")


@dataclasses.dataclass
class DataConfig:
    path: str = "out/demo/text_shards"  # the prep job's out_dir: <path>/<split>/index.json
    train_split: str = "train"
    eval_split: str = "val"
    text_column: str = "text"
    eval_samples: int = 256             # held-out stanzas per evaluation (greedy decoding costs)
    num_workers: int = 0
    # Clean streaming's leaked shared memory at start; turn off when other streaming jobs run on this machine.
    clean_shared_memory: bool = True


@dataclasses.dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.01
    warmup: str = "100ba"
    alpha_f: float = 0.1                # cosine decays to alpha_f * lr
    grad_clip_norm: float = 1.0


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
class AutoencoderTrainConfig:
    task: Literal["autoencoder"] = "autoencoder"
    out_dir: str = "out/autoencoder"
    run_name: str = "autoencoder"
    model: AutoencoderConfig = dataclasses.field(default_factory=AutoencoderConfig)
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    adapt: AdaptConfig = dataclasses.field(default_factory=AdaptConfig)
    lexicon: LexiconConfig = dataclasses.field(default_factory=LexiconConfig)
    batch_size: int = 64                # global; split over the ranks
    max_duration: str = "3000ba"
    max_minutes: Optional[float] = None  # also stop after this much wall-clock training time (this process)
    eval_interval: str = "500ba"
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = 2
    autoresume: bool = True
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"  # auto: bf16 where the GPU has it
    greedy_eval: bool = True
    log_interval: int = 20              # batches between lines in out_dir/metrics.jsonl
    threads: Optional[int] = None       # torch intra-op threads (CPU)
    seed: int = 17

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


CONFIG = AutoencoderTrainConfig


# ---------------------------------------------------------------- data

def split_dir(cfg: AutoencoderTrainConfig, split: str) -> str:
    d = os.path.join(cfg.data.path, split)
    if not os.path.isfile(os.path.join(d, "index.json")):
        raise UserError(f"data.path: {d}/index.json not found (text shards from `latentverse prep` expected)")
    return d


def read_texts(local: str, column: str, limit: Optional[int] = None, spread: bool = False) -> list[str]:
    """The first `limit` texts of a split, in order, or with `spread` `limit` texts evenly spaced over
    it (LocalMDS: reads the prep job's zstd shards, and needs no shared memory for a one-off read)."""
    from data_prep.mds import LocalMDS

    with open(os.path.join(local, "index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        if column not in shard.get("column_names", [column]):
            raise UserError(f"{local}: shards have no column {column!r} (data.text_column)")
    ds = LocalMDS(local)
    n = len(ds) if limit is None else min(len(ds), limit)
    return [ds[i][column] for i in (ds.spread(n) if spread else range(n))]


class TextCollate:
    """A list of shard records -> {'input_ids', 'attention_mask'} for the autoencoder's tokenizer."""

    def __init__(self, tokenizer, max_tokens: int, column: str):
        self.tokenizer, self.max_tokens, self.column = tokenizer, max_tokens, column

    def __call__(self, records: list[dict]) -> dict:
        enc = self.tokenizer([r[self.column] for r in records], truncation=True, max_length=self.max_tokens,
                             padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def dataloader(local: str, tokenizer, cfg: AutoencoderTrainConfig, batch_size: int, train: bool):
    from streaming import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(local=local, batch_size=batch_size, shuffle=train, shuffle_seed=cfg.seed)
    return StreamingDataLoader(ds, batch_size=batch_size, collate_fn=TextCollate(tokenizer, cfg.model.max_tokens,
                               cfg.data.text_column), num_workers=cfg.data.num_workers, drop_last=train)


# ---------------------------------------------------------------- callbacks

def _callbacks(out_dir: str, log_interval: int, max_minutes: Optional[float], autoencoder_steps: bool = False):
    from composer.core import Callback

    class MetricsFile(Callback):
        """Train loss every log_interval batches and every eval result -> out_dir/metrics.jsonl (rank 0)."""

        def __init__(self):
            self.path = os.path.join(out_dir, "metrics.jsonl")
            self.t0 = time.time()

        def _write(self, row):
            from composer.utils import dist

            if dist.get_global_rank() == 0:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")

        def batch_end(self, state, logger):
            b = int(state.timestamp.batch)
            if b % log_interval == 0:
                lr = state.schedulers[0].get_last_lr()[0] if state.schedulers else None
                self._write({"batch": b, "seconds": round(time.time() - self.t0, 1),
                             "train/loss": float(state.loss.detach()), "lr": lr})

        def eval_end(self, state, logger):
            row = {"batch": int(state.timestamp.batch), "seconds": round(time.time() - self.t0, 1)}
            for label, metrics in state.eval_metrics.items():
                for name, m in metrics.items():
                    row[f"{label}/{name}"] = float(m.compute())
            self._write(row)
            log.info("eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in row.items()))

    class WallClockLimit(Callback):
        """Stops training after max_minutes of this process's training time (Composer has no such duration)."""

        def fit_start(self, state, logger):
            self.t0 = time.time()

        def batch_end(self, state, logger):
            if max_minutes is not None and time.time() - self.t0 > 60 * max_minutes:
                log.warning(f"max_minutes={max_minutes} CUT this run at batch {int(state.timestamp.batch)} of its "
                            f"{state.max_duration} budget: the model is not the one its YAML describes")
                state.stop_training()

    class TrainStep(Callback):
        """Tells the model the optimizer step, for its decoder-token-dropout schedule (right after resume too)."""

        def batch_start(self, state, logger):
            m = state.model.module if hasattr(state.model, "module") else state.model
            m.autoencoder.train_step = int(state.timestamp.batch)

    # TrainStep only where the model is the autoencoder (the token-LM job shares the other callbacks).
    return [MetricsFile(), WallClockLimit()] + ([TrainStep()] if autoencoder_steps else [])


# ---------------------------------------------------------------- the job

def _precision(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"  # CPU autocast to bf16 is slower than fp32 on most CPUs


def _tokenizer(cfg: AutoencoderTrainConfig):
    """The run's tokenizer, made once (rank 0) and reused on resume: out_dir/tokenizer."""
    from composer.utils import dist

    from trainer.models.tokenizers import build_tokenizer, load_tokenizer, save_tokenizer

    path = os.path.join(cfg.out_dir, "tokenizer")
    if dist.get_global_rank() == 0 and not os.path.isdir(path):
        texts = None
        if cfg.tokenizer.kind == "bpe":
            texts = read_texts(split_dir(cfg, cfg.data.train_split), cfg.data.text_column, cfg.tokenizer.train_texts)
            log.info(f"training a byte-level BPE of {cfg.tokenizer.vocab_size} tokens on {len(texts)} texts")
        tok = build_tokenizer(cfg.tokenizer, texts, cfg.model.pretrained_path)
        save_tokenizer(tok, path)
    dist.barrier()
    return load_tokenizer(path)


def _last_eval_batch(out_dir: str) -> Optional[int]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    rows = [json.loads(line) for line in open(path) if line.strip()]
    evals = [r["batch"] for r in rows if "eval/TokenAccuracy" in r]
    return evals[-1] if evals else None


def adaptable_autoencoder(cfg: AutoencoderTrainConfig, train_local: str):
    """The exported autoencoder at adapt.init_from with only its decoder side trainable (reconstruction
    network, BART decoder layers, bag-of-words head; the token embeddings are shared with the encoder
    and stay frozen), the decoder-input dropout held at the value its training ended with, and the
    latent prior fitted on adapt.samples training poems spread over the split."""
    import torch

    from trainer.metrics import GaussianLatents
    from trainer.models.autoencoder import LatentAutoencoder

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


def build_trainer(cfg, model, params, train_dl, eval_dl, eval_batches: int, device, autoencoder_steps: bool = False):
    """The Composer Trainer the text-model jobs share (autoencoder, token LM): AdamW over `params`,
    warm-up + cosine, norm clipping, checkpoints with autoresume by run_name, and _callbacks."""
    import torch
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.optim import CosineAnnealingWithWarmupScheduler

    o = cfg.optim
    return Trainer(
        model=model, train_dataloader=train_dl, eval_dataloader=eval_dl, max_duration=cfg.max_duration,
        optimizers=torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay),
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.alpha_f),
        algorithms=[GradientClipping(clipping_type="norm", clipping_threshold=o.grad_clip_norm)],
        eval_interval=cfg.eval_interval, eval_subset_num_batches=eval_batches,
        precision=_precision(cfg.precision), device=device, seed=cfg.seed,
        save_folder=os.path.join(cfg.out_dir, "checkpoints"), save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, run_name=cfg.run_name,
        autoresume=cfg.autoresume, save_overwrite=not cfg.autoresume,
        callbacks=_callbacks(cfg.out_dir, cfg.log_interval, cfg.max_minutes, autoencoder_steps=autoencoder_steps),
        progress_bar=True)


def run(cfg: AutoencoderTrainConfig) -> dict:
    import torch
    from trainer.data import clean_stale_shared_memory

    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.lexicon import Lexicon

    export = os.path.join(cfg.out_dir, "autoencoder")
    if os.path.isfile(os.path.join(export, "autoencoder_config.json")):
        log.info(f"{export} exists: training already finished, skipping (delete it to train again)")
        return {"autoencoder_dir": export, "skipped": True}
    train_local = split_dir(cfg, cfg.data.train_split)
    eval_local = split_dir(cfg, cfg.data.eval_split)
    if cfg.data.clean_shared_memory:
        # streaming leaves shared memory behind after a crash; only segments no live process maps are removed.
        try:
            clean_stale_shared_memory()
        except FileNotFoundError:
            pass  # another job unlinked it first
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)

    from composer.utils import dist, get_device, reproducibility

    from trainer.composer_models import AutoencoderComposerModel

    device = get_device(None)
    dist.initialize_dist(device)
    reproducibility.seed_all(cfg.seed)
    if cfg.adapt.init_from:
        autoencoder = adaptable_autoencoder(cfg, train_local)
        tokenizer = autoencoder.tokenizer
        cfg = dataclasses.replace(cfg, model=autoencoder.exported_cfg)  # the model section is the export's
    else:
        tokenizer = _tokenizer(cfg)
        autoencoder = LatentAutoencoder(cfg.model, tokenizer)
    model = AutoencoderComposerModel(autoencoder, greedy_eval=cfg.greedy_eval)
    n_train = sum(p.numel() for p in autoencoder.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in autoencoder.parameters())
    log.info(f"autoencoder: {n_all / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained; vocab {len(tokenizer)}")

    world = dist.get_world_size()
    if cfg.batch_size % world:
        raise UserError(f"batch_size: {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    train_dl = dataloader(train_local, tokenizer, cfg, per_rank, train=True)
    eval_dl = dataloader(eval_local, tokenizer, cfg, per_rank, train=False)
    trainer = build_trainer(cfg, model, [p for p in model.parameters() if p.requires_grad], train_dl, eval_dl,
                            max(1, math.ceil(cfg.data.eval_samples / per_rank)), device, autoencoder_steps=True)
    t0 = time.time()
    trainer.fit()
    seconds = time.time() - t0
    batches = int(trainer.state.timestamp.batch)
    if not trainer.state.eval_metrics or _last_eval_batch(cfg.out_dir) != batches:
        trainer.eval()  # final held-out figures, also when max_minutes stopped the run between evals
    final = {f"{lbl}/{k}": float(m.compute()) for lbl, ms in trainer.state.eval_metrics.items() for k, m in ms.items()}
    summary = {"autoencoder_dir": export, "batches": batches, "fit_seconds": round(seconds, 1), **final}
    if dist.get_global_rank() == 0:
        autoencoder.cfg = getattr(autoencoder, "exported_cfg", autoencoder.cfg)  # as it was exported
        if autoencoder.lexicon is None:
            texts = read_texts(train_local, cfg.data.text_column, cfg.lexicon.texts, spread=True)
            autoencoder.lexicon = Lexicon.from_texts(texts, cfg.lexicon.min_count)
            log.info(f"lexicon: {len(autoencoder.lexicon)} words seen >= {cfg.lexicon.min_count} times in {len(texts)} texts")
        autoencoder.save_pretrained(export)
        with open(os.path.join(cfg.out_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        try:
            from trainer.eval_autoencoder import plot_training_curve

            plot_training_curve(os.path.join(cfg.out_dir, "metrics.jsonl"),
                                os.path.join(cfg.out_dir, "training_curve.png"))
        except ImportError:
            pass
        log.info(f"exported {export}: {json.dumps(final)}")
    trainer.close()
    dist.barrier()
    return summary
