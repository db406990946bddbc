"""The one skeleton every training job runs (autoencoder, token LM, diffusion), in this order:

    skip when exported -> out_dir checked -> the job's own checks -> stale shared memory cleaned
    -> threads -> distributed initialised -> batch divisible by the ranks -> seeded
    -> the job builds its model and loaders -> half-written checkpoints set aside (autoresume)
    -> Composer's Trainer (AdamW, warm-up + cosine, clipping, checkpoints, the common callbacks)
    -> fit -> final held-out metrics -> the job exports -> train_summary.json (written atomically)

A job is a `TrainingJob`: its config (a `TrainingConfig`), where its export goes, and the steps
`check`, `build` and `export`. The budget is `max_duration` in batches: the same YAML trains the
same model on a slow machine and a fast one; `max_minutes` is only a safety net, and a cut is logged
as a warning naming the batch and the budget.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable, ClassVar, Literal, Optional

import torch

from trainer.base.config import ConfigError
from trainer.base.files import check_out_dir, write_json_atomic
from trainer.base.log import get_logger
from trainer.data.loaders import clean_stale_shared_memory
from trainer.training import callbacks as cb, composer_fixes, reporting
from trainer.training.checkpoints import repair_checkpoints

log = get_logger("train")


@dataclasses.dataclass
class OptimConfig:
    """AdamW, a linear warm-up then a cosine decay to alpha_f * lr, and global-norm gradient clipping."""
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.99])
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup: str = "100ba"
    alpha_f: float = 0.1                # cosine decays to alpha_f * lr
    grad_clip_norm: float = 1.0         # clip the global gradient norm (0 = off)
    # AdamW's implementation: foreach (one kernel per op over all tensors, no per-parameter Python loop),
    # fused (one kernel in all; GPUs), or for_loop (per parameter). The numbers are the same.
    impl: Literal["foreach", "fused", "for_loop"] = "foreach"

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ValueError(f"betas must hold two values, got {self.betas}")
        if self.lr <= 0 or self.grad_clip_norm < 0:
            raise ValueError("lr must be > 0 and grad_clip_norm >= 0")


@dataclasses.dataclass
class TrainingConfig:
    """The keys every training job shares; each job's config extends it."""
    out_dir: str = "out/train"
    run_name: str = "run"
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # Samples per optimizer step over all ranks; `batch_size` is its older name (set one of the two).
    # None = the job's default_batch_size.
    global_train_batch_size: Optional[int] = None
    batch_size: Optional[int] = None
    # Samples per forward/backward pass on one rank; the rank's share of the batch is split into
    # microbatches of this size and their gradients accumulated (Composer). None = the whole share at once.
    device_train_microbatch_size: Optional[int] = None
    max_duration: str = "1000ba"        # the budget (batches): the same on any machine
    max_minutes: Optional[float] = None  # a safety net only; a cut is a warning naming batch and budget
    eval_interval: str = "500ba"
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = 2
    autoresume: bool = True
    save_folder: str = ""               # checkpoints: a local folder or a URI (s3://...); "" = out_dir/checkpoints
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"  # auto: bf16 where the GPU has it
    log_interval: int = 20              # batches between lines in out_dir/metrics.jsonl
    # Composer loggers by name (tensorboard, wandb, mlflow), each with its class's kwargs
    # (trainer/training/reporting.py); `tensorboard: true/false` adds or removes loggers.tensorboard.
    loggers: dict[str, Optional[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    tensorboard: Optional[bool] = None
    # Optional callbacks by name with kwargs: Composer's (snake_case) or the job's own.
    callbacks: dict[str, Optional[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    progress_bar: Optional[bool] = None      # None = when stderr is a terminal
    log_to_console: Optional[bool] = None    # metrics lines on stderr; None = when there is no progress bar
    console_log_interval: str = ""           # e.g. "10ba"; "" = every log_interval batches
    threads: Optional[int] = None       # torch intra-op threads (CPU)
    seed: int = 17

    default_batch_size: ClassVar[int] = 64

    def __post_init__(self):
        if None not in (self.batch_size, self.global_train_batch_size) and self.batch_size != self.global_train_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) and global_train_batch_size "
                             f"({self.global_train_batch_size}) are one key under two names: set one")
        n = next((b for b in (self.global_train_batch_size, self.batch_size) if b is not None), self.default_batch_size)
        if n < 1:
            raise ValueError(f"global_train_batch_size must be >= 1, got {n}")
        self.global_train_batch_size = self.batch_size = n
        if self.device_train_microbatch_size is not None and self.device_train_microbatch_size < 1:
            raise ValueError(f"device_train_microbatch_size must be >= 1, got {self.device_train_microbatch_size}")
        if self.tensorboard is not None:
            self.loggers = {k: v for k, v in self.loggers.items() if k != "tensorboard" or self.tensorboard}
            if self.tensorboard:
                self.loggers.setdefault("tensorboard", {})

    @property
    def checkpoint_folder(self) -> str:
        return self.save_folder or os.path.join(self.out_dir, "checkpoints")

    @property
    def local_checkpoints(self) -> bool:
        """Whether checkpoints go to a local folder (a URI's are the object store's business)."""
        return "://" not in self.checkpoint_folder


@dataclasses.dataclass
class Parts:
    """What a job builds for the skeleton to train."""
    model: Any                                    # a ComposerModel
    train_dataloader: Any
    eval_dataloader: Any = None
    eval_batches: int = 1                         # per rank per evaluation
    params: Any = None                            # trained parameters (default: all that need grad)
    callbacks: list = dataclasses.field(default_factory=list)
    load_path: Optional[str] = None               # a checkpoint to start from (stage hand-over)
    load_weights_only: bool = False
    parallelism_config: Any = None
    compile_config: Optional[dict] = None         # torch.compile through Composer (None = eager)
    final_eval: bool = True                       # evaluate once more when the last batch had none
    plot: Optional[Callable[[str, str], str]] = None  # metrics.jsonl -> PNG at the end of training
    plot_name: str = "loss_curve.png"


class TrainingJob:
    """A training job for `run_training`. Subclasses set `export_name`, `export_marker` and
    `summary_key`, and write `build` and `export`; `check` and `without_training` are optional."""
    export_name = "export"             # out_dir/<export_name> is the job's product
    export_marker = "config.json"      # the file whose presence there means the job is done
    optional_callbacks: dict[str, Callable] = {}  # the job's own `callbacks:` names -> classes
    summary_key = "export_dir"
    clean_shared_memory = True

    def __init__(self, cfg: TrainingConfig):
        self.cfg = cfg

    @property
    def export_dir(self) -> str:
        return os.path.join(self.cfg.out_dir, self.export_name)

    def check(self) -> None:
        """Refuse bad inputs with one line, before any work."""

    def without_training(self) -> Optional[dict]:
        """A summary when the export is made without training (e.g. pretrained weights used as they are)."""
        return None

    def build(self, world: int, per_rank: int) -> Parts:
        raise NotImplementedError

    def load_failed(self, error: RuntimeError) -> None:
        """Turn a checkpoint that does not fit this run into a one-line error (or do nothing)."""

    def export(self, trainer, parts: Parts, summary: dict) -> dict:
        """Write the export (every rank calls this; collectives allowed); return summary additions."""
        raise NotImplementedError


def resolve_precision(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "amp_bf16" if torch.cuda.is_bf16_supported() else "amp_fp16"
    return "fp32"  # CPU autocast to bf16 is slower than fp32 on most CPUs


def optimizer_and_schedule(params, o: OptimConfig):
    from composer.algorithms import GradientClipping
    from composer.optim import CosineAnnealingWithWarmupScheduler

    impl = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for_loop": {"foreach": False}}[o.impl]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, **impl)
    schedule = CosineAnnealingWithWarmupScheduler(t_warmup=o.warmup, alpha_f=o.alpha_f)
    clip = [GradientClipping(clipping_type="norm", clipping_threshold=o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
    return opt, schedule, clip


def start(cfg: TrainingConfig, clean_shared_memory: bool) -> tuple[Any, int, int]:
    """Shared memory, threads, distributed, the batch split and the seed: (device, world, per_rank)."""
    from composer.utils import dist, get_device, reproducibility

    if clean_shared_memory:
        stale = clean_stale_shared_memory()  # a crashed streaming run leaves its shared memory behind
        if stale:
            log.info(f"removed {len(stale)} stale shared-memory segments of crashed streaming runs")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    composer_fixes.apply()   # per-node signal files: autoresume on a disk shared by several nodes
    device = get_device(None)
    dist.initialize_dist(device)
    world = dist.get_world_size()
    n, micro = cfg.global_train_batch_size, cfg.device_train_microbatch_size
    if n % world:
        raise ConfigError(f"global_train_batch_size: {n} is not divisible by the {world} ranks")
    if micro is not None and micro > n // world:
        raise ConfigError(f"device_train_microbatch_size: {micro} is more than a rank's {n // world} samples per batch")
    reproducibility.seed_all(cfg.seed)
    return device, world, n // world


class _InThisThread(concurrent.futures.Executor):
    """An executor that runs each task at once, in the caller's thread, and hands back a done future."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:   # the uploader reads it from the future, as from its process pool
            future.set_exception(e)
        return future


def remote_checkpoint_saver(cfg: TrainingConfig) -> list:
    """For a URI save_folder: Composer's CheckpointSaver built here with the names the Trainer gives its
    own (`<path>/ep{epoch}-ba{batch}-rank{rank}.pt`, `<path>/latest-rank{rank}.pt.symlink`). Given one,
    the Trainer's autoresume looks for a local copy in the saver's temporary folder, which is fresh in
    every run, and so always reads the bucket; without it, Composer downloads the latest checkpoint to a
    folder named after the URI under the working directory and trusts that copy in later runs.

    Its uploads run in this process, at save time, instead of in a pool of spawned processes (each
    imports torch first: tens of seconds, during which a killed run has nothing in the bucket). A
    checkpoint is in the bucket when its batch ends; the symlink object that autoresume reads follows
    at the end of the next batch (Composer writes it once the checkpoint is there), so a run killed in
    that batch resumes from the checkpoint before and writes the later ones again (overwrite on).
    Training waits for each upload: saving to a bucket costs the upload's time. The saver writes each
    checkpoint to a temporary folder first and deletes it once uploaded (else every run would leave its
    checkpoints in $TMPDIR); `save_num_checkpoints_to_keep` counts local checkpoints and does not apply."""
    if cfg.local_checkpoints:
        return []
    from composer.callbacks import CheckpointSaver
    from composer.utils import parse_uri

    path = parse_uri(cfg.checkpoint_folder)[2].strip("/")
    name, latest = "ep{epoch}-ba{batch}-rank{rank}.pt", "latest-rank{rank}.pt"
    saver = CheckpointSaver(folder=cfg.checkpoint_folder, filename=name, remote_file_name=f"{path}/{name}".lstrip("/"),
                            latest_filename=latest, latest_remote_file_name=f"{path}/{latest}".lstrip("/"),
                            overwrite=True, save_interval=cfg.save_interval,
                            num_checkpoints_to_keep=0)   # the local copy (in $TMPDIR) goes once uploaded
    up = saver.remote_uploader
    up.upload_executor.shutdown(wait=False)              # never started: nothing submitted yet
    up.check_remote_files_exist_executor.shutdown(wait=False)
    up.upload_executor = up.check_remote_files_exist_executor = _InThisThread()
    return [saver]


def build_trainer(job: TrainingJob, parts: Parts, device, reports: tuple[list, list] = ([], [])):
    """The Trainer; `reports`: (loggers, optional callbacks) from `reporting`, built before any work."""
    from composer import Trainer
    from composer.callbacks import LRMonitor

    cfg = job.cfg
    ckpt_dir = cfg.checkpoint_folder
    loggers, optional = reports
    params = parts.params if parts.params is not None else [p for p in parts.model.parameters() if p.requires_grad]
    opt, schedule, clip = optimizer_and_schedule(params, cfg.optim)
    restore_rng = cb.RestoreRNGOnResume()
    metrics = cb.MetricsFile(cfg.out_dir, cfg.log_interval, parts.plot, parts.plot_name)
    callbacks = [cb.NonFiniteLossGuard(ckpt_dir), metrics, cb.WallClockLimit(cfg.max_minutes), cb.Progress(),
                 LRMonitor(), restore_rng, *parts.callbacks, *optional]
    stop = cb.stop_on_request()   # preemption: under the sbatch script of launch/backends.py
    callbacks += [stop] if stop else []
    callbacks += remote_checkpoint_saver(cfg)
    try:
        trainer = Trainer(
            model=parts.model, train_dataloader=parts.train_dataloader, eval_dataloader=parts.eval_dataloader,
            max_duration=cfg.max_duration, optimizers=opt, schedulers=schedule, algorithms=clip,
            eval_interval=cfg.eval_interval if parts.eval_dataloader is not None else 0,
            eval_subset_num_batches=parts.eval_batches, precision=resolve_precision(cfg.precision), device=device,
            seed=cfg.seed, parallelism_config=parts.parallelism_config, compile_config=parts.compile_config,
            save_folder=ckpt_dir, save_interval=cfg.save_interval,
            save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep, run_name=cfg.run_name,
            autoresume=cfg.autoresume, save_overwrite=not cfg.autoresume,
            load_path=parts.load_path or None, load_weights_only=parts.load_weights_only,
            callbacks=callbacks, loggers=loggers, device_train_microbatch_size=cfg.device_train_microbatch_size,
            **reporting.console(cfg))
    except RuntimeError as e:
        job.load_failed(e)
        raise
    restore_rng.take(trainer)
    if parts.load_path and int(trainer.state.timestamp.batch) == 0:   # a stage hand-over, not a resume
        log.info(f"started from {parts.load_path}{' (weights only)' if parts.load_weights_only else ''}")
    if stop:
        stop.take(trainer)
    return trainer, metrics


def run_training(job: TrainingJob) -> dict:
    """Train `job` under Composer and export it; see the module docstring for the steps."""
    from composer.utils import dist

    cfg = job.cfg
    if os.path.isfile(os.path.join(job.export_dir, job.export_marker)):
        log.info(f"{job.export_dir} exists: training already finished, skipping (delete it to train again)")
        return {job.summary_key: job.export_dir, "skipped": True}
    check_out_dir(cfg.out_dir)
    reports = reporting.build_loggers(cfg), reporting.build_callbacks(cfg, job.optional_callbacks)
    job.check()
    made = job.without_training()
    if made is not None:
        return made
    device, world, per_rank = start(cfg, job.clean_shared_memory)
    parts = job.build(world, per_rank)
    ckpt_dir = cfg.checkpoint_folder
    if dist.get_global_rank() == 0 and cfg.autoresume and cfg.local_checkpoints:
        resumed_from = repair_checkpoints(ckpt_dir)
        if resumed_from:
            log.info(f"autoresume: {ckpt_dir}/{resumed_from}")
    dist.barrier()
    trainer, metrics = build_trainer(job, parts, device, reports)
    t0 = time.time()
    try:
        trainer.fit()
    except cb.NonFiniteLoss:
        trainer.close()  # progress bars closed first, so the one-line message is the last thing printed
        raise
    except cb.Preempted as e:   # checkpointed on every rank: exit for the requeue that resumes there
        log.warning(str(e))
        trainer.close()
        raise SystemExit(cb.REQUEUE_EXIT)
    seconds = time.time() - t0
    batches = int(trainer.state.timestamp.batch)
    if parts.final_eval and parts.eval_dataloader is not None and metrics.last_eval_batch != batches:
        trainer.eval()  # final held-out figures, also when the run ended between evaluations
    metrics.draw()
    final = {f"{lbl}/{k}": float(m.compute()) for lbl, ms in trainer.state.eval_metrics.items() for k, m in ms.items()}
    summary = {job.summary_key: job.export_dir, "batches": batches, "fit_seconds": round(seconds, 1), **final}
    summary.update(job.export(trainer, parts, summary) or {})
    if dist.get_global_rank() == 0:
        write_json_atomic(os.path.join(cfg.out_dir, "train_summary.json"), summary)
    trainer.close()
    dist.barrier()
    return summary
