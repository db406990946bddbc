"""What the generation evaluation scores, behind one seam: a diffusion pipeline's samples, or the
autoregressive baseline's (a prompt-prefixed token LM, trainer/models/poem_lm.py).

Either gives the evaluation `Samples` for its prompts (the poems, and their latents in the space of the
autoencoder that encoded the held-out latents, for the Fréchet distance and the latent classifiers),
the same samples spelt freely, and the decoder that reads draws from the latents' Gaussian, the baseline
beside every figure. The LM's poems are cut to the tokens that autoencoder reads, as the held-out
references are and as a latent holds a pipeline's; it spells freely and is read once, so its `*_free`
and `*_greedy` figures are its samples' own, and it has no denoiser to set against the linear one.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from trainer.evaluation import generation as G
from trainer.evaluation.samples import Samples, Sampling, generate, spelt_freely


class PipelineSource:
    """An exported diffusion pipeline (trainer/pipeline/pipeline.py Pipeline)."""
    kind = "pipeline"

    def __init__(self, pipe):
        self.pipe, self.autoencoder, self.normalizer = pipe, pipe.autoencoder, pipe.normalizer

    def generate(self, prompts: list[str], sampling: Sampling) -> Samples:
        return generate(self.pipe, prompts, sampling)

    def spelt_freely(self, samples: Samples, sampling: Sampling) -> Optional[Samples]:
        """The samples read without the decoder's lexicon; None when it has none (they are spelt freely)."""
        return spelt_freely(self.pipe, samples, sampling) if self.pipe.uses_lexicon() else None

    def decode(self, x, lexicon: Optional[bool] = None) -> list[str]:
        """Diffusion-space latents (the Gaussian draws) -> poems, as the pipeline decodes them."""
        return self.pipe.decode(x.to(self.pipe.device), lexicon)

    def meter_readings(self, override: Optional[int]) -> int:
        return self.pipe.meter_readings(override)

    def uses_lexicon(self) -> bool:
        return self.pipe.uses_lexicon()

    def denoiser_vs_linear(self, gauss, held_latents: np.ndarray, prompts: list[str], seed: int) -> Optional[dict]:
        return G.denoiser_vs_linear(self.pipe, gauss, held_latents, prompts, seed=seed)


class TokenLMSource:
    """A prompt-prefixed causal LM (PoemLM) sampled by `temperature`, `top_p`, `max_new_tokens` and `seed`;
    `decoder`: a decoding-only Pipeline of the autoencoder that encoded the held-out latents."""
    kind = "token_lm"

    def __init__(self, lm, decoder, batch: int = 64):
        self.lm, self.decoder, self.batch = lm, decoder, batch
        self.autoencoder, self.normalizer = decoder.autoencoder, decoder.normalizer

    def generate(self, prompts: list[str], sampling: Sampling) -> Samples:
        import torch

        raw = self.lm(prompts, sampling.samples_per_prompt, sampling.temperature, sampling.top_p,
                      sampling.max_new_tokens, sampling.seed)
        ae = self.autoencoder
        poems = ae.clip_texts(raw)
        with torch.no_grad():
            latents = np.concatenate([ae.encode(poems[i:i + self.batch]).float().cpu().numpy()
                                      for i in range(0, len(poems), self.batch)])
        return Samples(prompts, None, latents, poems, poems)

    def spelt_freely(self, samples: Samples, sampling: Sampling) -> Samples:
        return samples

    def decode(self, x, lexicon: Optional[bool] = None) -> list[str]:
        return self.decoder.decode(x, lexicon)

    def meter_readings(self, override: Optional[int]) -> int:
        return 1

    def uses_lexicon(self) -> bool:
        return False

    def denoiser_vs_linear(self, gauss, held_latents: np.ndarray, prompts: list[str], seed: int) -> Optional[dict]:
        return None
