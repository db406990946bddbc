"""What every denoiser backbone shares: the seam signature, the learned null prompt, the noise embedding.

The seam itself is described in trainer/diffusion/__init__.py.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from trainer.models.denoisers.interface import DenoiserOutput, Prompt


def sinusoidal_embedding(c: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] scalars -> [B, dim] sin/cos features (Vaswani et al.; the DiT / ADM timestep embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=c.device) / half)
    args = c.float()[:, None] * freqs[None]                              # [B, half]
    emb = torch.cat([args.cos(), args.sin()], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class NoiseEmbedding(nn.Module):
    """c_noise [B] -> [B, dim]: sinusoidal features of c_noise * scale, then a 2-layer MLP.

    scale = 1000 puts EDM's c_noise = ln(sigma)/4 (about -1.6..1.1) and DDPM's t/T (0..1) over
    the same frequency range the sinusoid was designed for (integer timesteps up to ~1000)."""

    def __init__(self, dim: int, scale: float = 1000.0, freq_dim: int = 256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(c_noise * self.scale, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class Backbone(nn.Module):
    """Base of every denoiser: holds the latent shape, the prompt width and the learned null prompt."""

    supports_masking = False

    def __init__(self, latent_tokens: int, latent_dim: int, prompt_dim: int, null_tokens: int = 1):
        super().__init__()
        self.latent_shape = (latent_tokens, latent_dim)
        self.mask_tokens = latent_tokens   # the tokens masking drops (a backbone that groups slots: fewer)
        self.prompt_dim = prompt_dim
        if prompt_dim > 0:
            # The "no prompt" of classifier-free guidance: learned token embeddings and pooled vector.
            self.null_emb = nn.Parameter(torch.randn(null_tokens, prompt_dim) * 0.02)
            self.null_pooled = nn.Parameter(torch.randn(prompt_dim) * 0.02)

    def null_prompt(self, batch: int, length: Optional[int] = None) -> Prompt:
        """The learned null prompt for a batch, padded (mask False) or cut to `length` tokens."""
        if self.prompt_dim == 0:
            return Prompt()
        n = self.null_emb.shape[0]
        L = n if length is None else max(int(length), 1)
        emb = self.null_emb[:L]
        mask = torch.ones(min(n, L), dtype=torch.bool, device=emb.device)
        if L > n:
            emb = torch.cat([emb, emb.new_zeros(L - n, self.prompt_dim)])
            mask = torch.cat([mask, mask.new_zeros(L - n)])
        return Prompt(emb.unsqueeze(0).expand(batch, -1, -1), mask.unsqueeze(0).expand(batch, -1),
                      self.null_pooled.unsqueeze(0).expand(batch, -1))

    def resolve_prompt(self, batch: int, prompt_emb, prompt_mask, prompt_pooled) -> Prompt:
        """Apply the seam's rules: no prompt -> null prompt; no pooled -> masked mean; no mask -> all real."""
        if self.prompt_dim == 0:
            return Prompt()
        if prompt_emb is None and prompt_pooled is None:
            return self.null_prompt(batch)
        p = Prompt(prompt_emb, prompt_mask, prompt_pooled)
        if p.emb is None:  # pooled-only conditioning: the null tokens stand in for the token sequence
            nul = self.null_prompt(batch)
            return Prompt(nul.emb, nul.mask, p.pooled)
        return Prompt(p.emb, p.full_mask(), p.pooled_or_mean())

    def check_input(self, x: torch.Tensor, mask_ratio: float, keep_idx) -> None:
        if x.dim() != 3 or tuple(x.shape[1:]) != self.latent_shape:
            raise ValueError(f"{type(self).__name__}: expected x of shape [B, {self.latent_shape[0]}, "
                             f"{self.latent_shape[1]}], got {list(x.shape)}")
        if (mask_ratio > 0 or keep_idx is not None) and not self.supports_masking:
            raise ValueError(f"{type(self).__name__} does not support token masking (mask_ratio={mask_ratio}); "
                             "use the moe_dit backbone for masked training")

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, prompt_emb=None, prompt_mask=None,
                prompt_pooled=None, mask_ratio: float = 0.0, keep_idx=None) -> DenoiserOutput:
        raise NotImplementedError
