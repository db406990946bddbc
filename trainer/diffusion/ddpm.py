"""DDPM epsilon-prediction baseline (Ho et al., 2020) through diffusers' DDPMScheduler.

The classic text-diffusion recipe (1000 ancestral steps), kept as a sibling formulation behind the
same backbone seam and call shape as EDM, so the two can be compared on one backbone.
The backbone receives x_t unscaled (variance-preserving, so c_in = 1) and c_noise = t / T_train.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Optional

import torch
from diffusers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from trainer.diffusion.guidance import guided_denoise
from trainer.models.denoisers.interface import Prompt


@dataclasses.dataclass
class DDPMConfig:
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_inference_steps: int = 1000
    guidance_scale: float = 1.0


class DDPMLossOutput(NamedTuple):
    loss: torch.Tensor
    timesteps: torch.Tensor                # [B]
    keep: Optional[torch.Tensor] = None


class DDPM(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: Optional[DDPMConfig] = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg or DDPMConfig()
        # clip_sample is off: latents are not images in [-1, 1].
        self.scheduler = DDPMScheduler(num_train_timesteps=self.cfg.num_train_timesteps,
                                       beta_schedule=self.cfg.beta_schedule, beta_start=self.cfg.beta_start,
                                       beta_end=self.cfg.beta_end, prediction_type="epsilon", clip_sample=False)

    def null_prompt(self, batch: int, length: Optional[int] = None) -> Prompt:
        return self.backbone.null_prompt(batch, length)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompt: Optional[Prompt] = None,
                mask_ratio: float = 0.0, keep_idx: Optional[torch.Tensor] = None):
        """x_t [B, T, C] at integer timesteps t [B] -> DenoiserOutput with epsilon_hat [B, T, C]."""
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        c_noise = t.to(x_t.dtype) / self.cfg.num_train_timesteps
        return self.backbone(x_t, c_noise, **(prompt or Prompt()).kwargs(), mask_ratio=mask_ratio, keep_idx=keep_idx)

    def loss(self, y: torch.Tensor, prompt: Optional[Prompt] = None, mask_ratio: float = 0.0,
             keep_idx: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> DDPMLossOutput:
        B = y.shape[0]
        t = torch.randint(0, self.cfg.num_train_timesteps, (B,), device=y.device, generator=generator)
        eps = torch.randn(y.shape, device=y.device, generator=generator, dtype=y.dtype)
        x_t = self.scheduler.add_noise(y, eps, t)
        out = self(x_t, t, prompt, mask_ratio=mask_ratio, keep_idx=keep_idx)
        acc = torch.promote_types(y.dtype, torch.float32)
        per_token = ((out.sample.to(acc) - eps.to(acc)) ** 2).mean(-1)          # [B, T]
        if out.keep is None:
            return DDPMLossOutput(per_token.mean(), t)
        k = out.keep.to(acc)
        return DDPMLossOutput(((per_token * k).sum(1) / k.sum(1).clamp(min=1)).mean(), t, out.keep)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompt: Optional[Prompt] = None, generator: Optional[torch.Generator] = None,
               progress: bool = False) -> torch.Tensor:
        """Ancestral sampling, `num_inference_steps` denoiser evaluations (x guidance batch)."""
        sched = DDPMScheduler.from_config(self.scheduler.config)  # its own step state
        sched.set_timesteps(self.cfg.num_inference_steps, device=noise.device)
        call = (lambda x_, t_, p_: self(x_, t_, p_).sample)
        x = noise * sched.init_noise_sigma
        for t in tqdm(sched.timesteps, desc="DDPM sampling", disable=not progress, leave=False):
            tt = t.to(noise.device).expand(x.shape[0])
            eps = guided_denoise(call, self.null_prompt, x, tt, prompt, self.cfg.guidance_scale)
            x = sched.step(eps, int(t), x, generator=generator).prev_sample
        return x
