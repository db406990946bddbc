"""diffusers' UNet2DModel (the DDPM / ADM U-Net) behind the backbone seam, on a 2-D view of the latent.

UNet2DModel has no cross-attention, so the prompt enters as its pooled vector: projected to the
time-embedding width and added to the noise-level embedding (`class_embed_type="identity"`).
"""
from __future__ import annotations

import dataclasses

from diffusers import UNet2DModel
from torch import nn

from trainer.models.denoisers.interface import DenoiserOutput
from trainer.models.denoisers.base import Backbone
from trainer.models.denoisers.view2d import LatentView2D


@dataclasses.dataclass
class UNet2DConfig:
    view_2d: list[int] = dataclasses.field(default_factory=lambda: [32, 16, 4])
    view_transpose: bool = False
    block_out_channels: list[int] = dataclasses.field(default_factory=lambda: [128, 256])
    down_block_types: list[str] = dataclasses.field(default_factory=lambda: ["DownBlock2D", "AttnDownBlock2D"])
    up_block_types: list[str] = dataclasses.field(default_factory=lambda: ["AttnUpBlock2D", "UpBlock2D"])
    layers_per_block: int = 2
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    c_noise_scale: float = 1000.0

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("block_out_channels, down_block_types and up_block_types must have the same length")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"every block_out_channels entry must be a multiple of norm_num_groups ({self.norm_num_groups})")


class UNet2DDenoiser(Backbone):
    def __init__(self, cfg: UNet2DConfig, latent_tokens: int = 32, latent_dim: int = 64, prompt_dim: int = 384,
                 null_tokens: int = 1):
        super().__init__(latent_tokens, latent_dim, prompt_dim, null_tokens)
        self.cfg = cfg
        self.view = LatentView2D(latent_tokens, latent_dim, cfg.view_2d, cfg.view_transpose)
        ch, h, w = cfg.view_2d
        time_dim = cfg.block_out_channels[0] * 4  # UNet2DModel's default time-embedding width
        self.net = UNet2DModel(
            sample_size=(h, w), in_channels=ch, out_channels=ch, block_out_channels=tuple(cfg.block_out_channels),
            down_block_types=tuple(cfg.down_block_types), up_block_types=tuple(cfg.up_block_types),
            layers_per_block=cfg.layers_per_block, attention_head_dim=cfg.attention_head_dim,
            norm_num_groups=cfg.norm_num_groups, class_embed_type="identity" if prompt_dim > 0 else None)
        if prompt_dim > 0:
            self.pooled_proj = nn.Sequential(nn.Linear(prompt_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))

    def forward(self, x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                mask_ratio: float = 0.0, keep_idx=None) -> DenoiserOutput:
        self.check_input(x, mask_ratio, keep_idx)
        B = x.shape[0]
        labels = None
        if self.prompt_dim > 0:
            p = self.resolve_prompt(B, prompt_emb, prompt_mask, prompt_pooled)
            labels = self.pooled_proj(p.pooled.to(x.dtype))               # [B, time_dim]
        img = self.view.to_2d(x)                                          # [B, C2, H, W]
        out = self.net(img, c_noise.reshape(-1).expand(B) * self.cfg.c_noise_scale, class_labels=labels).sample
        return DenoiserOutput(self.view.from_2d(out))                     # [B, T, C]
