"""Train the latent-diffusion denoiser with Composer on the encode job's latent shards.

Stage 1 (masked pretraining) and stage 2 (unmasked finetuning) are the same job with different YAMLs
(yamls/diffusion/): stage 2 sets mask_ratio 0 and `load_path` to stage 1's checkpoint, weights only,
with a fresh optimizer and schedule. Every batch: EDM loss (trainer/diffusion/edm.py) with CFG
dropout to the learned null prompt, optional token masking; after every step the EMA is updated; the
EMA weights are what evaluation reports, the sampler decodes into poems, and out_dir/denoiser holds.

Distributed: `parallelism: ddp` (DDP over all ranks) or `fsdp2` (Composer's FSDP2 `fully_shard`,
sharded checkpoints); the same YAML runs on CPU with gloo (`composer -n 2 -m launch.cli train ...`)
and on GPUs with NCCL. Checkpoints under out_dir/checkpoints carry model, EMA, optimizer, schedule, RNG
and the StreamingDataLoader position, so `autoresume` continues a killed run mid-epoch exactly.
A run that finds its export already there skips.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, ClassVar, Literal, Optional

import numpy as np
import torch
from composer.callbacks import SpeedMonitor
from composer.utils import dist

from trainer.base import config as C
from trainer.base import uris
from trainer.base.config import ConfigError, UserError
from trainer.base.log import get_logger
from trainer.base.schema import ENCODE_RECORD
from trainer.data.loaders import (LatentDataConfig, build_latent_dataloader, column_shape, load_latent_stats,
                                  shard_columns)
from trainer.data.mds import LocalMDS
from trainer.data.whitening import WHITENING_FILE, Whitening
from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond, PromptMean
from trainer.diffusion.linear import LinearDenoiser
from trainer.diffusion.sampler import SamplerConfig
from trainer.models.denoisers import DenoiserConfig, build_denoiser
from trainer.models.denoisers.interface import Prompt
from trainer.models.text_encoders import PromptEncoderConfig
from trainer.pipeline.export import save_denoiser
from trainer.pipeline.pipeline import PipelineConfig, export_pipeline
from trainer.training import callbacks as cb
from trainer.training.diffusion_model import DiffusionComposerModel, measure_flops_per_sample
from trainer.training.job import OptimConfig, Parts, TrainingConfig, TrainingJob, run_training
from trainer.training.parallelize import FSDPConfig, autocast_dtype, parallelize_diffusion

log = get_logger("train.diffusion")


@dataclasses.dataclass
class LossConfig:
    # ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022). sigma_data is not set here: it follows from
    # the latent statistics and data.normalize (trainer/data/loaders.py).
    P_mean: float = -1.2
    P_std: float = 1.2
    # With model.moe_dit.self_condition: share of batches trained with the model's own first estimate.
    self_cond_prob: float = 0.5

    def __post_init__(self):
        if self.P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")


@dataclasses.dataclass
class DiffusionOptimConfig(OptimConfig):
    lr: float = 2.4e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.1
    warmup: str = "1000ba"
    alpha_f: float = 0.33               # cosine decays to alpha_f * lr
    grad_clip_norm: float = 0.25        # clip the global gradient norm (0 = off)


@dataclasses.dataclass
class EMAConfig:
    decay: float = 0.9999               # ema <- decay ema + (1 - decay) net, after every step
    start_batch: int = 0                # before this batch the EMA copies the weights

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")


@dataclasses.dataclass
class PromptMeanConfig:
    # Denoise around each prompt's mean latent (trainer/diffusion/edm.py, PromptMean): the ridge
    # regression of the training latents on their pooled prompt embeddings, fitted before training on up
    # to `max_samples` evenly spread over the streams (by their proportions) and then fixed; the ridge
    # is the one of `ridges` with the least squared error on data.eval_path (without one, on every 10th
    # of those samples, left out of that choice).
    enabled: bool = False
    max_samples: int = 20000
    ridges: list[float] = dataclasses.field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])

    def __post_init__(self):
        if self.max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {self.max_samples}")
        if not self.ridges or any(r <= 0 for r in self.ridges):
            raise ValueError(f"ridges must be a non-empty list of values > 0, got {self.ridges}")


@dataclasses.dataclass
class WhiteningConfig:
    # data.normalize=whiten: the mean and covariance of up to `max_samples` training latents (spread over the
    # streams by their proportions, as the other fits read them), fitted on rank 0 before training; eigenvalues
    # below `floor` x the largest are raised to it (trainer/data/whitening.py says why). Saved as
    # whitening.safetensors in the checkpoint folder, where a resumed run and the next stage (its load_path's
    # folder) read it instead of fitting again, and in the export.
    max_samples: int = 20000
    floor: float = 1e-4

    def __post_init__(self):
        if self.max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {self.max_samples}")
        if not 0 < self.floor < 1:
            raise ValueError(f"floor must be in (0, 1), got {self.floor}")


@dataclasses.dataclass
class LinearCheckConfig:
    # At every evaluation, the EMA denoiser's squared error on the data.eval_path latents noised at each
    # of `sigmas` ÷ the best linear denoiser's (the Wiener filter of the Gaussian fitted before training
    # to up to `max_samples` training latents): eval/EMAvsLinear_<sigma> in the logs, metrics.jsonl and
    # loss_curve.png. Below 1 the denoiser has learnt more than the latents' mean and covariance. Off
    # without data.eval_path, or for latents of more than `max_dims` numbers (the covariance is dims^2).
    enabled: bool = True
    sigmas: list[float] = dataclasses.field(default_factory=lambda: [0.4, 0.8])
    max_samples: int = 20000
    max_dims: int = 8192

    def __post_init__(self):
        if any(s <= 0 for s in self.sigmas):
            raise ValueError(f"sigmas must be > 0, got {self.sigmas}")
        if self.max_samples < 2:
            raise ValueError(f"max_samples must be >= 2, got {self.max_samples}")


@dataclasses.dataclass
class DiffusionTrainConfig(TrainingConfig):
    task: Literal["diffusion"] = "diffusion"
    out_dir: str = "out/diffusion"
    run_name: str = "diffusion"
    model: DenoiserConfig = dataclasses.field(default_factory=DenoiserConfig)
    data: LatentDataConfig = dataclasses.field(default_factory=LatentDataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    prompt_mean: PromptMeanConfig = dataclasses.field(default_factory=PromptMeanConfig)
    linear_check: LinearCheckConfig = dataclasses.field(default_factory=LinearCheckConfig)
    whitening: WhiteningConfig = dataclasses.field(default_factory=WhiteningConfig)
    mask_ratio: float = 0.0             # share of latent tokens dropped per sample (stage 1: 0.75)
    cfg_dropout: float = 0.1            # P(prompt -> learned null prompt), classifier-free guidance
    optim: DiffusionOptimConfig = dataclasses.field(default_factory=DiffusionOptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    default_batch_size: ClassVar[int] = 256   # global_train_batch_size unless set
    max_duration: str = "10000ba"
    eval_interval: str = "1000ba"
    eval_batches: int = 8               # eval batches per rank per evaluation
    save_interval: str = "1000ba"
    # Stage hand-over: a checkpoint of an earlier stage (file, `latest-rank0.pt` symlink, or sharded
    # folder); loaded once when this run has no checkpoint of its own.
    load_path: str = ""
    load_weights_only: bool = True      # weights (and EMA) only: fresh optimizer, schedule, data order
    parallelism: Literal["none", "ddp", "fsdp2"] = "ddp"  # none: one process only; ddp: DDP when >1 rank
    fsdp_state_dict: Literal["sharded", "full"] = "sharded"  # FSDP2 checkpoint layout
    fsdp: FSDPConfig = dataclasses.field(default_factory=FSDPConfig)  # units, prefetch, hybrid (training/parallelize.py)
    # CPU only (tests, rehearsals): bf16 autocast as `precision: amp_bf16` gives on GPUs, and under FSDP2
    # bf16 parameters with fp32 gradient reductions (Composer allows only fp32 precision on CPU).
    bf16_on_cpu: bool = False
    compile: bool = False               # torch.compile the model through Composer's compile_config
    # Poems for fixed prompts every `sample_every` batches (0 = only at the end); off without an autoencoder.
    sample_every: int = 0
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: ["a sonnet about the sea",
                                                                           "a haiku about the moon"])
    autoencoder: str = ""               # the autoencoder job's export (decodes samples); empty = no samples
    # A URI (s3://bucket/path) the exported pipeline is uploaded to (needs an autoencoder); `latentverse
    # generate <that URI>` loads it through the node-local cache. The local out_dir/pipeline stays.
    export_uri: str = ""
    prompt_encoder: PromptEncoderConfig = dataclasses.field(default_factory=PromptEncoderConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=lambda: SamplerConfig(num_steps=18, guidance_scale=3.0))
    loggers: dict[str, Optional[dict[str, Any]]] = dataclasses.field(default_factory=lambda: {"tensorboard": {}})
    peak_flops: Optional[float] = None  # per-device FLOP/s for MFU; None = Composer's GPU table (none on CPU)

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.mask_ratio > 0 and self.model.kind != "moe_dit":
            raise ValueError(f"mask_ratio={self.mask_ratio} needs model.kind moe_dit (the {self.model.kind} "
                             "backbone cannot drop tokens)")
        if self.prompt_mean.enabled and self.model.prompt_dim == 0:
            raise ValueError("prompt_mean.enabled needs a prompt-conditioned model (model.prompt_dim > 0)")


CONFIG = DiffusionTrainConfig


# ---------------------------------------------------------------- checks before any work

def check_data(cfg: DiffusionTrainConfig) -> dict:
    """The latent statistics; refuses missing paths and shards whose shapes do not fit the model, in one line."""
    for key in ("load_path", "autoencoder"):
        path = getattr(cfg, key)
        if path and uris.is_uri(path):
            uris.check(path, key, must_exist=True)
        elif path and not os.path.exists(path):
            raise ConfigError(f"{key}: path does not exist: {path!r}")
    streams = cfg.data.stream_paths()
    stats = load_latent_stats(cfg.data.stats_file())
    tokens, dims = cfg.model.latent_tokens, cfg.model.latent_dim
    paths = [s.path for s in streams] + ([cfg.data.eval_stream().path] if cfg.data.eval_path else [])
    for p in paths:
        if not os.path.isfile(os.path.join(p, "index.json")):
            raise ConfigError(f"data.eval_path: no latent shards (index.json) in {p!r}")
        cols = shard_columns(p)
        if "latent" not in cols:
            raise ConfigError(f"data: {p}: shards have no 'latent' column (latent shards from `latentverse encode`?)")
        if column_shape(cols["latent"]) != (tokens, dims):
            raise ConfigError(f"model.latent_tokens/latent_dim: the model expects latents [{tokens}, {dims}], "
                              f"{p} holds {cols['latent']}")
        widths = {column_shape(cols[k])[-1] for k in ("prompt_emb", "prompt_pooled") if k in cols}
        if cfg.model.prompt_dim > 0 and widths and widths != {cfg.model.prompt_dim}:
            raise ConfigError(f"model.prompt_dim: {cfg.model.prompt_dim}, but {p} holds prompt embeddings of width "
                              f"{sorted(widths)}")
    if len(stats["channel_mean"]) != dims:
        raise ConfigError(f"{cfg.data.stats_file()}: {len(stats['channel_mean'])} channels, the model has {dims}")
    return stats


def _spread_records(paths: list[str], limits: list[int]):
    """The records of `limits[i]` samples evenly spread over paths[i], path by path."""
    for path, limit in zip(paths, limits):
        ds = LocalMDS(path)
        for i in ds.spread(max(limit, 1)):
            yield path, ds[i]


def _read_spread(paths: list[str], limits: list[int]):
    """(pooled prompts [N, D], or the path of the first shards without prompt embeddings; raw latents
    [N, T, C]) of `limits[i]` samples evenly spread over paths[i]."""
    pooled, latents, missing = [], [], None
    for path, r in _spread_records(paths, limits):
        if "prompt_pooled" in r:
            pooled.append(torch.from_numpy(np.asarray(r["prompt_pooled"], np.float32)))
        elif "prompt_emb" in r:   # what the denoiser sees in its place: the masked mean of the tokens
            emb = torch.from_numpy(np.asarray(r["prompt_emb"], np.float32))
            pooled.append(Prompt(emb[None], (torch.arange(len(emb)) < int(r["prompt_len"]))[None]).pooled_or_mean()[0])
        else:
            missing = missing or path
        latents.append(np.asarray(r["latent"], np.float32))
    return missing or torch.stack(pooled), torch.from_numpy(np.stack(latents))


def _pooled(pooled):
    """What _read_spread read of the prompts, or one line naming the shards without prompt embeddings."""
    if isinstance(pooled, str):
        raise ConfigError(f"prompt_mean.enabled: {pooled} holds no prompt embeddings")
    return pooled


def _pairs(read, normalizer):
    """(pooled [N, D], normalized latents [N, T, C]) of what _read_spread read."""
    return _pooled(read[0]), normalizer(read[1])


def _read_prompt_latent_pairs(paths: list[str], limits: list[int], normalizer):
    """(pooled [N, D], normalized latents [N, T, C]) of `limits[i]` samples evenly spread over paths[i]."""
    return _pairs(_read_spread(paths, limits), normalizer)


def _stream_limits(cfg: DiffusionTrainConfig, n: int) -> tuple[list[str], list[int]]:
    """The training streams' paths and `n` samples shared out by their proportions."""
    streams = cfg.data.stream_paths()
    props = [s.proportion for s in streams]
    if any(p is None for p in props):
        props = [1.0] * len(streams)
    return [s.path for s in streams], [round(n * p / sum(props)) for p in props]


class TrainingSample:
    """What the fits before training read of the training streams: up to `n` samples spread over them by
    their proportions, read once and shared by the whitening, the prompt-mean fit and the linear check.
    `normalizer` may be set after the whitening is fitted (it needs the raw latents)."""

    def __init__(self, cfg: DiffusionTrainConfig, normalizer=None):
        self.cfg, self.normalizer, self._read, self._normalized = cfg, normalizer, {}, {}

    def raw(self, n: int):
        """(pooled prompts [N, D] or the path of shards without them, the encoder's latents [N, T, C])."""
        if n not in self._read:
            self._read[n] = _read_spread(*_stream_limits(self.cfg, n))
        return self._read[n]

    def pairs(self, n: int):
        """(pooled prompts [N, D], normalized latents [N, T, C])."""
        return _pooled(self.raw(n)[0]), self.latents(n)

    def latents(self, n: int):
        """Normalized latents [N, T, C], normalized once (whitening 20,000 of them is a matrix product of
        seconds, and the prompt-mean fit and the linear check both ask)."""
        if n not in self._normalized:
            self._normalized[n] = self.normalizer(self.raw(n)[1])
        return self._normalized[n]


def _on_rank0_then_everyone(make):
    """make() on rank 0, its (picklable) result broadcast to every rank; a UserError on rank 0 (a config
    problem, a missing or damaged file) is raised on every rank, so none waits in the broadcast."""
    got: list = [None]
    if dist.get_global_rank() == 0:
        try:
            got = [make()]
        except UserError as e:
            got = [e]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(got, src=0)
    if isinstance(got[0], UserError):
        raise got[0]
    return got[0]


def fitted_linear_denoiser(cfg: DiffusionTrainConfig, sample: TrainingSample) -> Optional[LinearDenoiser]:
    """The Gaussian of up to linear_check.max_samples training latents (rank 0 reads and fits; every rank
    receives it), or None when the check is off or does not apply."""
    lc = cfg.linear_check
    dims = cfg.model.latent_tokens * cfg.model.latent_dim
    if not lc.enabled or not cfg.data.eval_path or not lc.sigmas:
        return None
    if dims > lc.max_dims:
        log.info(f"linear_check: off ({dims} numbers per latent > linear_check.max_dims {lc.max_dims})")
        return None

    def fit():
        t = time.time()
        latents = sample.latents(lc.max_samples)
        linear = LinearDenoiser.fit(latents)
        log.info(f"linear_check: the Gaussian of {len(latents)} training latents in {time.time() - t:.1f} s; "
                 f"eval/EMAvsLinear_<sigma> at sigma {', '.join(f'{s:g}' for s in lc.sigmas)} "
                 "(the EMA denoiser's squared error ÷ the best linear denoiser's; < 1 = beyond the Gaussian)")
        return linear.state()

    return LinearDenoiser.from_state(_on_rank0_then_everyone(fit))


def _checkpoint_dir_of(load_path: str) -> str:
    """The folder a checkpoint lies in (a file, the `latest-rank0.pt` symlink or a sharded folder; local or URI)."""
    if uris.is_uri(load_path):
        return load_path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(load_path.rstrip("/")))


def _find_whitening(folder: str) -> Optional[Whitening]:
    """The whitening saved in a checkpoint folder (local or URI), or None."""
    if not uris.is_uri(folder):
        return Whitening.find(folder)
    if WHITENING_FILE not in uris.list_keys(folder):
        return None
    return Whitening.load(uris.download(uris.join(folder, WHITENING_FILE), uris.cache_dir(folder, WHITENING_FILE)))


def _save_whitening(whitening: Whitening, folder: str) -> None:
    if not uris.is_uri(folder):
        os.makedirs(folder, exist_ok=True)
        whitening.save(os.path.join(folder, WHITENING_FILE))
        return
    local = uris.cache_dir(folder, "upload", WHITENING_FILE)
    os.makedirs(os.path.dirname(local), exist_ok=True)
    whitening.save(local)
    uris.upload(local, uris.join(folder, WHITENING_FILE), "save_folder")


def check_stage_whitening(cfg: DiffusionTrainConfig) -> None:
    """A stage hand-over between runs with and without data.normalize=whiten is refused in one line: the
    loaded weights denoise in the space they were trained in (checked for a local load_path)."""
    if not cfg.load_path or uris.is_uri(cfg.load_path):
        return
    beside = os.path.isfile(os.path.join(_checkpoint_dir_of(cfg.load_path), WHITENING_FILE))
    if beside != (cfg.data.normalize == "whiten"):
        raise ConfigError(f"load_path: {cfg.load_path} was trained with{'' if beside else 'out'} data.normalize=whiten "
                          f"({WHITENING_FILE} {'beside' if beside else 'not beside'} it), this run has "
                          f"data.normalize={cfg.data.normalize}: set it alike in both stages")


def fitted_whitening(cfg: DiffusionTrainConfig, sample: TrainingSample) -> Whitening:
    """data.normalize=whiten: the whitening this run trains in, the same on every rank. Rank 0 takes the
    one in its own checkpoint folder (a resumed run), else the one beside load_path (a later stage trains
    in its first stage's space, never in a refitted one), else fits it to up to whitening.max_samples
    training latents; it writes it into its checkpoint folder (where the next stage finds it), and every
    other rank receives it."""
    folder = cfg.checkpoint_folder

    def find_or_fit():
        t = time.time()
        own = _find_whitening(folder)
        if own is not None:
            log.info(f"whitening: {folder}/{WHITENING_FILE} (this run's, from its start)")
            return own.state()
        if cfg.load_path:
            src = _checkpoint_dir_of(cfg.load_path)
            found = _find_whitening(src)
            if found is None:
                raise ConfigError(f"load_path: no {WHITENING_FILE} in {src}: the run that wrote {cfg.load_path} did not "
                                  "train with data.normalize=whiten; set it alike in both stages")
            log.info(f"whitening: the one of {src} (the stage this run starts from)")
        else:
            latents = sample.raw(cfg.whitening.max_samples)[1]
            try:
                found = Whitening.fit(latents, cfg.whitening.floor)
            except ValueError as e:   # e.g. latents that do not vary: one line, on every rank
                raise ConfigError(f"data.normalize: {e}") from None
            log.info(f"whitening: mean and covariance of {len(latents)} training latents "
                     f"({found.whiten.shape[0]} numbers each) in {time.time() - t:.1f} s; {found.floored} "
                     f"directions below the floor ({cfg.whitening.floor:g} x the largest eigenvalue)")
            if len(latents) < 2 * found.whiten.shape[0]:
                log.warning(f"whitening: {len(latents)} latents for a covariance of {found.whiten.shape[0]} numbers: "
                            "poorly estimated, and directions no sample spans are held at the floor (held-out "
                            "latents are then large there); whiten wants many more latents than numbers")
        _save_whitening(found, folder)
        return found.state()

    return Whitening.from_state(_on_rank0_then_everyone(find_or_fit))


def fit_prompt_mean(cfg: DiffusionTrainConfig, normalizer, sample: Optional[TrainingSample] = None):
    """(PromptMean, info) fitted on the training streams; the ridge chosen on data.eval_path (else on every
    10th training sample). Called on rank 0 only (fitted_prompt_mean hands the module to the others)."""
    n = cfg.prompt_mean.max_samples
    train = (sample or TrainingSample(cfg, normalizer)).pairs(n)
    if cfg.data.eval_path:
        val = _read_prompt_latent_pairs([cfg.data.eval_stream().path], [n], normalizer)
        return PromptMean.fit(*train, ridges=cfg.prompt_mean.ridges, val=val)
    # No held-out split: every 10th sample chooses the ridge, then all of them are fitted with it (the
    # smallest ridge would fit a prompt seen once to its one latent).
    held = torch.arange(len(train[0])) % 10 == 9
    if held.sum() < 2:
        return PromptMean.fit(*train, ridges=[max(cfg.prompt_mean.ridges)])
    _, chosen = PromptMean.fit(train[0][~held], train[1][~held], ridges=cfg.prompt_mean.ridges,
                               val=(train[0][held], train[1][held]))
    pm, info = PromptMean.fit(*train, ridges=[chosen["ridge"]])
    return pm, {**info, **{k: v for k, v in chosen.items() if k.startswith(("r2_val", "n_val"))}}


def fitted_prompt_mean(cfg: DiffusionTrainConfig, normalizer, sample: Optional[TrainingSample] = None):
    """Rank 0 reads the samples and fits; every other rank receives rank 0's module (one read of the shared
    disk, not one per rank). An error on rank 0 is raised on every rank, so none waits in the broadcast."""
    t = time.time()

    def fit():
        prompt_mean, fit = fit_prompt_mean(cfg, normalizer, sample)
        log.info(f"prompt_mean: ridge regression of {fit['n_train']} training latents on their pooled prompts "
                 f"in {time.time() - t:.1f} s: ridge {fit['ridge']:g}, R^2 {fit['r2_train']:.4f} (train)"
                 + (f", {fit['r2_val']:.4f} ({fit['n_val']} held out)" if "r2_val" in fit else ""))
        return prompt_mean.state_dict(), prompt_mean.latent_shape

    state, shape = _on_rank0_then_everyone(fit)
    prompt_mean = PromptMean(state["weight"].shape[0], shape)
    prompt_mean.load_state_dict(state)
    log.info(f"prompt_mean: rank {dist.get_global_rank()} of {dist.get_world_size()} holds rank 0's fit "
             f"(sum |weight| {float(prompt_mean.weight.abs().sum()):.6f})")
    return prompt_mean


def prompt_shape(cfg: DiffusionTrainConfig) -> Optional[tuple[int, int]]:
    cols = shard_columns(cfg.data.stream_paths()[0].path)
    if cfg.model.prompt_dim == 0:
        return None
    if "prompt_emb" in cols:
        return column_shape(cols["prompt_emb"])
    return (cfg.model.null_tokens, cfg.model.prompt_dim)


def ema_state_dict(model, fsdp: bool) -> dict:
    """The full EMA state dict on every rank's CPU (a collective under FSDP2: call it on all ranks)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model.ema, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.ema.state_dict().items()}


def param_optim_bytes(model, opt) -> int:
    """Bytes this rank holds for the trained parameters and their optimizer state (local shards under FSDP2)."""
    local = (lambda t: t.to_local() if hasattr(t, "to_local") else t)
    n = sum(local(p).numel() * p.element_size() for p in model.net.parameters())
    for st in opt.state.values():
        n += sum(local(v).numel() * v.element_size() for v in st.values() if hasattr(v, "element_size"))
    return int(n)


def export_run_pipeline(cfg: DiffusionTrainConfig, denoiser_dir: str) -> str:
    """out_dir/pipeline: the autoencoder, the EMA denoiser, and the prompt encoder + prompt mode that
    made the training embeddings (read from the encode job's record beside the latent shards)."""
    pcfg, mode = cfg.prompt_encoder, "both"
    for d in (cfg.data.path, os.path.dirname(os.path.abspath(cfg.data.path))):
        rec = os.path.join(d, ENCODE_RECORD)
        if os.path.isfile(rec):
            with open(rec) as f:
                enc = json.load(f)["config"]
            pcfg = C.from_dict(PromptEncoderConfig, enc["prompt_encoder"], source=rec)
            mode = enc.get("prompt_mode", mode)
            break
    path = os.path.join(cfg.out_dir, "pipeline")
    card = {"name": cfg.run_name, "data": [s.path for s in cfg.data.stream_paths()],
            "training": {"max_duration": cfg.max_duration, "global_train_batch_size": cfg.global_train_batch_size,
                         "autoencoder": cfg.autoencoder, "prompt_encoder": pcfg.kind}}
    export_pipeline(path, cfg.autoencoder, denoiser_dir, pcfg, PipelineConfig(sampler=cfg.sampler, prompt_mode=mode), card)
    log.info(f"exported the pipeline to {path} (latentverse generate {path} --prompt ...)")
    return path


class DiffusionJob(TrainingJob):
    export_name, export_marker, summary_key = "denoiser", "denoiser_config.json", "denoiser_dir"
    # callbacks: {sample_index_log: {}}: out_dir/sample_log-rank{r}.jsonl, the sample ids of every batch
    optional_callbacks = {"sample_index_log": cb.SampleIndexLog}

    def check(self) -> None:
        cfg = self.cfg
        if cfg.export_uri:
            if not uris.is_uri(cfg.export_uri):
                raise ConfigError(f"export_uri: {cfg.export_uri!r} is no URI (s3://bucket/path); the local export "
                                  "is out_dir/pipeline")
            if not cfg.autoencoder:
                raise ConfigError("export_uri: the pipeline needs an autoencoder (set `autoencoder`)")
            uris.check(cfg.export_uri, "export_uri")
        self.stats = check_data(cfg)
        check_stage_whitening(cfg)
        if uris.is_uri(cfg.autoencoder):   # read from the node-local copy
            cfg.autoencoder = uris.local_copy(cfg.autoencoder, "autoencoder")

    def build(self, world: int, per_rank: int) -> Parts:
        cfg = self.cfg
        if cfg.parallelism == "none" and world > 1:
            raise ConfigError(f"parallelism: 'none' runs one process, but {world} ranks were started; use ddp or fsdp2")
        self.fsdp = cfg.parallelism == "fsdp2" and world > 1
        sample = TrainingSample(cfg)   # read on rank 0 only, by the fits that need it
        self.whitening = fitted_whitening(cfg, sample) if cfg.data.normalize == "whiten" else None
        train_dl, normalizer = build_latent_dataloader(cfg.data, per_rank, seed=cfg.data.shuffle_seed,
                                                       whitening=self.whitening)
        eval_dl = (build_latent_dataloader(cfg.data, per_rank, eval=True, whitening=self.whitening)[0]
                   if cfg.data.eval_path else None)
        sample.normalizer = normalizer
        edm = EDMConfig(sigma_data=normalizer.sigma_data, P_mean=cfg.loss.P_mean, P_std=cfg.loss.P_std,
                        self_cond_prob=cfg.loss.self_cond_prob, seed=cfg.seed)
        self.prompt_mean = fitted_prompt_mean(cfg, normalizer, sample) if cfg.prompt_mean.enabled else None
        self.sigma_data = edm.sigma_data
        net = EDMPrecond(build_denoiser(cfg.model), sigma_data=edm.sigma_data, prompt_mean=self.prompt_mean)
        model = DiffusionComposerModel(net, EDMLoss(edm), cfg.mask_ratio, cfg.cfg_dropout,
                                       linear=fitted_linear_denoiser(cfg, sample),
                                       linear_sigmas=tuple(cfg.linear_check.sigmas))
        model.flops_per_sample = measure_flops_per_sample(net, (cfg.model.latent_tokens, cfg.model.latent_dim),
                                                          prompt_shape(cfg), cfg.mask_ratio,
                                                          self_cond_prob=cfg.loss.self_cond_prob)
        log.info(f"denoiser {cfg.model.kind}: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
                 f"{model.flops_per_sample / 1e6:.2f} MFLOP per training sample; sigma_data={edm.sigma_data:.4f} "
                 f"({cfg.data.normalize}); mask_ratio={cfg.mask_ratio}; {world} rank(s), "
                 f"parallelism={cfg.parallelism}, {per_rank} samples per rank per batch")
        callbacks = [cb.EMACallback(model, cfg.ema.decay, cfg.ema.start_batch),
                     SpeedMonitor(window_size=max(1, min(cfg.log_interval, 20)), gpu_flops_available=cfg.peak_flops)]
        if not cfg.autoencoder:
            log.info("no autoencoder given: poem samples during training are off")
        elif self.fsdp:
            log.info("parallelism fsdp2: poem samples during training are off (the EMA is sharded); "
                     "sample from the exported denoiser with `latentverse generate`")
        else:
            callbacks.append(cb.PoemSampler(model, normalizer, cfg.out_dir, cfg.sample_every, cfg.sample_prompts,
                                            cfg.autoencoder, cfg.prompt_encoder, cfg.sampler, seed=cfg.seed))
        model.autocast_dtype = autocast_dtype(cfg.bf16_on_cpu)
        parallelism = None
        if self.fsdp:
            parallelism, after = parallelize_diffusion(model, cfg.fsdp, world, cfg.fsdp_state_dict, cfg.bf16_on_cpu)
            callbacks += after
        return Parts(model, train_dl, eval_dl, cfg.eval_batches, params=model.net.parameters(), callbacks=callbacks,
                     load_path=cfg.load_path or None, load_weights_only=cfg.load_weights_only,
                     parallelism_config=parallelism, compile_config={} if cfg.compile else None, final_eval=False,
                     plot=cb.plot_diffusion_curve)

    def load_failed(self, error: RuntimeError) -> None:
        if "prompt_mean." in str(error):   # a stage hand-over between runs with and without the prompt's mean latent
            cfg = self.cfg
            raise ConfigError(f"load_path: {cfg.load_path} was trained with{'out' if cfg.prompt_mean.enabled else ''} "
                              f"prompt_mean, this run has prompt_mean.enabled={str(cfg.prompt_mean.enabled).lower()}: "
                              "set it alike in both stages") from None

    def export(self, trainer, parts: Parts, summary: dict) -> dict:
        cfg, model = self.cfg, parts.model
        ema = ema_state_dict(model, self.fsdp)   # a collective under FSDP2: every rank
        out = {"flops_per_sample": model.flops_per_sample,
               "param_optim_bytes_per_rank": param_optim_bytes(model, trainer.state.optimizers[0])}
        if dist.get_global_rank() == 0:
            pm = PromptMean(cfg.model.prompt_dim, self.prompt_mean.latent_shape) if self.prompt_mean is not None else None
            net = EDMPrecond(build_denoiser(cfg.model), sigma_data=self.sigma_data, prompt_mean=pm)
            net.load_state_dict(ema)
            save_denoiser(self.export_dir, net, cfg.model, self.stats, cfg.data.normalize, whitening=self.whitening,
                          extra={"weights": "ema", "ema_decay": cfg.ema.decay, "batches": summary["batches"],
                                 "mask_ratio": cfg.mask_ratio, "run_name": cfg.run_name, "prompt_mean": pm is not None})
            log.info(f"exported the EMA denoiser to {self.export_dir} after {summary['batches']} batches "
                     f"({summary['fit_seconds']:.0f} s)")
            if cfg.autoencoder:
                out["pipeline_dir"] = export_run_pipeline(cfg, self.export_dir)
                if cfg.export_uri:   # model_index.json last: a reader that finds it finds the whole folder
                    uris.upload_tree(out["pipeline_dir"], cfg.export_uri, "export_uri", last=["model_index.json"])
                    out["pipeline_uri"] = cfg.export_uri
                    log.info(f"uploaded the pipeline to {cfg.export_uri} (latentverse generate {cfg.export_uri} ...)")
        return out


def run(cfg: DiffusionTrainConfig) -> dict:
    return run_training(DiffusionJob(cfg))
