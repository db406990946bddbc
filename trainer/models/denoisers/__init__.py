"""Denoiser backbones behind one seam (see trainer/diffusion/__init__.py), chosen in YAML:

    model:
      kind: moe_dit          # moe_dit | sana | unet2d | mlp
      prompt_dim: 384
      moe_dit: {dim: 256, depth: 8}

`build_denoiser(cfg)` builds the one named by `kind`; the other sections keep their defaults and
are ignored.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

from trainer.models.denoisers.base import Backbone
from trainer.models.denoisers.mlp_unet import MLPUNet, MLPUNetConfig
from trainer.models.denoisers.moe_dit import MoEDiT, MoEDiTConfig
from trainer.models.denoisers.sana import SanaConfig, SanaDenoiser
from trainer.models.denoisers.unet2d import UNet2DConfig, UNet2DDenoiser
from trainer.models.denoisers.view2d import check_view

KINDS = {"moe_dit": MoEDiT, "sana": SanaDenoiser, "unet2d": UNet2DDenoiser, "mlp": MLPUNet}


@dataclasses.dataclass
class DenoiserConfig:
    kind: Literal["moe_dit", "sana", "unet2d", "mlp"] = "moe_dit"
    latent_tokens: int = 32        # T: Perceiver slots
    latent_dim: int = 64           # C: dims per slot
    prompt_dim: int = 384          # D of the prompt embeddings (MiniLM: 384); 0 = unconditional
    null_tokens: int = 1           # length of the learned null prompt (classifier-free guidance)
    moe_dit: MoEDiTConfig = dataclasses.field(default_factory=MoEDiTConfig)
    sana: SanaConfig = dataclasses.field(default_factory=SanaConfig)
    unet2d: UNet2DConfig = dataclasses.field(default_factory=UNet2DConfig)
    mlp: MLPUNetConfig = dataclasses.field(default_factory=MLPUNetConfig)

    def __post_init__(self):
        if self.latent_tokens < 1 or self.latent_dim < 1 or self.prompt_dim < 0 or self.null_tokens < 1:
            raise ValueError("latent_tokens, latent_dim, null_tokens must be >= 1 and prompt_dim >= 0")
        if self.kind in ("sana", "unet2d"):
            try:
                check_view(getattr(self, self.kind).view_2d, self.latent_tokens, self.latent_dim)
            except ValueError as e:
                raise ValueError(f"{self.kind}.{e}") from None


def build_denoiser(cfg: DenoiserConfig) -> Backbone:
    """The backbone named by cfg.kind, built from its config section (random init, nothing downloaded)."""
    return KINDS[cfg.kind](getattr(cfg, cfg.kind), latent_tokens=cfg.latent_tokens, latent_dim=cfg.latent_dim,
                           prompt_dim=cfg.prompt_dim, null_tokens=cfg.null_tokens)


__all__ = ["Backbone", "DenoiserConfig", "build_denoiser", "KINDS", "MoEDiT", "MoEDiTConfig", "SanaDenoiser",
           "SanaConfig", "UNet2DDenoiser", "UNet2DConfig", "MLPUNet", "MLPUNetConfig"]
