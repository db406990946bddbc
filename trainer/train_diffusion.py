"""Train the latent-diffusion denoiser with Composer on the encode job's latent shards.

Stage 1 (masked pretraining) and stage 2 (unmasked finetuning) are the same job with different YAMLs
(yamls/diffusion/): stage 2 sets mask_ratio 0 and `load_path` to stage 1's checkpoint, weights only,
with a fresh optimizer and schedule. Every batch: EDM loss (trainer/diffusion/edm.py) with CFG
dropout to the learned null prompt, optional token masking; after every step the EMA is updated; the
EMA weights are what evaluation reports, the sampler decodes into poems, and out_dir/denoiser holds.

Distributed: `parallelism: ddp` (DDP over all ranks) or `fsdp2` (Composer's FSDP2 `fully_shard`,
sharded checkpoints); the same YAML runs on CPU with gloo (`composer -n 2 -m trainer.cli train ...`)
and on GPUs with NCCL. Checkpoints under out_dir/checkpoints carry model, EMA, optimizer, schedule, RNG
and the StreamingDataLoader position, so `autoresume` continues a killed run mid-epoch exactly.
A run that finds its export already there skips.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import time
import zipfile
from typing import Literal, Optional

from trainer.callbacks import KILL_IN_CHECKPOINT_ENV, _env_int
from trainer.config import ConfigError
from trainer.data import LatentDataConfig, column_shape, load_latent_stats, shard_columns
from trainer.diffusion.sampler import SamplerConfig
from trainer.log import get_logger
from trainer.models.denoisers import DenoiserConfig
from trainer.models.text_encoders import PromptEncoderConfig

log = get_logger("train.diffusion")


@dataclasses.dataclass
class LossConfig:
    # ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022). sigma_data is not set here: it follows from
    # the latent statistics and data.normalize (trainer/data.py).
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
class OptimConfig:
    lr: float = 2.4e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup: str = "1000ba"
    alpha_f: float = 0.33               # cosine decays to alpha_f * lr
    grad_clip_norm: float = 0.25        # clip the global gradient norm (0 = off)

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ValueError(f"betas must hold two values, got {self.betas}")
        if self.lr <= 0 or self.grad_clip_norm < 0:
            raise ValueError("lr must be > 0 and grad_clip_norm >= 0")


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
class DiffusionTrainConfig:
    task: Literal["diffusion"] = "diffusion"
    out_dir: str = "out/diffusion"
    run_name: str = "diffusion"
    model: DenoiserConfig = dataclasses.field(default_factory=DenoiserConfig)
    data: LatentDataConfig = dataclasses.field(default_factory=LatentDataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    prompt_mean: PromptMeanConfig = dataclasses.field(default_factory=PromptMeanConfig)
    mask_ratio: float = 0.0             # share of latent tokens dropped per sample (stage 1: 0.75)
    cfg_dropout: float = 0.1            # P(prompt -> learned null prompt), classifier-free guidance
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    batch_size: int = 256               # global; split over the ranks
    max_duration: str = "10000ba"
    max_minutes: Optional[float] = None  # also stop after this much wall-clock training time (this process)
    eval_interval: str = "1000ba"
    eval_batches: int = 8               # eval batches per rank per evaluation
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = 2
    autoresume: bool = True
    # Stage hand-over: a checkpoint of an earlier stage (file, `latest-rank0.pt` symlink, or sharded
    # folder); loaded once when this run has no checkpoint of its own.
    load_path: str = ""
    load_weights_only: bool = True      # weights (and EMA) only: fresh optimizer, schedule, data order
    parallelism: Literal["none", "ddp", "fsdp2"] = "ddp"  # none: one process only; ddp: DDP when >1 rank
    fsdp_state_dict: Literal["sharded", "full"] = "sharded"  # FSDP2 checkpoint layout
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"  # auto: bf16 where the GPU has it
    # Poems for fixed prompts every `sample_every` batches (0 = only at the end); off without an autoencoder.
    sample_every: int = 0
    sample_prompts: list[str] = dataclasses.field(default_factory=lambda: ["a sonnet about the sea",
                                                                           "a haiku about the moon"])
    autoencoder: str = ""               # the autoencoder job's export (decodes samples); empty = no samples
    prompt_encoder: PromptEncoderConfig = dataclasses.field(default_factory=PromptEncoderConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=lambda: SamplerConfig(num_steps=18, guidance_scale=3.0))
    log_interval: int = 20              # batches between lines in out_dir/metrics.jsonl
    log_sample_indices: bool = False    # out_dir/sample_log-rank{r}.jsonl: sample ids of every batch
    tensorboard: bool = True            # out_dir/tensorboard
    peak_flops: Optional[float] = None  # per-device FLOP/s for MFU; None = Composer's GPU table (none on CPU)
    threads: Optional[int] = None       # torch intra-op threads (CPU)
    seed: int = 17

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
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
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: path does not exist: {path!r}")
    streams = cfg.data.stream_paths()
    stats = load_latent_stats(cfg.data.stats_file())
    T, C = cfg.model.latent_tokens, cfg.model.latent_dim
    paths = [s.path for s in streams] + ([cfg.data.eval_path] if cfg.data.eval_path else [])
    for p in paths:
        if not os.path.isfile(os.path.join(p, "index.json")):
            raise ConfigError(f"data.eval_path: no latent shards (index.json) in {p!r}")
        cols = shard_columns(p)
        if "latent" not in cols:
            raise ConfigError(f"data: {p}: shards have no 'latent' column (latent shards from `latentverse encode`?)")
        if column_shape(cols["latent"]) != (T, C):
            raise ConfigError(f"model.latent_tokens/latent_dim: the model expects latents [{T}, {C}], "
                              f"{p} holds {cols['latent']}")
        widths = {column_shape(cols[k])[-1] for k in ("prompt_emb", "prompt_pooled") if k in cols}
        if cfg.model.prompt_dim > 0 and widths and widths != {cfg.model.prompt_dim}:
            raise ConfigError(f"model.prompt_dim: {cfg.model.prompt_dim}, but {p} holds prompt embeddings of width "
                              f"{sorted(widths)}")
    if len(stats["channel_mean"]) != C:
        raise ConfigError(f"{cfg.data.stats_file()}: {len(stats['channel_mean'])} channels, the model has {C}")
    return stats


def _read_prompt_latent_pairs(paths: list[str], limits: list[int], normalizer):
    """(pooled [N, D], normalized latents [N, T, C]) of `limits[i]` samples evenly spread over paths[i]."""
    import numpy as np
    import torch

    from data_prep.mds import LocalMDS
    from trainer.diffusion.seam import Prompt

    pooled, latents = [], []
    for path, limit in zip(paths, limits):
        ds = LocalMDS(path)
        for i in ds.spread(max(limit, 1)):
            r = ds[i]
            if "prompt_pooled" in r:
                p = torch.from_numpy(np.asarray(r["prompt_pooled"], np.float32))
            elif "prompt_emb" in r:   # what the denoiser sees in its place: the masked mean of the tokens
                emb = torch.from_numpy(np.asarray(r["prompt_emb"], np.float32))
                p = Prompt(emb[None], (torch.arange(len(emb)) < int(r["prompt_len"]))[None]).pooled_or_mean()[0]
            else:
                raise ConfigError(f"prompt_mean.enabled: {path} holds no prompt embeddings")
            pooled.append(p)
            latents.append(np.asarray(r["latent"], np.float32))
    return torch.stack(pooled), normalizer(torch.from_numpy(np.stack(latents)))


def fit_prompt_mean(cfg: DiffusionTrainConfig, normalizer):
    """(PromptMean, info) fitted on the training streams; the ridge chosen on data.eval_path (else on every
    10th training sample). Every rank reads the same samples, so every rank gets the same module."""
    import torch

    from trainer.diffusion.edm import PromptMean

    streams = cfg.data.stream_paths()
    props = [s.proportion for s in streams]
    if any(p is None for p in props):
        props = [1.0] * len(streams)
    n = cfg.prompt_mean.max_samples
    train = _read_prompt_latent_pairs([s.path for s in streams], [round(n * p / sum(props)) for p in props],
                                      normalizer)
    if cfg.data.eval_path:
        val = _read_prompt_latent_pairs([cfg.data.eval_path], [n], normalizer)
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


def prompt_shape(cfg: DiffusionTrainConfig) -> Optional[tuple[int, int]]:
    cols = shard_columns(cfg.data.stream_paths()[0].path)
    if cfg.model.prompt_dim == 0:
        return None
    if "prompt_emb" in cols:
        return column_shape(cols["prompt_emb"])
    return (cfg.model.null_tokens, cfg.model.prompt_dim)


# ---------------------------------------------------------------- checkpoints: never resume from half a file

_CKPT = re.compile(r"^ep(\d+)-ba(\d+)(-rank(\d+))?(\.pt)?$")


def checkpoint_complete(path: str) -> bool:
    """A sharded checkpoint is complete when DCP wrote its .metadata (written last); a monolithic one
    when its zip central directory (written last by torch.save) is readable."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, ".metadata"))
    try:
        with zipfile.ZipFile(path) as z:
            return len(z.namelist()) > 0
    except (zipfile.BadZipFile, OSError):
        return False


def repair_checkpoints(folder: str) -> Optional[str]:
    """Set aside checkpoints a crash left half-written (renamed *.incomplete, not deleted) and make
    `latest-rank0.pt` point at the newest complete one. Returns that checkpoint's name (or None).

    Composer updates the symlink only after a write finishes, but a kill between removing and
    re-creating the symlink loses it (autoresume would then start from zero), and a half-written
    file left under the name of a later batch blocks that batch's save on resume."""
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        m = _CKPT.match(name)
        path = os.path.join(folder, name)
        if m and not os.path.islink(path) and (m.group(4) in (None, "0")):
            found.append((int(m.group(2)), name))
    newest = None
    for _, name in sorted(found, reverse=True):
        path = os.path.join(folder, name)
        if checkpoint_complete(path):
            newest = newest or name
        else:
            os.replace(path, f"{path}.incomplete-{int(time.time())}")
            log.warning(f"{path}: half-written checkpoint (the run was killed while saving it): set aside")
    link = os.path.join(folder, "latest-rank0.pt")
    target = os.path.realpath(link) if os.path.lexists(link) else None
    if newest is None:
        if os.path.lexists(link):
            os.remove(link)
        return None
    want = os.path.join(folder, newest)
    if target != os.path.realpath(want):
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.remove(tmp)
        os.symlink(newest, tmp)
        os.replace(tmp, link)
        log.warning(f"{link}: now points at {newest}, the newest complete checkpoint")
    return newest


def install_checkpoint_kill_hook() -> None:
    """Test hook (LATENTVERSE_TEST_KILL_IN_CHECKPOINT=N): batch N's checkpoint is written half-way,
    flushed to disk, then the process is SIGKILLed -- a crash in the middle of a save."""
    at = _env_int(KILL_IN_CHECKPOINT_ENV)
    if at is None:
        return
    import torch
    from composer.utils import checkpoint as ck

    write = ck._write_checkpoint_file

    def half_write(state_dict, filename):
        if f"-ba{at}-" in os.path.basename(filename) or os.path.basename(filename).endswith(f"-ba{at}"):
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            data = buf.getvalue()
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            log.warning(f"{KILL_IN_CHECKPOINT_ENV}={at}: SIGKILL half-way through writing {filename}")
            os.kill(os.getpid(), signal.SIGKILL)
        return write(state_dict, filename)

    ck._write_checkpoint_file = half_write


# ---------------------------------------------------------------- the job

def _precision(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"


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
    from trainer import config as C
    from trainer.pipeline import PipelineConfig, export_pipeline

    pcfg, mode = cfg.prompt_encoder, "both"
    for d in (cfg.data.path, os.path.dirname(os.path.abspath(cfg.data.path))):
        rec = os.path.join(d, "_encode_config.json")
        if os.path.isfile(rec):
            with open(rec) as f:
                enc = json.load(f)["config"]
            pcfg = C.from_dict(PromptEncoderConfig, enc["prompt_encoder"], source=rec)
            mode = enc.get("prompt_mode", mode)
            break
    path = os.path.join(cfg.out_dir, "pipeline")
    export_pipeline(path, cfg.autoencoder, denoiser_dir, pcfg, PipelineConfig(sampler=cfg.sampler, prompt_mode=mode))
    log.info(f"exported the pipeline to {path} (latentverse generate {path} --prompt ...)")
    return path


def run(cfg: DiffusionTrainConfig) -> dict:
    import torch

    from trainer.data import clean_stale_shared_memory

    export = os.path.join(cfg.out_dir, "denoiser")
    if os.path.isfile(os.path.join(export, "denoiser_config.json")):
        log.info(f"{export} exists: training already finished, skipping (delete it to train again)")
        return {"denoiser_dir": export, "skipped": True}
    stats = check_data(cfg)
    stale = clean_stale_shared_memory()  # a crashed streaming run leaves its shared memory behind
    if stale:
        log.info(f"removed {len(stale)} stale shared-memory segments of crashed streaming runs")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)

    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.callbacks import LRMonitor, SpeedMonitor
    from composer.loggers import TensorboardLogger
    from composer.optim import CosineAnnealingWithWarmupScheduler
    from composer.utils import dist, get_device, reproducibility

    from trainer import callbacks as cb
    from trainer.composer_diffusion import DiffusionComposerModel, measure_flops_per_sample
    from trainer.data import build_latent_dataloader
    from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond, PromptMean
    from trainer.export import save_denoiser
    from trainer.models.denoisers import build_denoiser

    device = get_device(None)
    dist.initialize_dist(device)
    world = dist.get_world_size()
    if cfg.parallelism == "none" and world > 1:
        raise ConfigError(f"parallelism: 'none' runs one process, but {world} ranks were started; use ddp or fsdp2")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size: {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    fsdp = cfg.parallelism == "fsdp2" and world > 1
    reproducibility.seed_all(cfg.seed)

    train_dl, normalizer = build_latent_dataloader(cfg.data, per_rank, seed=cfg.data.shuffle_seed)
    eval_dl = build_latent_dataloader(cfg.data, per_rank, eval=True)[0] if cfg.data.eval_path else None
    edm = EDMConfig(sigma_data=normalizer.sigma_data, P_mean=cfg.loss.P_mean, P_std=cfg.loss.P_std,
                    self_cond_prob=cfg.loss.self_cond_prob, seed=cfg.seed)
    prompt_mean = None
    if cfg.prompt_mean.enabled:
        t_fit = time.time()
        prompt_mean, fit = fit_prompt_mean(cfg, normalizer)
        log.info(f"prompt_mean: ridge regression of {fit['n_train']} training latents on their pooled prompts "
                 f"in {time.time() - t_fit:.1f} s: ridge {fit['ridge']:g}, R^2 {fit['r2_train']:.4f} (train)"
                 + (f", {fit['r2_val']:.4f} ({fit['n_val']} held out)" if "r2_val" in fit else ""))
    net = EDMPrecond(build_denoiser(cfg.model), sigma_data=edm.sigma_data, prompt_mean=prompt_mean)
    model = DiffusionComposerModel(net, EDMLoss(edm), cfg.mask_ratio, cfg.cfg_dropout, cfg.ema.decay)
    model.flops_per_sample = measure_flops_per_sample(net, (cfg.model.latent_tokens, cfg.model.latent_dim),
                                                      prompt_shape(cfg), cfg.mask_ratio,
                                                      self_cond_prob=cfg.loss.self_cond_prob)
    n = sum(p.numel() for p in net.parameters())
    log.info(f"denoiser {cfg.model.kind}: {n / 1e6:.2f}M parameters, {model.flops_per_sample / 1e6:.2f} MFLOP per "
             f"training sample; sigma_data={edm.sigma_data:.4f} ({cfg.data.normalize}); mask_ratio={cfg.mask_ratio}; "
             f"{world} rank(s), parallelism={cfg.parallelism}, {per_rank} samples per rank per batch")

    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    if dist.get_global_rank() == 0 and cfg.autoresume:
        resumed_from = repair_checkpoints(ckpt_dir)
        if resumed_from:
            log.info(f"autoresume: {ckpt_dir}/{resumed_from}")
    dist.barrier()
    install_checkpoint_kill_hook()

    opt = torch.optim.AdamW(model.net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
    callbacks = [cb.NonFiniteLossGuard(ckpt_dir), cb.EMACallback(model, cfg.ema.decay, cfg.ema.start_batch),
                 cb.MetricsFile(cfg.out_dir, cfg.log_interval), cb.WallClockLimit(cfg.max_minutes),
                 SpeedMonitor(window_size=max(1, min(cfg.log_interval, 20)), gpu_flops_available=cfg.peak_flops),
                 LRMonitor(), cb.KillAtBatch()]
    restore_rng = cb.RestoreRNGOnResume()
    callbacks.append(restore_rng)
    if cfg.log_sample_indices:
        callbacks.append(cb.SampleIndexLog(cfg.out_dir))
    if not cfg.autoencoder:
        log.info("no autoencoder given: poem samples during training are off")
    elif fsdp:
        log.info("parallelism fsdp2: poem samples during training are off (the EMA is sharded); "
                 "sample from the exported denoiser with `latentverse generate`")
    else:
        callbacks.append(cb.PoemSampler(model, normalizer, cfg.out_dir, cfg.sample_every, cfg.sample_prompts,
                                        cfg.autoencoder, cfg.prompt_encoder, cfg.sampler, seed=cfg.seed))
    loggers = [TensorboardLogger(log_dir=os.path.join(cfg.out_dir, "tensorboard"), flush_interval=50)] \
        if cfg.tensorboard else []
    parallelism_config = None
    if fsdp:
        from composer.utils.parallelism import FSDP2Config

        parallelism_config = {"fsdp": FSDP2Config(state_dict_type=cfg.fsdp_state_dict)}
    algorithms = [GradientClipping(clipping_type="norm", clipping_threshold=cfg.optim.grad_clip_norm)] \
        if cfg.optim.grad_clip_norm > 0 else []
    try:
        trainer = Trainer(
            model=model, train_dataloader=train_dl, eval_dataloader=eval_dl, max_duration=cfg.max_duration,
            optimizers=opt,
            schedulers=CosineAnnealingWithWarmupScheduler(t_warmup=cfg.optim.warmup, alpha_f=cfg.optim.alpha_f),
            algorithms=algorithms, eval_interval=cfg.eval_interval if eval_dl is not None else 0,
            eval_subset_num_batches=cfg.eval_batches, precision=_precision(cfg.precision), device=device,
            seed=cfg.seed, parallelism_config=parallelism_config,
            save_folder=ckpt_dir, save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, run_name=cfg.run_name,
            autoresume=cfg.autoresume, save_overwrite=not cfg.autoresume,
            load_path=cfg.load_path or None, load_weights_only=cfg.load_weights_only,
            callbacks=callbacks, loggers=loggers, progress_bar=True, log_to_console=False)
    except RuntimeError as e:  # a stage hand-over between runs with and without the prompt's mean latent
        if "prompt_mean." not in str(e):
            raise
        raise ConfigError(f"load_path: {cfg.load_path} was trained with{'out' if cfg.prompt_mean.enabled else ''} "
                          f"prompt_mean, this run has prompt_mean.enabled={str(cfg.prompt_mean.enabled).lower()}: "
                          "set it alike in both stages") from None
    restore_rng.take(trainer)
    t0 = time.time()
    try:
        trainer.fit()
    except cb.NonFiniteLoss:
        trainer.close()  # progress bars closed first, so the one-line message is the last thing printed
        raise
    seconds = time.time() - t0
    batches = int(trainer.state.timestamp.batch)
    final = {f"{lbl}/{k}": float(m.compute()) for lbl, ms in trainer.state.eval_metrics.items() for k, m in ms.items()}
    ema = ema_state_dict(model, fsdp)
    summary = {"denoiser_dir": export, "batches": batches, "fit_seconds": round(seconds, 1),
               "flops_per_sample": model.flops_per_sample, "param_optim_bytes_per_rank": param_optim_bytes(model, opt),
               **final}
    if dist.get_global_rank() == 0:
        pm = PromptMean(cfg.model.prompt_dim, prompt_mean.latent_shape) if prompt_mean is not None else None
        out = EDMPrecond(build_denoiser(cfg.model), sigma_data=edm.sigma_data, prompt_mean=pm)
        out.load_state_dict(ema)
        save_denoiser(export, out, cfg.model, stats, cfg.data.normalize,
                      extra={"weights": "ema", "ema_decay": cfg.ema.decay, "batches": batches,
                             "mask_ratio": cfg.mask_ratio, "run_name": cfg.run_name, "prompt_mean": pm is not None})
        tmp = os.path.join(cfg.out_dir, ".train_summary.json.tmp")
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=2)
        os.replace(tmp, os.path.join(cfg.out_dir, "train_summary.json"))
        log.info(f"exported the EMA denoiser to {export} after {batches} batches ({seconds:.0f} s): {json.dumps(final)}")
        if cfg.autoencoder:
            summary["pipeline_dir"] = export_run_pipeline(cfg, export)
    trainer.close()
    dist.barrier()
    return summary
