"""Per-sample random token masking (MAE, He et al. 2022), as used for masked diffusion pretraining."""
from __future__ import annotations

from typing import Optional

import torch


def num_kept(tokens: int, mask_ratio: float) -> int:
    """round(T * (1 - r)) tokens stay; at least one, so every sample has something to learn from."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return max(1, min(tokens, round(tokens * (1.0 - mask_ratio))))


def random_keep_idx(batch: int, tokens: int, mask_ratio: float, device=None,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[B, K] long: each sample's kept token indices, a uniformly random subset, sorted."""
    k = num_kept(tokens, mask_ratio)
    noise = torch.rand(batch, tokens, device=device, generator=generator)
    keep = noise.argsort(dim=1)[:, :k]                                  # [B, K]
    return keep.sort(dim=1).values


def keep_mask(keep_idx: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, K] indices -> [B, T] bool, True where kept."""
    m = torch.zeros(keep_idx.shape[0], tokens, dtype=torch.bool, device=keep_idx.device)
    return m.scatter(1, keep_idx, True)


def gather_tokens(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, K, D]."""
    return x.gather(1, keep_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(x_kept: torch.Tensor, keep_idx: torch.Tensor, fill: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, K, D] back to [B, T, D]; dropped positions take `fill` ([D], e.g. a learned mask token)."""
    B, _, D = x_kept.shape
    full = fill.to(x_kept.dtype).expand(B, tokens, D)
    return full.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, D), x_kept)
