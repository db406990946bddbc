"""The backbone seam: the call every denoiser in `trainer.models.denoisers` answers, and the two types
that cross it: what the diffusion core (`trainer.diffusion`) and the training, generate and export
code may rely on of a backbone:

    out = backbone(x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                   mask_ratio=0.0, keep_idx=None)

    x              [B, T, C]  noisy latent, already scaled by c_in (T slots of C dims, 32 x 64 by default)
    c_noise        [B]        the noise level as the formulation encodes it (EDM: ln(sigma)/4,
                              DDPM: t / num_train_timesteps); the backbone only embeds it
    prompt_emb     [B, L, D]  prompt token embeddings; None means unconditional (the learned
                              null prompt is used)
    prompt_mask    [B, L]     bool, True = real token; None means all L tokens are real
    prompt_pooled  [B, D]     pooled prompt; None means the masked mean of prompt_emb
    mask_ratio     float      drop this fraction of tokens per sample (MAE-style); only backbones
                              with `supports_masking` accept > 0
    keep_idx       [B, K]     long, precomputed kept token indices (overrides mask_ratio)

    out.sample     [B, T, C]  the raw network output F_theta (EDM) or epsilon (DDPM)
    out.keep       [B, T]     bool, True where the token was seen by the backbone; None when
                              nothing was masked. Masked positions of `sample` carry no
                              information and a loss must ignore them.

    backbone.null_prompt(batch, length=None) -> Prompt  the learned "no prompt" used by
                              classifier-free guidance, both for CFG dropout in training
                              (`guidance.drop_prompt`) and for the unconditional branch in sampling.
    backbone.latent_shape    (T, C);  backbone.prompt_dim  D (0 = unconditional model)

`Prompt(emb, mask, pooled)` bundles the three prompt tensors; `prompt.kwargs()` spreads them into
the call above. `EDMPrecond(backbone, sigma_data)` turns any backbone into the denoiser
D(x; sigma) of Karras et al. (2022) (with a `PromptMean`, the denoiser of the latent's offset from
the prompt's mean latent; it tells the null prompt by `backbone.null_pooled`); `EDMLoss` trains it;
`edm_sampler` samples from it (all in `trainer.diffusion`).
"""
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
