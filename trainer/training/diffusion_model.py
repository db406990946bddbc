"""The Composer wrapper for diffusion training: EDM loss on a denoiser, CFG dropout, masking, and an EMA.

Layout of the ComposerModel (it matters for FSDP2, which shards each direct child on its own):
    train_step  DiffusionTrainStep: the trained EDMPrecond `net` plus the loss; CFG dropout happens
                inside its forward, where FSDP has gathered the learned null prompt
    ema         a frozen copy of `net` whose weights track net's: ema <- decay ema + (1 - decay) net
                after every optimizer step (EMACallback); part of the state dict, so checkpoints and
                resume carry it, and it is what evaluation reports, the sampler uses and export saves.
Batches come from trainer/data/loaders.py (precomputed, normalised latents and prompt embeddings).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Optional

import torch
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric

from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMLossOutput, EDMPrecond
from trainer.diffusion.guidance import drop_prompt
from trainer.diffusion.linear import LinearDenoiser, errors_vs_linear
from trainer.models.denoisers.interface import Prompt


def batch_prompt(batch: dict) -> Prompt:
    """The prompt tensors of a latent batch (any may be missing: an unconditional dataset)."""
    return Prompt(batch.get("prompt_emb"), batch.get("prompt_mask"), batch.get("prompt_pooled"))


class DiffusionTrainStep(nn.Module):
    """net + EDM loss as one module: forward(batch) -> EDMLossOutput.

    cfg_dropout: each sample's prompt becomes the net's learned null prompt with this probability
    (classifier-free guidance training, Ho & Salimans 2022). mask_ratio: share of latent tokens the
    backbone drops (MAE-style masked pretraining); the loss covers the kept tokens only."""

    def __init__(self, net: EDMPrecond, loss: EDMLoss, mask_ratio: float = 0.0, cfg_dropout: float = 0.1):
        super().__init__()
        self.net, self.loss_fn = net, loss
        self.mask_ratio, self.cfg_dropout = float(mask_ratio), float(cfg_dropout)

    def forward(self, batch: dict, generator: Optional[torch.Generator] = None,
                mask_ratio: Optional[float] = None) -> EDMLossOutput:
        y = batch["latent"]                                               # [B, T, C] normalised
        prompt = batch_prompt(batch)
        if self.training and self.cfg_dropout > 0 and not prompt.is_empty:
            L = prompt.emb.shape[1] if prompt.emb is not None else None
            prompt = drop_prompt(prompt, self.net.null_prompt(y.shape[0], L), self.cfg_dropout, generator)
        r = self.mask_ratio if mask_ratio is None else mask_ratio
        return self.loss_fn(self.net, y, prompt, mask_ratio=r, generator=generator)


class MeanLoss(Metric):
    """Sample-weighted mean of per-sample losses over the eval set (summed across ranks)."""

    full_state_update = False

    def __init__(self, key: str):
        super().__init__()
        self.key = key                  # which eval output it averages (survives Composer's deepcopy)
        self.add_state("sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, per_sample: torch.Tensor) -> None:
        self.sum += per_sample.detach().double().sum()
        self.count += per_sample.numel()

    def compute(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)


class MSERatio(Metric):
    """Summed squared error of the EMA denoiser ÷ that of the best linear denoiser over the eval set, at
    one noise level (< 1: the denoiser knows more of the latents than their mean and covariance)."""

    full_state_update = False

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.add_state("num", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("den", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, errors: torch.Tensor) -> None:
        """errors [2, B]: each sample's mean squared error, the denoiser's and the linear one's."""
        self.num += errors[0].detach().double().sum()
        self.den += errors[1].detach().double().sum()

    def compute(self) -> torch.Tensor:
        return self.num / self.den.clamp_min(1e-30)


def linear_key(sigma: float) -> str:
    return f"EMAvsLinear_{sigma:g}"


class DiffusionComposerModel(ComposerModel):
    """Trains `net` with the EDM loss; keeps an EMA of it.

    Eval metrics (unmasked, no CFG dropout, noise and sigma drawn from a generator seeded by the
    batch's sample indices so every evaluation sees the same draws and the training RNG is untouched):
    EMALoss (the exported weights) and Loss (the raw weights); with a `linear` denoiser (the Gaussian of the
    training latents) also EMAvsLinear_<sigma> for each of `linear_sigmas`: the EMA denoiser's squared
    error on the eval latents noised at that sigma (with their own prompts) ÷ the linear denoiser's."""

    def __init__(self, net: EDMPrecond, loss: EDMLoss, mask_ratio: float = 0.0, cfg_dropout: float = 0.1,
                 linear: Optional[LinearDenoiser] = None, linear_sigmas: tuple[float, ...] = (0.4, 0.8)):
        super().__init__()
        self.train_step = DiffusionTrainStep(net, loss, mask_ratio, cfg_dropout)
        self.ema = copy.deepcopy(net).requires_grad_(False).eval()
        # A plain dict, not a child module: FSDP2 would try to shard a ModuleDict child (Composer moves
        # and copies eval metrics itself).
        self.val_metrics = {k: MeanLoss(k) for k in ("EMALoss", "Loss")}
        # Plain attributes too (not modules, not in the state dict): fitted before training, never trained.
        self.linear, self.linear_sigmas = linear, tuple(float(s) for s in linear_sigmas) if linear else ()
        self.val_metrics.update({linear_key(s): MSERatio(linear_key(s)) for s in self.linear_sigmas})
        self.flops_per_sample: Optional[float] = None   # set by the job (measured), read by SpeedMonitor
        # bf16 autocast done here where Composer does not do it (on CPU, where it allows only fp32); None = off.
        self.autocast_dtype: Optional[torch.dtype] = None

    def _autocast(self, batch: dict):
        """The model's own autocast where it does it (autocast_dtype); otherwise the caller's, untouched: a
        disabled torch.autocast here would switch off the autocast Composer's amp_bf16 opens around forward."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(batch["latent"].device.type, dtype=self.autocast_dtype)

    @property
    def net(self) -> EDMPrecond:
        return self.train_step.net

    def forward(self, batch: dict) -> EDMLossOutput:
        with self._autocast(batch):
            return self.train_step(batch)

    def loss(self, outputs: EDMLossOutput, batch: dict) -> torch.Tensor:
        return outputs.loss

    def eval_forward(self, batch: dict, outputs=None) -> dict:
        seed = int(batch["sample_index"].sum()) if "sample_index" in batch else 0
        dev = batch["latent"].device
        # The raw net is called through train_step (in eval mode: no CFG dropout), the module FSDP2 gathers.
        with self._autocast(batch):
            raw = self.train_step(batch, generator=torch.Generator(device=dev).manual_seed(seed), mask_ratio=0.0)
            ema = self.train_step.loss_fn(self.ema, batch["latent"], batch_prompt(batch),
                                          generator=torch.Generator(device=dev).manual_seed(seed))
            out = {"EMALoss": ema.per_sample, "Loss": raw.per_sample}
            out.update(self._vs_linear(batch, seed))
        return out

    def _vs_linear(self, batch: dict, seed: int) -> dict:
        if not self.linear_sigmas:
            return {}
        y = batch["latent"]
        if self.linear.mean.device != y.device:
            self.linear = self.linear.to(y.device)
        prompt, out = batch_prompt(batch), {}
        for k, sigma in enumerate(self.linear_sigmas):
            g = torch.Generator(device=y.device).manual_seed(seed * 7919 + k + 1)
            e = errors_vs_linear(lambda x: self.ema(x, torch.tensor(sigma, device=y.device), prompt).sample,
                                 self.linear, y, sigma, g)
            out[linear_key(sigma)] = torch.stack([e["denoiser"], e["linear"]])
        return out

    def get_metrics(self, is_train: bool = False) -> dict:
        return {} if is_train else dict(self.val_metrics)

    def update_metric(self, batch: dict, outputs: dict, metric: Metric) -> None:
        metric.update(outputs[metric.key])

    def flops_per_batch(self, batch: dict) -> float:
        """Model FLOPs of one training step (forward + backward) on this batch; for SpeedMonitor / MFU."""
        return float(self.flops_per_sample or 0.0) * batch["latent"].shape[0]

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- d ema + (1 - d) net: one foreach kernel over all parameters, no host sync (also on FSDP2
        shards: the EMA is sharded like the net, so each rank updates its own shard)."""
        torch._foreach_lerp_(list(self.ema.parameters()), [p.detach() for p in self.net.parameters()], 1.0 - decay)
        ema_buffers, net_buffers = list(self.ema.buffers()), list(self.net.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, net_buffers)


def measure_flops_per_sample(net: EDMPrecond, latent_shape: tuple[int, int], prompt_shape: Optional[tuple[int, int]],
                             mask_ratio: float, batch: int = 2, self_cond_prob: float = 0.5) -> float:
    """FLOPs of one training sample, forward + backward, counted by torch's FlopCounterMode on a tiny batch
    (matmuls and attention; elementwise ops are not counted, as in the usual MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(net).train()
    T, C = latent_shape
    y = torch.randn(batch, T, C)
    prompt = Prompt()
    if prompt_shape is not None:
        L, D = prompt_shape
        prompt = Prompt(torch.randn(batch, L, D), torch.ones(batch, L, dtype=torch.bool), torch.randn(batch, D))
    def flops(with_extra_pass: bool) -> int:
        counter = FlopCounterMode(display=False)
        with counter:
            EDMLoss(EDMConfig(self_cond_prob=float(with_extra_pass)))(net, y, prompt, mask_ratio=mask_ratio).loss.backward()
        return counter.get_total_flops()

    plain = flops(False)
    if not net.self_conditioning:
        return plain / batch
    # A self-conditioning net runs its extra no-grad pass on a share self_cond_prob of the batches.
    return ((1 - self_cond_prob) * plain + self_cond_prob * flops(True)) / batch
