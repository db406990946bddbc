"""The EDM sampler: Heun's 2nd-order method with optional stochastic churn.

Karras et al. (2022), Algorithm 2, with the time steps of Eq. 5:
    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  t_N = 0
N steps cost 2N - 1 denoiser evaluations (the last step is Euler); 18 steps -> 35.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from tqdm.auto import tqdm

from trainer.diffusion.guidance import guided_denoise
from trainer.models.denoisers.interface import Prompt


@dataclasses.dataclass
class SamplerConfig:
    num_steps: int = 18            # N
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0           # 0 = deterministic sampler
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    guidance_scale: float = 1.0    # classifier-free guidance weight w; 1 = no guidance

    def __post_init__(self):
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.rho <= 0:
            raise ValueError(f"rho must be > 0, got {self.rho}")
        if self.S_churn < 0:
            raise ValueError(f"S_churn must be >= 0, got {self.S_churn}")


def sigma_steps(cfg: SamplerConfig, device=None) -> torch.Tensor:
    """[N + 1] float64 noise levels t_0 = sigma_max > ... > t_{N-1} = sigma_min, t_N = 0."""
    N = cfg.num_steps
    i = torch.arange(N, dtype=torch.float64, device=device)
    inv = 1.0 / cfg.rho
    frac = i / (N - 1) if N > 1 else i
    t = (cfg.sigma_max ** inv + frac * (cfg.sigma_min ** inv - cfg.sigma_max ** inv)) ** cfg.rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


@torch.no_grad()
def edm_sampler(net, noise: torch.Tensor, prompt: Optional[Prompt] = None, cfg: Optional[SamplerConfig] = None,
                generator: Optional[torch.Generator] = None, progress: bool = False,
                callback=None, inpaint: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """noise [B, T, C] ~ N(0, I) -> samples [B, T, C] (dtype of noise).

    net(x, sigma, prompt) -> DenoiserOutput, and net.null_prompt(batch, length) (EDMPrecond has both).
    The sampler state is kept in float64, as in the reference implementation.
    callback(i, x_next, denoised), if given, sees every step: the new state and the step's
    denoised estimate D(x_hat; t_hat) (what `latentverse generate --show-steps` decodes).
    inpaint=(known_values [B, T, C], known_mask [B, T] bool) clamps the known token positions, as
    RePaint does (Lugmayr et al. 2022): after every step they are set to known_values + t_next * fresh
    noise (the noisy state the rest of x is at), so the final output holds known_values exactly;
    the callback's denoised estimate shows them as known_values."""
    cfg = cfg or SamplerConfig()
    dtype = noise.dtype
    param = next(iter(net.parameters()), None) if hasattr(net, "parameters") else None
    net_dtype = param.dtype if param is not None else dtype

    # Self-conditioning nets read the previous evaluation's (guided) estimate; none before the first.
    prev: list = [None] if getattr(net, "self_conditioning", False) else []

    def D(x, sigma):
        def call(x_, s_, p_):
            extra = {}
            if prev and prev[0] is not None:  # cond and uncond halves of a guided batch share it
                extra["self_cond"] = prev[0].repeat(x_.shape[0] // prev[0].shape[0], 1, 1).to(net_dtype)
            return net(x_.to(net_dtype), s_.to(net_dtype), p_, **extra).sample.to(torch.float64)

        s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(x.shape[0])
        out = guided_denoise(call, net.null_prompt, x, s, prompt, cfg.guidance_scale)
        if prev:
            prev[0] = out
        return out

    t = sigma_steps(cfg, noise.device)
    N = cfg.num_steps
    x_next = noise.to(torch.float64) * t[0]
    if inpaint is not None:
        known = inpaint[0].to(x_next.device, torch.float64)                 # [B, T, C] (or [T, C])
        keep = inpaint[1].to(x_next.device, torch.bool).unsqueeze(-1)       # [B, T, 1] (or [T, 1])

        def clamp(x, sigma):
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float64, device=x.device)
            return torch.where(keep, known + sigma * eps, x)

        x_next = torch.where(keep, known + t[0] * noise.to(torch.float64), x_next)
    for i in tqdm(range(N), desc="EDM sampling", disable=not progress, leave=False):
        t_cur, t_next = t[i], t[i + 1]
        x_cur = x_next
        # Churn: raise the noise level to t_hat by adding fresh noise (Algorithm 2, lines 4-6).
        gamma = min(cfg.S_churn / N, math.sqrt(2) - 1) if cfg.S_min <= float(t_cur) <= cfg.S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, dtype=torch.float64, device=x_cur.device)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * cfg.S_noise * eps
        else:
            x_hat = x_cur
        # Euler step.
        denoised = D(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        # Heun correction, except on the last step where t_next = 0.
        if i < N - 1:
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if inpaint is not None:
            x_next = clamp(x_next, t_next) if i < N - 1 else torch.where(keep, known, x_next)
            denoised = torch.where(keep, known, denoised)
        if callback is not None:
            callback(i, x_next, denoised)
    return x_next.to(dtype)
