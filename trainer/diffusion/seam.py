"""The types that cross the backbone seam (described in trainer/diffusion/__init__.py)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class DenoiserOutput(NamedTuple):
    sample: torch.Tensor                  # [B, T, C]
    keep: Optional[torch.Tensor] = None   # [B, T] bool, True = token seen; None = nothing masked


class Prompt(NamedTuple):
    """A batch of prompt conditioning; any field may be None."""
    emb: Optional[torch.Tensor] = None     # [B, L, D]
    mask: Optional[torch.Tensor] = None    # [B, L] bool, True = real token
    pooled: Optional[torch.Tensor] = None  # [B, D]

    def kwargs(self) -> dict:
        return {"prompt_emb": self.emb, "prompt_mask": self.mask, "prompt_pooled": self.pooled}

    @property
    def is_empty(self) -> bool:
        return self.emb is None and self.pooled is None

    def full_mask(self) -> Optional[torch.Tensor]:
        """The token mask with None made explicit (all tokens real)."""
        if self.emb is None:
            return None
        if self.mask is not None:
            return self.mask.bool()
        return torch.ones(self.emb.shape[:2], dtype=torch.bool, device=self.emb.device)

    def pooled_or_mean(self) -> Optional[torch.Tensor]:
        """prompt_pooled, or the masked mean of the token embeddings when it was not given."""
        if self.pooled is not None:
            return self.pooled
        if self.emb is None:
            return None
        m = self.full_mask().to(self.emb.dtype).unsqueeze(-1)           # [B, L, 1]
        return (self.emb * m).sum(1) / m.sum(1).clamp(min=1.0)          # [B, D]

    def repeat(self, n: int) -> "Prompt":
        """Each sample's prompt repeated n times along the batch (sample-major)."""
        f = (lambda t: None if t is None else t.repeat_interleave(n, dim=0))
        return Prompt(f(self.emb), f(self.mask), f(self.pooled))


def cat_prompts(a: Prompt, b: Prompt) -> Prompt:
    """Concatenate two prompt batches along the batch; token lengths are padded to match."""
    if a.emb is None or b.emb is None:
        if (a.emb is None) != (b.emb is None):
            raise ValueError("cannot concatenate a prompt with token embeddings and one without")
        emb = mask = None
    else:
        la, lb = a.emb.shape[1], b.emb.shape[1]
        L = max(la, lb)
        pad = (lambda t, n: torch.nn.functional.pad(t, (0, 0, 0, L - n)))
        padm = (lambda m, n: torch.nn.functional.pad(m, (0, L - n), value=False))
        emb = torch.cat([pad(a.emb, la), pad(b.emb, lb)])
        mask = torch.cat([padm(a.full_mask(), la), padm(b.full_mask(), lb)])
    if (a.pooled is None) != (b.pooled is None):
        pa, pb = a.pooled_or_mean(), b.pooled_or_mean()
    else:
        pa, pb = a.pooled, b.pooled
    pooled = None if pa is None else torch.cat([pa, pb])
    return Prompt(emb, mask, pooled)
