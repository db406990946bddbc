"""The best linear denoiser: the Gaussian fitted to the training latents and its Wiener filter.

For latents x0 ~ N(mean, Cov) and x = x0 + sigma n, the posterior mean E[x0 | x] is linear in x:
    mean + V diag(ev / (ev + sigma^2)) V^T (x - mean),   Cov = V diag(ev) V^T.
No denoiser that is linear in x does better in mean squared error on any data with that mean and
covariance, so a trained denoiser's error divided by this one's says how much it has learnt beyond the
latents' first two moments (< 1), and draws from the Gaussian are the samples of a diffusion model
that has learnt nothing more. Used by the diffusion job's evaluation (the ratio as a metric during
training) and by the generation evaluation (`errors_vs_linear`, for both).
"""
from __future__ import annotations

from typing import Optional

import torch


class LinearDenoiser:
    def __init__(self, mean: torch.Tensor, vecs: torch.Tensor, ev: torch.Tensor, shape: tuple[int, ...]):
        self.mean, self.vecs, self.ev = mean.double(), vecs.double(), ev.double().clamp(min=0)
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def fit(cls, latents: torch.Tensor) -> "LinearDenoiser":
        """latents [N, ...] -> the Gaussian of the flattened latents (mean, covariance's eigenbasis)."""
        x = torch.as_tensor(latents).reshape(len(latents), -1).double()
        mean = x.mean(0)
        ev, vecs = torch.linalg.eigh(torch.cov((x - mean).T))
        return cls(mean, vecs, ev, tuple(latents.shape[1:]))

    def state(self) -> dict:
        return {"mean": self.mean, "vecs": self.vecs, "ev": self.ev, "shape": self.shape}

    @classmethod
    def from_state(cls, state: dict) -> "LinearDenoiser":
        return cls(state["mean"], state["vecs"], state["ev"], state["shape"])

    def to(self, device) -> "LinearDenoiser":
        return LinearDenoiser(self.mean.to(device), self.vecs.to(device), self.ev.to(device), self.shape)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x [B, ...] noisy at noise level sigma -> the posterior mean if latents were this Gaussian."""
        flat = x.reshape(len(x), -1).double() - self.mean
        shrink = self.ev / (self.ev + float(sigma) ** 2)
        return (((flat @ self.vecs) * shrink) @ self.vecs.T + self.mean).to(x.dtype).reshape(x.shape)

    @property
    def factor(self) -> torch.Tensor:
        """F with F F^T = the covariance: mean + F g, g ~ N(0, I), is a draw."""
        return self.vecs * self.ev.sqrt()

    def sample(self, n: int, seed: int = 0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        g = torch.randn(n, len(self.ev), generator=generator or torch.Generator().manual_seed(seed), dtype=torch.float64)
        return (self.mean + g @ self.factor.T).float().reshape(n, *self.shape)


def errors_vs_linear(denoise, linear: LinearDenoiser, x0: torch.Tensor, sigma: float,
                     generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """x0 [B, ...] noised at `sigma` (one draw from `generator`) -> each sample's mean squared error of
    `denoise(noisy)`, of the linear denoiser and of the noisy input itself: {"denoiser", "linear", "noisy"}."""
    noisy = x0 + sigma * torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    err = (lambda d: (d.float() - x0.float()).pow(2).flatten(1).mean(1))
    return {"denoiser": err(denoise(noisy)), "linear": err(linear(noisy.double(), sigma)), "noisy": err(noisy)}
