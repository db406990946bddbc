"""Perceiver resampler (compression) and the reconstruction network (the way back up).

Lovelace et al., "Latent Diffusion for Language Generation" (NeurIPS 2023), Sec. 3 and App. A:
a fixed set of learned latent queries cross-attends to the language-model encoder states (and to
themselves), giving a fixed-size latent whatever the text length; a small Transformer maps the latent
back to d_model vectors that the frozen decoder cross-attends to.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(dim * mult, dim))


class PerceiverAttention(nn.Module):
    """Latents (queries) attend to [inputs; latents] (keys/values), as in Flamingo / Lovelace et al."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.norm_x, self.norm_latents = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x [B, T, D], latents [B, N, D], mask [B, T] (True = real token)
        x, latents = self.norm_x(x), self.norm_latents(latents)
        kv_in = torch.cat([x, latents], dim=1)  # [B, T+N, D]
        q = self.to_q(latents)
        k, v = self.to_kv(kv_in).chunk(2, dim=-1)
        B, N, _ = q.shape
        split = lambda t: t.view(B, t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731  [B, H, L, dh]
        attn_mask = None
        if mask is not None:
            keep = torch.cat([mask.bool(), mask.new_ones(B, N, dtype=torch.bool)], dim=1)  # latents always visible
            attn_mask = keep[:, None, None, :]  # [B, 1, 1, T+N]
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))  # [B, N, D]


class PerceiverResampler(nn.Module):
    """Encoder states [B, T, d_model] -> latent [B, num_latents, dim_latent], L2-normalised per slot."""

    def __init__(self, dim: int, dim_latent: int, num_latents: int, depth: int, heads: int, dim_head: int,
                 max_seq_len: int, ff_mult: int = 4, l2_normalize: bool = True):
        super().__init__()
        # Small inits: a position embedding or query as large as the encoder states would add the same
        # vector to every poem's latent and drown the part that tells poems apart.
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)  # the learned latent queries
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)]) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, dim_latent)
        self.l2_normalize = l2_normalize

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.pos_emb(torch.arange(x.shape[1], device=x.device))
        latents = self.latents.expand(x.shape[0], -1, -1)  # [B, N, D]
        for attn, ff in self.layers:
            latents = latents + attn(x, latents, mask)
            latents = latents + ff(latents)
        z = self.proj_out(self.final_norm(latents))  # [B, N, dim_latent]
        if self.l2_normalize:
            # Every slot on the sphere of radius sqrt(dim_latent): unit variance per coordinate, as the
            # diffusion model's sigma_data assumes.
            z = F.normalize(z, dim=-1) * math.sqrt(z.shape[-1])
        return z


class ReconstructionNetwork(nn.Module):
    """Latent [B, N, dim_latent] -> [B, N, d_model]: the `encoder_outputs` the BART decoder cross-attends to."""

    def __init__(self, dim_latent: int, dim: int, num_latents: int, depth: int, heads: int, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim_latent, dim)
        self.pos_emb = nn.Parameter(torch.zeros(num_latents, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim * ff_mult, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth > 0 else nn.Identity()
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(z) + self.pos_emb  # [B, N, dim]
        return self.final_norm(self.blocks(h))
