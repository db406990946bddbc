"""The 2-D view of the [T, C] latent that the diffusers image backbones (Sana, UNet2D) need.

`view_2d = [C2, H, W]` with C2 * H * W = T * C. Without transpose the slots lead: the row-major
[T, C] latent is re-read as [C2, H, W] (e.g. [32, 16, 4]: each slot a channel, its 64 dims a 16x4
image, as the original poem generator did). With `transpose` the 64 latent dims lead ([C, T]
re-read, e.g. [64, 8, 4]: each latent dim a channel over an 8x4 grid of slots).
"""
from __future__ import annotations

import math

import torch


def check_view(view_2d: list[int], tokens: int, dim: int) -> None:
    if len(view_2d) != 3 or any(v < 1 for v in view_2d):
        raise ValueError(f"view_2d must be [channels, height, width] of positive ints, got {view_2d}")
    if math.prod(view_2d) != tokens * dim:
        raise ValueError(f"view_2d {view_2d} holds {math.prod(view_2d)} values but the latent "
                         f"[{tokens}, {dim}] holds {tokens * dim}")


class LatentView2D:
    def __init__(self, tokens: int, dim: int, view_2d: list[int], transpose: bool = False):
        check_view(view_2d, tokens, dim)
        self.tokens, self.dim, self.view, self.transpose = tokens, dim, list(view_2d), transpose

    def to_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, C] -> [B, C2, H, W]"""
        if self.transpose:
            x = x.transpose(1, 2)
        return x.reshape(x.shape[0], *self.view)

    def from_2d(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C2, H, W] -> [B, T, C]"""
        B = x.shape[0]
        if self.transpose:
            return x.reshape(B, self.dim, self.tokens).transpose(1, 2)
        return x.reshape(B, self.tokens, self.dim)
