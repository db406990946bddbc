"""Expert-choice MoE Diffusion Transformer over the 32 latent slots, with a patch mixer and masking.

Follows micro_diffusion (Sehwag et al., 2024, "Stretching Each Dollar"): DiT blocks (Peebles & Xie,
2023) with adaLN conditioning on noise level + pooled prompt and cross-attention to the prompt
tokens; a few dense "patch mixer" blocks run on all tokens before a random subset is dropped
(MAE-style, He et al. 2022), so the backbone sees global context while processing only the kept
tokens; a learned mask token fills the dropped positions back before the final layer. Every
second backbone block has an expert-choice MoE FFN (Zhou et al., 2022): each of E experts picks
its own top k = capacity * T / E tokens per sample, so load is balanced by construction.
Layer-wise width scaling (attention and FFN widths growing with depth) is optional.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models import masking
from trainer.models.denoisers.interface import DenoiserOutput
from trainer.models.denoisers.base import Backbone, NoiseEmbedding


@dataclasses.dataclass
class MoEDiTConfig:
    dim: int = 512
    depth: int = 12                       # backbone blocks (after masking)
    head_dim: int = 64
    # Layer-wise width scaling: one value for all blocks, [first, last] spaced linearly over depth,
    # or one value per block. Ratios are relative to `dim`.
    mlp_ratio: list[float] = dataclasses.field(default_factory=lambda: [4.0])
    qkv_ratio: list[float] = dataclasses.field(default_factory=lambda: [1.0])
    patch_mixer_depth: int = 2            # dense blocks on all tokens before masking (0 = none)
    # The mixer is lighter than the backbone, as in micro_diffusion: its own width (None = dim; another
    # width adds LayerNorm + Linear maps in and out) and FFN ratio. It runs on every token at every
    # mask ratio, so its cost is the floor of the masked-training saving.
    patch_mixer_dim: Optional[int] = None
    patch_mixer_mlp_ratio: float = 1.0
    num_experts: int = 8                  # E; 1 = no MoE (every FFN dense)
    expert_capacity: float = 2.0          # c: each expert takes k = c * T / E tokens per sample
    experts_every_n: int = 2              # MoE FFN in blocks n-1, 2n-1, ... (every second block)
    pos_embed: Literal["learned", "sincos"] = "learned"
    # Latent slots per DiT token: 2 makes the 32 x 64 latent 16 tokens of 128 numbers (consecutive slots
    # side by side), half the tokens for attention and masking; masking drops a token's slots together.
    slots_per_token: int = 1
    # Self-conditioning (Chen et al. 2022, "Analog Bits"): the model also reads its previous estimate of
    # the clean latent (the sampler's last D; in training a no-grad first pass on half the batches).
    self_condition: bool = False
    c_noise_scale: float = 1000.0
    use_bias: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.dim % self.head_dim:
            raise ValueError(f"dim ({self.dim}) must be a multiple of head_dim ({self.head_dim})")
        for name in ("mlp_ratio", "qkv_ratio"):
            v = getattr(self, name)
            if len(v) not in (1, 2, self.depth) or any(r <= 0 for r in v):
                raise ValueError(f"{name} must hold 1, 2 or depth={self.depth} positive values, got {v}")
        if self.patch_mixer_dim is not None and (self.patch_mixer_dim <= 0 or self.patch_mixer_dim % self.head_dim):
            raise ValueError(f"patch_mixer_dim ({self.patch_mixer_dim}) must be a positive multiple of head_dim ({self.head_dim})")
        if self.patch_mixer_mlp_ratio <= 0:
            raise ValueError(f"patch_mixer_mlp_ratio must be > 0, got {self.patch_mixer_mlp_ratio}")
        if self.slots_per_token < 1:
            raise ValueError(f"slots_per_token must be >= 1, got {self.slots_per_token}")
        if self.num_experts < 1 or self.expert_capacity <= 0 or self.experts_every_n < 1:
            raise ValueError("num_experts, expert_capacity and experts_every_n must be positive")

    def per_block(self, ratios: list[float]) -> list[float]:
        if len(ratios) == self.depth:
            return list(ratios)
        if len(ratios) == 1:
            return [ratios[0]] * self.depth
        a, b = ratios
        return [a + (b - a) * i / max(self.depth - 1, 1) for i in range(self.depth)]

    def is_moe(self, i: int) -> bool:
        return self.num_experts > 1 and (i + 1) % self.experts_every_n == 0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in its input's dtype: the affine weights follow the input, so an fp32 residual
    stream is normalised in fp32 also when the weights arrive in bf16 (FSDP2's mixed precision), as
    autocast does on GPUs; with fp32 weights it is nn.LayerNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = (lambda t: None if t is None else t.to(x.dtype))
        return F.layer_norm(x, self.normalized_shape, cast(self.weight), cast(self.bias), self.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, qkv_dim: int, head_dim: int, bias: bool):
        super().__init__()
        self.heads = qkv_dim // head_dim
        self.qkv = nn.Linear(dim, 3 * qkv_dim, bias=bias)
        self.proj = nn.Linear(qkv_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, hd]
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(B, T, -1))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, qkv_dim: int, head_dim: int, bias: bool, y_dim: Optional[int] = None):
        super().__init__()
        self.heads = qkv_dim // head_dim
        self.q = nn.Linear(dim, qkv_dim, bias=bias)
        self.kv = nn.Linear(y_dim or dim, 2 * qkv_dim, bias=bias)
        self.proj = nn.Linear(qkv_dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        L = y.shape[1]
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)                   # [B, H, T, hd]
        k, v = self.kv(y).view(B, L, 2, self.heads, -1).permute(2, 0, 3, 1, 4)      # 2 x [B, H, L, hd]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=y_mask[:, None, None, :])
        return self.proj(o.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ExpertChoiceFFN(nn.Module):
    """E GELU FFN experts; expert e processes the k tokens of each sample with the highest
    router probability for e, and their outputs are added back weighted by that probability.
    A token may be chosen by several experts or by none (then the residual carries it).

    The expert weights are stored flat, expert-major: w1 [E*dim, hidden] is the E matrices [dim, hidden]
    stacked (w2 [E*hidden, dim], b1 [E*hidden], b2 [E*dim]). A sharder that splits dim 0 over the ranks
    (FSDP2) then splits E*dim rows, which divides evenly by 8, 16, 32... ranks for usual widths; a dim 0 of
    E = 8 experts would pad every rank beyond the 8th to a whole expert (4x the traffic on 32 ranks).
    Checkpoints with the older [E, dim, hidden] layout load into this one."""

    def __init__(self, dim: int, hidden: int, num_experts: int, capacity: float, bias: bool):
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity
        self.dim, self.hidden = dim, hidden
        E = num_experts
        self.gate = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E * dim, hidden))
        self.w2 = nn.Parameter(torch.empty(E * hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(E * hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(E * dim)) if bias else None
        for w in (self.w1, self.w2):
            nn.init.normal_(w, std=0.02)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("w1", "w2", "b1", "b2"):    # the older per-expert layout [E, ...] -> flat
            t = state_dict.get(prefix + name)
            p = getattr(self, name)
            if t is not None and p is not None and t.dim() != p.dim() and t.numel() == p.numel():
                state_dict[prefix + name] = t.reshape(p.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def experts(self):
        """Per-expert views: w1 [E, dim, hidden], b1 [E, 1, hidden] or None, w2 [E, hidden, dim], b2 [E, 1, dim] or None."""
        E, D, H = self.num_experts, self.dim, self.hidden
        view = (lambda t, *shape: None if t is None else t.view(*shape))
        return view(self.w1, E, D, H), view(self.b1, E, 1, H), view(self.w2, E, H, D), view(self.b2, E, 1, D)

    def tokens_per_expert(self, tokens: int) -> int:
        return max(1, min(tokens, int(self.capacity * tokens / self.num_experts)))

    def route(self, x: torch.Tensor):
        """x [B, T, D] -> gates [B, E, k] (router probabilities) and token indices [B, E, k]."""
        k = self.tokens_per_expert(x.shape[1])
        probs = self.gate(x).to(torch.promote_types(x.dtype, torch.float32)).softmax(dim=-1)                    # [B, T, E]: softmax over experts
        gates, idx = probs.transpose(1, 2).topk(k, dim=-1)              # expert e picks its top-k tokens
        return gates, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        E = self.num_experts
        gates, idx = self.route(x)                                      # [B, E, k]
        k = idx.shape[-1]
        # Flat token ids in expert-major order, so each expert's tokens are one contiguous matrix.
        flat = (idx + torch.arange(B, device=x.device).view(B, 1, 1) * T).transpose(0, 1).reshape(-1)  # [E*B*k]
        xe = x.reshape(B * T, D).index_select(0, flat).view(E, B * k, D)  # [E, B*k, D]
        w1, b1, w2, b2 = self.experts()
        h = torch.bmm(xe, w1) if b1 is None else torch.baddbmm(b1, xe, w1)  # [E, B*k, H]
        h = F.gelu(h)
        h = torch.bmm(h, w2) if b2 is None else torch.baddbmm(b2, h, w2)    # [E, B*k, D]
        h = h * gates.transpose(0, 1).reshape(E, B * k, 1).to(h.dtype)
        out = torch.zeros(B * T, D, dtype=h.dtype, device=x.device).index_add_(0, flat, h.reshape(-1, D))
        return out.view(B, T, D)


def _round_width(dim: int, ratio: float, multiple: int) -> int:
    return max(multiple, multiple * round(dim * ratio / multiple))


class DiTBlock(nn.Module):
    """`cond_dim` (default dim): width of the conditioning c and the prompt tokens y, which stay at the
    model width when a patch-mixer block runs narrower."""

    def __init__(self, dim: int, qkv_dim: int, mlp_hidden: int, head_dim: int, moe: bool,
                 num_experts: int, capacity: float, bias: bool, eps: float, cond_dim: Optional[int] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = SelfAttention(dim, qkv_dim, head_dim, bias)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, qkv_dim, head_dim, bias, cond_dim)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        if moe:
            # Each expert is as wide as the dense FFN would be (as in micro_diffusion); a token is
            # processed by `capacity` experts on average, so active FFN compute is capacity x dense.
            self.mlp = ExpertChoiceFFN(dim, mlp_hidden, num_experts, capacity, bias)
        else:
            self.mlp = FeedForward(dim, mlp_hidden, bias)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))
        nn.init.zeros_(self.adaLN[-1].weight)
        nn.init.zeros_(self.adaLN[-1].bias)

    def forward(self, x, y, y_mask, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # each [B, dim]
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), y, y_mask)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm3(x), shift2, scale2))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, out)
        for lin in (self.adaLN[-1], self.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def sincos_1d(tokens: int, dim: int) -> torch.Tensor:
    pos = torch.arange(tokens, dtype=torch.float32)[:, None]
    freqs = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    pe = torch.zeros(tokens, dim)
    pe[:, 0::2] = torch.sin(pos * freqs)
    pe[:, 1::2] = torch.cos(pos * freqs)[:, : dim // 2]
    return pe


class MoEDiT(Backbone):
    supports_masking = True

    def __init__(self, cfg: MoEDiTConfig, latent_tokens: int = 32, latent_dim: int = 64, prompt_dim: int = 384,
                 null_tokens: int = 1):
        super().__init__(latent_tokens, latent_dim, prompt_dim, null_tokens)
        self.cfg = cfg
        d, k = cfg.dim, cfg.slots_per_token
        if latent_tokens % k:
            raise ValueError(f"moe_dit.slots_per_token: {k} does not divide the latent's {latent_tokens} slots")
        # The tokens the backbone sees and masks: `slots_per_token` consecutive latent slots each.
        self.mask_tokens, token_dim = latent_tokens // k, latent_dim * k
        self.self_conditioning = cfg.self_condition
        self.x_embed = nn.Linear(token_dim * (2 if cfg.self_condition else 1), d)
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(sincos_1d(self.mask_tokens, d).unsqueeze(0))
        else:
            self.register_buffer("pos_embed", sincos_1d(self.mask_tokens, d).unsqueeze(0), persistent=False)
        self.t_embed = NoiseEmbedding(d, cfg.c_noise_scale)
        # An unconditional model (prompt_dim = 0) cross-attends to one learned token instead.
        p_in = prompt_dim if prompt_dim > 0 else d
        self.y_embed = nn.Sequential(nn.Linear(p_in, d), nn.GELU(approximate="tanh"), nn.Linear(d, d), LayerNorm(d))
        if prompt_dim > 0:
            self.pooled_embed = nn.Sequential(nn.Linear(prompt_dim, d), nn.SiLU(), nn.Linear(d, d))
        else:
            self.register_parameter("uncond_token", nn.Parameter(torch.randn(1, 1, d) * 0.02))

        def block(qkv_ratio, mlp_ratio, moe, width=d):
            return DiTBlock(width, _round_width(width, qkv_ratio, cfg.head_dim), _round_width(width, mlp_ratio, 8),
                            cfg.head_dim, moe, cfg.num_experts, cfg.expert_capacity, cfg.use_bias, cfg.norm_eps,
                            cond_dim=d)

        dm = cfg.patch_mixer_dim or d
        self.patch_mixer = nn.ModuleList([block(1.0, cfg.patch_mixer_mlp_ratio, False, dm)
                                          for _ in range(cfg.patch_mixer_depth)])
        if cfg.patch_mixer_depth and dm != d:
            self.mixer_in = nn.Sequential(LayerNorm(d, eps=cfg.norm_eps), nn.Linear(d, dm))
            self.mixer_out = nn.Sequential(LayerNorm(dm, eps=cfg.norm_eps), nn.Linear(dm, d))
        else:
            self.mixer_in = self.mixer_out = None
        qkv, mlp = cfg.per_block(cfg.qkv_ratio), cfg.per_block(cfg.mlp_ratio)
        self.blocks = nn.ModuleList([block(qkv[i], mlp[i], cfg.is_moe(i)) for i in range(cfg.depth)])
        self.mask_token = nn.Parameter(torch.randn(d) * 0.02)
        self.final = FinalLayer(d, token_dim, cfg.norm_eps)

    def forward(self, x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                mask_ratio: float = 0.0, keep_idx: Optional[torch.Tensor] = None,
                self_cond: Optional[torch.Tensor] = None) -> DenoiserOutput:
        """self_cond [B, T, C]: the previous clean-latent estimate, scaled like x (None = zeros, the
        first step); only with `self_condition`."""
        self.check_input(x, mask_ratio, keep_idx)
        B, slots, C = x.shape
        T = self.mask_tokens                                              # DiT tokens: slots_per_token slots each
        group = (lambda t: t.reshape(B, T, -1))                           # [B, slots, C] -> [B, T, k * C]
        if self.self_conditioning:
            x = torch.cat([group(x), group(torch.zeros_like(x) if self_cond is None else self_cond.to(x.dtype))], dim=-1)
        elif self_cond is not None:
            raise ValueError("self_cond given to a MoE DiT built without model.moe_dit.self_condition")
        else:
            x = group(x)
        # The residual stream stays in the input's dtype (fp32) whatever dtype the weights come in (bf16
        # when FSDP2 gathers them so): under autocast only the matmuls run in bf16, as under DDP.
        h = self.x_embed(x).to(x.dtype) + self.pos_embed                  # [B, T, dim]
        c = self.t_embed(c_noise.reshape(-1).expand(B))                   # [B, dim]
        if self.prompt_dim > 0:
            p = self.resolve_prompt(B, prompt_emb, prompt_mask, prompt_pooled)
            # A sample whose prompt has no real token attends to all (padded) positions rather than none.
            # Every position stays, padding included (masked out of cross-attention): a fixed length, so
            # no host read of the mask and the same shapes every batch (torch.compile, CUDA graphs).
            y_mask = p.mask | ~p.mask.any(dim=1, keepdim=True)            # [B, L]
            y = self.y_embed(p.emb.to(h.dtype))                           # [B, L, dim]
            c = c + self.pooled_embed(p.pooled.to(h.dtype))
        else:
            y = self.y_embed(self.uncond_token.expand(B, 1, -1))
            y_mask = torch.ones(B, 1, dtype=torch.bool, device=x.device)

        if self.mixer_in is not None:
            h = h + self.mixer_out(self._mix(self.mixer_in(h), y, y_mask, c))
        else:
            h = self._mix(h, y, y_mask, c)
        if keep_idx is None and mask_ratio > 0:
            keep_idx = masking.random_keep_idx(B, T, mask_ratio, device=x.device)
        if keep_idx is not None:
            h = masking.gather_tokens(h, keep_idx)                        # [B, K, dim]
        for blk in self.blocks:
            h = blk(h, y, y_mask, c)
        keep = None
        if keep_idx is not None:
            h = masking.scatter_tokens(h, keep_idx, self.mask_token, T)   # [B, T, dim]
            keep = masking.keep_mask(keep_idx, T).repeat_interleave(slots // T, dim=1)   # [B, slots]
        return DenoiserOutput(self.final(h, c).reshape(B, slots, C), keep)  # [B, slots, C]

    def _mix(self, h, y, y_mask, c):
        for blk in self.patch_mixer:
            h = blk(h, y, y_mask, c)
        return h
