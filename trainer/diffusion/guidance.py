"""Classifier-free guidance (Ho & Salimans, 2022): train with some prompts replaced by the learned
null prompt, sample with D = D_uncond + w (D_cond - D_uncond)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from trainer.models.denoisers.interface import Prompt, cat_prompts


def drop_prompt(prompt: Prompt, null: Prompt, p: float, generator: Optional[torch.Generator] = None) -> Prompt:
    """CFG dropout: each sample's prompt becomes the null prompt with probability p.

    `null` comes from `denoiser.null_prompt(batch, length=L)` so its shapes match the batch."""
    if p <= 0 or prompt.is_empty:
        return prompt
    if prompt.emb is not None and (null.emb is None or null.emb.shape != prompt.emb.shape):
        raise ValueError(f"null prompt shape {None if null.emb is None else list(null.emb.shape)} does not match "
                         f"the prompt {list(prompt.emb.shape)}; build it with null_prompt(batch, length=L)")
    ref = prompt.emb if prompt.emb is not None else prompt.pooled
    drop = torch.rand(ref.shape[0], device=ref.device, generator=generator) < p      # [B]
    pick = (lambda c, u, d: None if c is None else torch.where(d, u.to(c.dtype), c))
    emb = pick(prompt.emb, null.emb, drop.view(-1, 1, 1))
    mask = None
    if prompt.emb is not None:
        mask = torch.where(drop.view(-1, 1), null.full_mask(), prompt.full_mask())
    # The pooled prompt is made explicit so a dropped sample sees the learned null pooled vector,
    # exactly as the unconditional branch does at sampling time (cat_prompts).
    pooled = prompt.pooled_or_mean() if null.pooled is not None else prompt.pooled
    if pooled is not None:
        pooled = pick(pooled, null.pooled, drop.view(-1, 1))
    return Prompt(emb, mask, pooled)


def guided_denoise(call: Callable[[torch.Tensor, torch.Tensor, Optional[Prompt]], torch.Tensor],
                   null_prompt: Callable[[int, Optional[int]], Prompt],
                   x: torch.Tensor, sigma: torch.Tensor, prompt: Optional[Prompt], scale: float) -> torch.Tensor:
    """One guided denoiser evaluation; cond and uncond go through the model as one 2B batch.

    call(x, sigma_or_t, prompt) -> [B, T, C] prediction (denoised x for EDM, epsilon for DDPM)."""
    if scale == 1.0 or prompt is None or prompt.is_empty:
        return call(x, sigma, prompt)
    B = x.shape[0]
    L = prompt.emb.shape[1] if prompt.emb is not None else None
    both = cat_prompts(prompt, null_prompt(B, L))
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(B)
    out = call(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
    cond, uncond = out.chunk(2)
    return uncond + scale * (cond - uncond)
