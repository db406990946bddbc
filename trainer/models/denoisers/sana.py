"""diffusers' SanaTransformer2DModel (Xie et al., 2024) behind the backbone seam, on a 2-D view of the latent.

Conditioning: the noise level through Sana's own timestep embedding (c_noise * c_noise_scale), the
prompt tokens through its caption projection and cross-attention with the padding mask. Sana has
no pooled-prompt input, so prompt_pooled is not used by this backbone.
"""
from __future__ import annotations

import dataclasses

import torch
from diffusers import SanaTransformer2DModel
from torch import nn

from trainer.models.denoisers.interface import DenoiserOutput, Prompt
from trainer.models.denoisers.base import Backbone
from trainer.models.denoisers.view2d import LatentView2D


@dataclasses.dataclass
class SanaConfig:
    view_2d: list[int] = dataclasses.field(default_factory=lambda: [32, 16, 4])
    view_transpose: bool = False
    num_layers: int = 8
    num_attention_heads: int = 8
    attention_head_dim: int = 32
    num_cross_attention_heads: int = 8
    cross_attention_head_dim: int = 32
    mlp_ratio: float = 2.5
    patch_size: int = 1
    c_noise_scale: float = 1000.0

    def __post_init__(self):
        inner = self.num_attention_heads * self.attention_head_dim
        if self.num_cross_attention_heads * self.cross_attention_head_dim != inner:
            raise ValueError("num_cross_attention_heads * cross_attention_head_dim must equal "
                             f"num_attention_heads * attention_head_dim ({inner})")


class SanaDenoiser(Backbone):
    def __init__(self, cfg: SanaConfig, latent_tokens: int = 32, latent_dim: int = 64, prompt_dim: int = 384,
                 null_tokens: int = 1):
        super().__init__(latent_tokens, latent_dim, prompt_dim, null_tokens)
        self.cfg = cfg
        if prompt_dim == 0:
            # Sana always cross-attends, so an unconditional model attends to one learned token.
            self.uncond_token = nn.Parameter(torch.randn(1, 1, 1) * 0.02)
        self.view = LatentView2D(latent_tokens, latent_dim, cfg.view_2d, cfg.view_transpose)
        ch, h, w = cfg.view_2d
        self.net = SanaTransformer2DModel(
            in_channels=ch, out_channels=ch, num_attention_heads=cfg.num_attention_heads,
            attention_head_dim=cfg.attention_head_dim, num_layers=cfg.num_layers,
            num_cross_attention_heads=cfg.num_cross_attention_heads,
            cross_attention_head_dim=cfg.cross_attention_head_dim,
            cross_attention_dim=cfg.num_attention_heads * cfg.attention_head_dim,
            caption_channels=max(prompt_dim, 1), mlp_ratio=cfg.mlp_ratio, sample_size=max(h, w),
            patch_size=cfg.patch_size)

    def forward(self, x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                mask_ratio: float = 0.0, keep_idx=None) -> DenoiserOutput:
        self.check_input(x, mask_ratio, keep_idx)
        B = x.shape[0]
        if self.prompt_dim == 0:
            p = Prompt(self.uncond_token.expand(B, 1, 1), torch.ones(B, 1, dtype=torch.bool, device=x.device))
        else:
            p = self.resolve_prompt(B, prompt_emb, prompt_mask, prompt_pooled)
        img = self.view.to_2d(x)                                           # [B, C2, H, W]
        out = self.net(img, encoder_hidden_states=p.emb.to(x.dtype), timestep=c_noise.reshape(-1).expand(B)
                       * self.cfg.c_noise_scale, encoder_attention_mask=p.mask, return_dict=False)[0]
        return DenoiserOutput(self.view.from_2d(out))                      # [B, T, C]
