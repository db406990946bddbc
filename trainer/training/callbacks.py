"""The Composer callbacks of the training jobs: EMA updates, a non-finite-loss stop, the metrics file
and its curves, progress with the time left, the wall-clock safety net, RNG restored on resume, poems
sampled for fixed prompts, the per-batch sample-index log, and the training FLOPs counted. Faults for
the tests are injected from tests/ (tests/faults), never from here."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from trainer.base.log import get_logger
from trainer.base.plots import Panel, plot_metrics
from trainer.base.config import UserError
from trainer.base.schema import REQUEUE_EXIT, STOP_FILE_ENV
from trainer.models.denoisers.interface import Prompt
from trainer.models.text_encoders import build_prompt_encoder
from trainer.models.token_latents import latent_kind, load_latent_encoder
from trainer.diffusion.sampler import edm_sampler
from trainer.data.loaders import to_encoder_latents

log = get_logger("train")       # every training job's callbacks (autoencoder, token LM, diffusion)


class NonFiniteLoss(UserError):
    """The training loss became NaN or inf; the run stops before the bad step touches the weights."""


class EMACallback(Callback):
    """After every optimizer step: ema <- decay ema + (1 - decay) net; before `start_batch` the EMA
    just copies the weights (decay 0), as micro_diffusion's ema_start does."""

    def __init__(self, model, decay: float, start_batch: int = 0):
        self.model, self.decay, self.start_batch = model, decay, start_batch

    def batch_end(self, state: State, logger: Logger) -> None:
        b = int(state.timestamp.batch)
        self.model.update_ema(0.0 if b < self.start_batch else self.decay)


class NonFiniteLossGuard(Callback):
    """Stops the run with one line when the training loss is NaN or inf on any rank -- every rank together,
    at the same batch, before that batch's checkpoint is written.

    No sync of its own: it reads the loss Composer has already all-reduced over the ranks and copied to the
    host for logging, every batch, before Event.BATCH_END (`state.total_loss_dict`). A non-finite loss on
    any rank makes that mean non-finite on every rank, so all ranks stop at the same batch without a
    collective for the decision (a rank left running would wait in its next collective until the
    timeout). The bad step has reached the weights in memory by then (the optimizer has run), never a
    checkpoint: Composer saves at Event.BATCH_CHECKPOINT, after BATCH_END, and this callback runs first."""

    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = (state.total_loss_dict or {}).get("loss/train/total")
        if loss is None or math.isfinite(loss):
            return
        # A sharded (FSDP2) checkpoint is one folder, linked from rank 0's name only.
        links = [os.path.join(self.checkpoint_dir, f"latest-rank{r}.pt") for r in (dist.get_global_rank(), 0)]
        last = next((os.path.realpath(p) for p in links if os.path.lexists(p)), "none saved yet")
        raise NonFiniteLoss(f"train loss is {loss} at batch {int(state.timestamp.batch)}: stopping (lower "
                            f"optim.lr or raise optim.grad_clip_norm); last good checkpoint: {last}")


class RestoreRNGOnResume(Callback):
    """Puts back the RNG state saved in the checkpoint right before the first resumed batch.

    Composer restores it only when a run resumes at an epoch start or spins the dataloader forward;
    with streaming's own mid-epoch resumption it does neither, and the resumed run would draw other
    noise, sigmas, masks and CFG drops than the uninterrupted one. `take(trainer)` moves the state here."""

    def __init__(self):
        self.rng = None

    def take(self, trainer) -> None:
        self.rng, trainer._rng_state = trainer._rng_state, None

    def after_dataloader(self, state: State, logger: Logger) -> None:
        if self.rng is not None:
            from composer.utils import reproducibility

            reproducibility.load_rng_state(self.rng)
            self.rng = None


class ComputeCount(Callback):
    """The training FLOPs this rank has spent: `model.flops_per_batch(batch)` summed over the batches it
    trained, kept in the checkpoint, so a resumed run goes on counting where the killed one stopped. A
    budget in batches is then also stated in FLOPs (`total()`: summed over the ranks, a collective)."""

    def __init__(self, model):
        self.model, self.flops = model, 0.0

    def after_dataloader(self, state: State, logger: Logger) -> None:
        self.flops += float(self.model.flops_per_batch(state.batch))

    def state_dict(self) -> dict:
        return {"flops": self.flops}

    def load_state_dict(self, state: dict) -> None:
        self.flops = float(state["flops"])

    def total(self) -> float:
        device = next(self.model.parameters()).device   # NCCL reduces only tensors on the GPU
        t = torch.tensor([self.flops], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())


def trim_jsonl(path: str, done: int) -> None:
    """Drop the rows of batches after `done` (a resumed run replays them) and lines cut by a kill."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("batch", 0) <= done:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


class SampleIndexLog(Callback):
    """out_dir/sample_log-rank{r}.jsonl: {"batch", "epoch", "sample_index": [...]} for every batch.

    On a resumed run the entries of batches after the checkpoint are dropped first, so the replayed
    batches replace the killed run's: the file then says exactly which samples trained each batch."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def _path(self) -> str:
        return os.path.join(self.out_dir, f"sample_log-rank{dist.get_global_rank()}.jsonl")

    def fit_start(self, state: State, logger: Logger) -> None:
        trim_jsonl(self._path(), int(state.timestamp.batch))

    def after_dataloader(self, state: State, logger: Logger) -> None:
        idx = state.batch.get("sample_index") if isinstance(state.batch, dict) else None
        if idx is None:
            return
        row = {"batch": int(state.timestamp.batch) + 1, "epoch": int(state.timestamp.epoch),
               "sample_index": [int(i) for i in idx.reshape(-1).tolist()]}
        with open(self._path(), "a") as f:
            f.write(json.dumps(row) + "\n")


class MetricsFile(Callback):
    """Train loss every `log_interval` batches and every eval result -> out_dir/metrics.jsonl (rank 0;
    a resumed run first drops the rows after its checkpoint); its curves drawn at the end of training."""

    def __init__(self, out_dir: str, log_interval: int, plot=None, plot_name: str = "loss_curve.png"):
        self.out_dir, self.log_interval = out_dir, max(1, log_interval)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.plot, self.plot_name = plot or plot_loss_curve, plot_name
        self.last_eval_batch: Optional[int] = None   # in memory on every rank (the file is rank 0's)
        self.t0 = time.time()

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() == 0:
            trim_jsonl(self.path, int(state.timestamp.batch))

    def _write(self, row: dict) -> None:
        if dist.get_global_rank() == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def batch_end(self, state: State, logger: Logger) -> None:
        b = int(state.timestamp.batch)
        if b % self.log_interval == 0:
            lr = state.schedulers[0].get_last_lr()[0] if state.schedulers else None
            self._write({"batch": b, "seconds": round(time.time() - self.t0, 2),
                         "train/loss": float(state.loss.detach()), "lr": lr})

    def eval_end(self, state: State, logger: Logger) -> None:
        self.last_eval_batch = int(state.timestamp.batch)
        row = {"batch": int(state.timestamp.batch)}
        for label, metrics in state.eval_metrics.items():
            for name, m in metrics.items():
                row[f"{label}/{name}"] = float(m.compute())
        self._write(row)
        log.info("eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def draw(self) -> None:
        """The curves of out_dir/metrics.jsonl (rank 0; the training job calls this after its last eval)."""
        if dist.get_global_rank() == 0 and os.path.isfile(self.path):
            self.plot(self.path, os.path.join(self.out_dir, self.plot_name))


def plot_loss_curve(metrics_jsonl: str, png: str) -> str:
    """metrics.jsonl -> PNG of train loss (and eval losses) against batches."""
    return plot_metrics(metrics_jsonl, png, [Panel("loss", [("train/loss", "train loss", "-"),
                                                                      ("eval/*", "", "o-")], "loss", log_y=True)], dpi=90)


def plot_diffusion_curve(metrics_jsonl: str, png: str) -> str:
    """metrics.jsonl of the diffusion job -> PNG: the losses, and beside them the EMA denoiser's squared
    error ÷ the best linear denoiser's at each checked sigma (1 = no more than the latents' Gaussian)."""
    return plot_metrics(metrics_jsonl, png, [
        Panel("loss", [("train/loss", "train loss", "-"), ("eval/EMALoss", "eval loss (EMA)", "o-"),
                       ("eval/Loss", "eval loss", "o-")], "loss", log_y=True),
        Panel("EMA denoiser / best linear denoiser, MSE", [("eval/EMAvsLinear*", "", "o-")], "ratio")], dpi=90)


def plot_training_curve(metrics_jsonl: str, png: str) -> str:
    """metrics.jsonl written by the training job -> PNG: train loss and held-out accuracies against batches."""
    return plot_metrics(metrics_jsonl, png, [
        Panel("loss", [("train/loss", "train loss", "-"), ("eval/ReconstructionLoss", "val loss (teacher-forced)", "o-")],
              log_y=True),
        Panel("reconstruction token accuracy", [("eval/TokenAccuracy", "val token acc, teacher-forced", "o-"),
                                                ("eval/GreedyTokenAccuracy", "val token acc, greedy from latent", "o-")],
              ylim=(0, 1))])


class PoemSampler(Callback):
    """Every `every` batches (and at the end), rank 0 samples one poem per fixed prompt with the EMA
    denoiser (EDM Heun sampler, fixed noise, classifier-free guidance) and decodes it with the
    autoencoder; the poems go to the log and to out_dir/samples.txt."""

    def __init__(self, model, normalizer, out_dir: str, every: int, prompts: list[str], autoencoder: str,
                 prompt_encoder_cfg, sampler_cfg, seed: int = 0):
        self.model, self.normalizer, self.out_dir, self.every = model, normalizer, out_dir, every
        self.prompts, self.autoencoder_dir, self.penc_cfg = prompts, autoencoder, prompt_encoder_cfg
        self.sampler_cfg, self.seed = sampler_cfg, seed
        self.ae = self.prompt = None
        self.last = -1

    def fit_start(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0:
            return
        self.ae = load_latent_encoder(self.autoencoder_dir)  # either latent space, by its directory's kind
        self.kind = latent_kind(self.autoencoder_dir)
        if self.model.net.backbone.prompt_dim > 0:
            penc = build_prompt_encoder(self.penc_cfg)
            emb, mask, pooled = penc(self.prompts)
            self.prompt = Prompt(emb.clone(), mask.clone(), pooled.clone())
            del penc

    def _sample(self, state: State) -> None:
        b = int(state.timestamp.batch)
        if dist.get_global_rank() != 0 or self.ae is None or b == self.last:
            return
        self.last = b
        net = self.model.ema
        T, C = net.backbone.latent_shape
        g = torch.Generator().manual_seed(self.seed)               # fixed noise: samples comparable over time
        noise = torch.randn(len(self.prompts), T, C, generator=g)
        dev = next(net.parameters()).device
        prompt = None if self.prompt is None else type(self.prompt)(*(t.to(dev) for t in self.prompt))
        x = edm_sampler(net, noise.to(dev), prompt, self.sampler_cfg, generator=g)
        poems = self.ae.decode(to_encoder_latents(x.cpu(), self.normalizer, self.kind))  # as the pipeline decodes
        with open(os.path.join(self.out_dir, "samples.txt"), "a") as f:
            for p, poem in zip(self.prompts, poems):
                f.write(f"batch {b} | prompt: {p!r}\n{poem}\n\n")
                log.info(f"sample at batch {b} for {p!r}: {poem}")

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.every > 0 and int(state.timestamp.batch) % self.every == 0:
            self._sample(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._sample(state)


class WallClockLimit(Callback):
    """A safety net, not a budget: stops training after max_minutes of training time, on every rank
    together (rank 0's clock decides), and says loudly at which batch of which budget it cut."""

    def __init__(self, max_minutes: Optional[float]):
        self.max_minutes = max_minutes

    def fit_start(self, state: State, logger: Logger) -> None:
        self.t0 = time.time()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.max_minutes is None:
            return
        over = [time.time() - self.t0 > 60 * self.max_minutes]
        dist.broadcast_object_list(over, src=0)
        if over[0]:
            log.warning(f"max_minutes={self.max_minutes} CUT this run at batch {int(state.timestamp.batch)} of its "
                        f"{state.max_duration} budget: the model is not the one its YAML describes")
            state.stop_training()


class Progress(Callback):
    """Progress in the log (rank 0), which a Slurm log or a terminal keeps: after the first batches
    the estimated time of the whole run, then every tenth of it the batch, the rate and the time left."""

    def __init__(self, estimate_after: int = 20):
        self.estimate_after = estimate_after

    def fit_start(self, state: State, logger: Logger) -> None:
        self.b0, self.t0 = int(state.timestamp.batch), time.time()
        self.total = int(state.max_duration.value) if state.max_duration.unit.name == "BATCH" else None
        self.next_report = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if dist.get_global_rank() != 0 or not self.total:
            return
        b, done = int(state.timestamp.batch), int(state.timestamp.batch) - self.b0
        if done < min(self.estimate_after, self.total - self.b0) or (self.next_report and b < self.next_report):
            return
        rate = done / max(time.time() - self.t0, 1e-9)
        left = (self.total - b) / rate
        if self.next_report is None:
            log.info(f"estimate: {self.total - self.b0} batches at {rate:.2f} batches/s (measured on the first "
                     f"{done}): {_clock(left + done / rate)} for this run, {_clock(left)} left")
        else:
            log.info(f"batch {b}/{self.total} ({100 * b // self.total}%), {rate:.2f} batches/s, {_clock(left)} left")
        self.next_report = b + max(1, self.total // 10)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- preemption: checkpoint, exit, requeue

class Preempted(Exception):
    """Every rank checkpointed the batch at which a stop was asked for; the process exits REQUEUE_EXIT."""


class StopOnRequest(Callback):
    """When the stop file appears (the sbatch script writes it on the warning signal USR1 before the time
    limit or a preemption), every rank checkpoints at the next batch boundary, together (rank 0 looks,
    all follow), and the run ends with Preempted; the requeued job resumes from that checkpoint."""

    def __init__(self, path: str):
        self.path, self.trainer = path, None

    def take(self, trainer) -> None:
        self.trainer = trainer

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        asked = [dist.get_global_rank() == 0 and os.path.exists(self.path)]
        dist.broadcast_object_list(asked, src=0)
        if not asked[0]:
            return
        b = int(state.timestamp.batch)
        if self.trainer._checkpoint_saver.last_checkpoint_batch != state.timestamp.batch:
            self.trainer.save_checkpoint_to_save_folder()   # unless this batch's regular save just ran
        raise Preempted(f"stop requested ({self.path}): checkpointed batch {b} of {state.max_duration}; "
                        f"exiting {REQUEUE_EXIT} for a requeue that resumes there")


def stop_on_request() -> Optional[StopOnRequest]:
    """The callback when the job runs under a launcher that asks for stops (the sbatch script), else None."""
    path = os.environ.get(STOP_FILE_ENV)
    return StopOnRequest(path) if path else None
