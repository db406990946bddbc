"""An MLP-UNet: the flattened latent through a stack of shrinking MLP blocks and back, with U-Net skip
connections and FiLM conditioning on noise level + pooled prompt (a small, fast baseline denoiser)."""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from trainer.models.denoisers.interface import DenoiserOutput
from trainer.models.denoisers.base import Backbone, NoiseEmbedding


@dataclasses.dataclass
class MLPUNetConfig:
    widths: list[int] = dataclasses.field(default_factory=lambda: [1024, 512, 256])  # encoder widths, top to bottom
    emb_dim: int = 256
    c_noise_scale: float = 1000.0

    def __post_init__(self):
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty list of positive ints, got {self.widths}")


class FiLMBlock(nn.Module):
    """Residual MLP block; the conditioning embedding scales and shifts the normalised input."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h, c):
        scale, shift = self.film(c).chunk(2, dim=-1)
        z = self.norm(h) * (1 + scale) + shift
        return h + self.fc2(torch.nn.functional.silu(self.fc1(torch.nn.functional.silu(z))))


class MLPUNet(Backbone):
    def __init__(self, cfg: MLPUNetConfig, latent_tokens: int = 32, latent_dim: int = 64, prompt_dim: int = 384,
                 null_tokens: int = 1):
        super().__init__(latent_tokens, latent_dim, prompt_dim, null_tokens)
        self.cfg = cfg
        w, e = cfg.widths, cfg.emb_dim
        flat = latent_tokens * latent_dim
        self.t_embed = NoiseEmbedding(e, cfg.c_noise_scale)
        if prompt_dim > 0:
            self.pooled_embed = nn.Sequential(nn.Linear(prompt_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.inp = nn.Linear(flat, w[0])
        self.enc = nn.ModuleList([FiLMBlock(wi, e) for wi in w])
        self.down = nn.ModuleList([nn.Linear(w[i], w[i + 1]) for i in range(len(w) - 1)])
        self.mid = FiLMBlock(w[-1], e)
        self.up = nn.ModuleList([nn.Linear(w[i + 1], w[i]) for i in range(len(w) - 1)])
        self.merge = nn.ModuleList([nn.Linear(2 * wi, wi) for wi in w])   # skip connection: concat, project
        self.dec = nn.ModuleList([FiLMBlock(wi, e) for wi in w])
        self.out_norm = nn.LayerNorm(w[0])
        self.out = nn.Linear(w[0], flat)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                mask_ratio: float = 0.0, keep_idx=None) -> DenoiserOutput:
        self.check_input(x, mask_ratio, keep_idx)
        B = x.shape[0]
        c = self.t_embed(c_noise.reshape(-1).expand(B))                   # [B, emb]
        if self.prompt_dim > 0:
            p = self.resolve_prompt(B, prompt_emb, prompt_mask, prompt_pooled)
            c = c + self.pooled_embed(p.pooled.to(c.dtype))
        h = self.inp(x.reshape(B, -1))                                    # [B, w0]
        skips = []
        for i, blk in enumerate(self.enc):
            h = blk(h, c)
            skips.append(h)
            if i < len(self.down):
                h = self.down[i](h)                                       # [B, w_{i+1}]
        h = self.mid(h, c)
        for i in reversed(range(len(self.dec))):
            if i < len(self.up):
                h = self.up[i](h)                                         # [B, w_i]
            h = self.merge[i](torch.cat([h, skips[i]], dim=-1))
            h = self.dec[i](h, c)
        out = self.out(self.out_norm(h))                                  # [B, T*C]
        return DenoiserOutput(out.view(B, *self.latent_shape))
