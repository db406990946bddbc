"""Diffusion core: EDM preconditioning and loss, the Heun sampler, guidance, a DDPM baseline.

The backbone seam -- what every denoiser in `trainer.models.denoisers` is, and what everything
here (and the training / generate / export jobs) may rely on:

    out = backbone(x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None,
                   mask_ratio=0.0, keep_idx=None)

    x              [B, T, C]  noisy latent, already scaled by c_in (T=32 slots, C=64 dims)
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
`edm_sampler` samples from it.
Nothing here imports Composer.
"""
from trainer.diffusion.seam import DenoiserOutput, Prompt  # noqa: F401
