"""EDM: preconditioning and training loss of Karras et al. (2022), "Elucidating the Design Space of
Diffusion-Based Generative Models", Table 1 (right column) and Section 5.

    D_theta(x; sigma) = c_skip(sigma) x + c_out(sigma) F_theta(c_in(sigma) x; c_noise(sigma))
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)      c_out  = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2)             c_noise = ln(sigma) / 4
    ln(sigma) ~ N(P_mean, P_std^2);    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2
    loss = E[ lambda(sigma) || D_theta(y + n; sigma) - y ||^2 ],  n ~ N(0, sigma^2 I)
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch
from torch import nn

from trainer.models import masking
from trainer.models.denoisers.interface import DenoiserOutput, Prompt


@dataclasses.dataclass
class EDMConfig:
    sigma_data: float = 0.5   # std of the data; the diffusion job sets it from the encode job's latent_stats.json
    P_mean: float = -1.2      # training noise distribution: ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2
    # Self-conditioning backbones: share of training batches whose first (no-grad) pass feeds its
    # estimate to the second; the rest see zeros, as the sampler's first step does.
    self_cond_prob: float = 0.5
    seed: int = 0             # of the self-conditioning draws: the same on every rank (FSDP needs
                              # every rank to run the same passes)

    def __post_init__(self):
        if not 0.0 <= self.self_cond_prob <= 1.0:
            raise ValueError(f"self_cond_prob must be in [0, 1], got {self.self_cond_prob}")
        if self.sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {self.sigma_data}")
        if self.P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {self.P_std}")


def edm_coefficients(sigma: torch.Tensor, sigma_data: float):
    """(c_skip, c_out, c_in, c_noise), each shaped like sigma."""
    s2, d2 = sigma ** 2, sigma_data ** 2
    c_skip = d2 / (s2 + d2)
    c_out = sigma * sigma_data / (s2 + d2).sqrt()
    c_in = 1.0 / (s2 + d2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out^2."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


class PromptMean(nn.Module):
    """A prompt's mean latent m(c) = (pooled(c) - p0) W + y0, fitted before training and then fixed.

    W is the ridge regression of the (normalized) training latents on their pooled prompt embeddings:
    the best linear guess of what a prompt says about its latent. EDMPrecond denoises around it
    (D = m + D'(x - m)), so a prompt's coarse effect (form, meter: a shift of the latents' mean) is in
    place from the first step at every noise level instead of being learnt slowly by the backbone from a
    small share of the loss. The unconditional branch (the learned null prompt, or no prompt) gets y0,
    the training latents' mean."""

    def __init__(self, prompt_dim: int, latent_shape: tuple[int, int]):
        super().__init__()
        self.latent_shape = tuple(int(s) for s in latent_shape)
        n = self.latent_shape[0] * self.latent_shape[1]
        self.register_buffer("weight", torch.zeros(prompt_dim, n))
        self.register_buffer("prompt_center", torch.zeros(prompt_dim))
        self.register_buffer("latent_center", torch.zeros(n))

    def forward(self, pooled: Optional[torch.Tensor], batch: int,
                null_pooled: Optional[torch.Tensor] = None) -> torch.Tensor:
        """pooled [B, D] (None = no prompt) -> m [B, T, C]; rows equal to `null_pooled` get y0."""
        y0 = self.latent_center
        if pooled is None:
            return y0.view(1, *self.latent_shape).expand(batch, -1, -1)
        m = (pooled.to(self.weight.dtype) - self.prompt_center) @ self.weight + y0
        if null_pooled is not None:
            null = (pooled == null_pooled.to(pooled.dtype).view(1, -1)).all(-1, keepdim=True)   # [B, 1]
            m = torch.where(null, y0.view(1, -1), m)
        return m.view(batch, *self.latent_shape)

    @classmethod
    def fit(cls, pooled: torch.Tensor, latents: torch.Tensor, ridges=(1e-4, 1e-3, 1e-2, 1e-1, 1.0),
            val: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple["PromptMean", dict]:
        """Ridge regression of latents [N, T, C] on pooled [N, D]. Each ridge is relative to the mean
        eigenvalue of the prompts' covariance; with `val` (pooled, latents) the one with the lowest
        held-out squared error is kept, else the smallest. Returns (module, {ridge, r2_train, r2_val})."""
        N, D = pooled.shape
        shape = latents.shape[1:]
        X = pooled.double()
        Y = latents.reshape(N, -1).double()
        p0, y0 = X.mean(0), Y.mean(0)
        Xc, Yc = X - p0, Y - y0
        ev, V = torch.linalg.eigh(Xc.T @ Xc)
        ev = ev.clamp(min=0)
        XtY_V = V.T @ (Xc.T @ Yc)                                          # [D, n] in the eigenbasis
        scale = float(ev.mean()) or 1.0

        def weight(r: float) -> torch.Tensor:
            return V @ (XtY_V / (ev + r * scale).unsqueeze(1))

        def r2(W: torch.Tensor, Xs: torch.Tensor, Ys: torch.Tensor) -> float:
            err = (Ys.reshape(len(Ys), -1).double() - ((Xs.double() - p0) @ W + y0)).pow(2).sum()
            tot = (Ys.reshape(len(Ys), -1).double() - y0).pow(2).sum()
            return float(1 - err / tot)

        scores = {r: r2(weight(r), *val) for r in ridges} if val is not None and len(val[0]) else {}
        best = max(scores, key=scores.get) if scores else min(ridges)
        W = weight(best)
        out = cls(D, shape)
        out.weight.copy_(W.float())
        out.prompt_center.copy_(p0.float())
        out.latent_center.copy_(y0.float())
        info = {"ridge": best, "r2_train": r2(W, pooled, latents), "n_train": N,
                **({"r2_val": scores[best], "r2_val_by_ridge": scores, "n_val": len(val[0])} if scores else {})}
        return out, info


class EDMPrecond(nn.Module):
    """Wraps a backbone F_theta (any module behind the seam) into the denoiser D_theta(x; sigma).

    With a `prompt_mean` it denoises the latent's offset from the prompt's mean latent:
    D(x; sigma, c) = m(c) + c_skip (x - m(c)) + c_out F(c_in (x - m(c)); ...)."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, prompt_mean: Optional[PromptMean] = None):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.prompt_mean = prompt_mean

    def null_prompt(self, batch: int, length: Optional[int] = None) -> Prompt:
        return self.backbone.null_prompt(batch, length)

    @property
    def self_conditioning(self) -> bool:
        return bool(getattr(self.backbone, "self_conditioning", False))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, prompt: Optional[Prompt] = None,
                mask_ratio: float = 0.0, keep_idx: Optional[torch.Tensor] = None,
                self_cond: Optional[torch.Tensor] = None) -> DenoiserOutput:
        """x [B, T, C] noisy latent at noise level sigma ([B] or scalar) -> D(x; sigma) [B, T, C].
        self_cond: a previous estimate of D (data scale), for self-conditioning backbones."""
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = edm_coefficients(sigma, self.sigma_data)
        bc = (lambda c: c.view(-1, 1, 1))                                # [B] -> [B, 1, 1]
        m = None
        if self.prompt_mean is not None:
            p = prompt or Prompt()
            null = getattr(self.backbone, "null_pooled", None)
            m = self.prompt_mean(p.pooled_or_mean(), x.shape[0], None if null is None else null.detach()).to(x.dtype)
            x = x - m
            if self_cond is not None:
                self_cond = self_cond - m
        extra = {}
        if self.self_conditioning:  # the estimate enters at unit scale, like c_in * x
            extra["self_cond"] = None if self_cond is None else self_cond / self.sigma_data
        out = self.backbone(bc(c_in) * x, c_noise, **(prompt or Prompt()).kwargs(),
                            mask_ratio=mask_ratio, keep_idx=keep_idx, **extra)
        D = bc(c_skip) * x + bc(c_out) * out.sample.to(x.dtype)
        return DenoiserOutput(D if m is None else D + m, out.keep)


class EDMLossOutput(NamedTuple):
    loss: torch.Tensor                     # scalar: mean over samples of the (kept-token) mean
    per_sample: torch.Tensor               # [B] weighted loss of each sample (for loss-vs-sigma logs)
    sigma: torch.Tensor                    # [B] the noise levels drawn
    keep: Optional[torch.Tensor] = None    # [B, T] bool when masking was used


class EDMLoss:
    """EDM training loss; with masking it averages only over the tokens the backbone kept.

    `generator` makes the draws of sigma and n reproducible (tests, benchmarks). With a
    self-conditioning backbone, a share `self_cond_prob` of the training calls first runs the net
    without gradient and feeds that estimate to the graded pass (same noise, same kept tokens); out of
    training mode every call does, as sampling does."""

    def __init__(self, cfg: Optional[EDMConfig] = None):
        self.cfg = cfg or EDMConfig()
        self._sc_gen = torch.Generator().manual_seed(self.cfg.seed)

    def sample_sigma(self, batch: int, device=None, generator=None) -> torch.Tensor:
        ln_sigma = torch.randn(batch, device=device, generator=generator) * self.cfg.P_std + self.cfg.P_mean
        return ln_sigma.exp()

    def __call__(self, net: EDMPrecond, y: torch.Tensor, prompt: Optional[Prompt] = None,
                 mask_ratio: float = 0.0, keep_idx: Optional[torch.Tensor] = None,
                 sigma: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> EDMLossOutput:
        B = y.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(B, y.device, generator).to(y.dtype)
        if noise is None:
            noise = torch.randn(y.shape, device=y.device, generator=generator, dtype=y.dtype)
        n = noise * sigma.view(-1, 1, 1)
        sc = None
        if getattr(net, "self_conditioning", False):
            draw = torch.rand((), generator=generator if generator is not None and generator.device.type == "cpu"
                              else self._sc_gen)
            if not net.training or float(draw) < self.cfg.self_cond_prob:
                if keep_idx is None and mask_ratio > 0:  # both passes drop the same tokens
                    keep_idx = masking.random_keep_idx(B, net.backbone.mask_tokens, mask_ratio, device=y.device,
                                                       generator=generator)
                with torch.no_grad():
                    sc = net(y + n, sigma, prompt, mask_ratio=mask_ratio, keep_idx=keep_idx).sample.detach()
        out = net(y + n, sigma, prompt, mask_ratio=mask_ratio, keep_idx=keep_idx,
                  **({} if sc is None else {"self_cond": sc}))
        weight = edm_loss_weight(sigma, self.cfg.sigma_data).view(-1, 1)      # [B, 1]
        acc = torch.promote_types(y.dtype, torch.float32)                     # fp16/bf16 -> fp32 for the loss
        per_token = weight.to(acc) * ((out.sample.to(acc) - y.to(acc)) ** 2).mean(-1)  # [B, T]
        if out.keep is None:
            per_sample = per_token.mean(1)
        else:
            k = out.keep.to(per_token.dtype)
            per_sample = (per_token * k).sum(1) / k.sum(1).clamp(min=1.0)
        return EDMLossOutput(per_sample.mean(), per_sample.detach(), sigma, out.keep)
