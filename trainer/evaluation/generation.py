"""The generation evaluation's metric families, one function each (prompt adherence: adherence.py).

  fidelity     Fréchet distance between generated and real held-out latents (top-k PCA features of
               the flattened latents, fitted on training latents), beside the real-vs-real
               baseline: the same distance between two disjoint real sets of the same size.
  diversity    distinct-n (n = 1..4) of the samples beside the held-out set's own.
  memorisation share of generated 4-grams found in the training texts, beside the held-out set's own.
  validity     share of generated words found in the training vocabulary.
  (Every held-out reference text is cut to the tokens the latent encoder reads, as the samples are.)
  MAUVE        over MiniLM sentence features of generated vs held-out poems (mauve-text).
  linear check the denoiser's error on noised held-out latents beside the best linear denoiser's: how
               much beyond the latents' mean and covariance it has learnt; and word validity and MAUVE
               of decoded draws from that Gaussian, the baseline the samples have to beat.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from trainer.data.mds import spread_indices
from trainer.evaluation import metrics as M
from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder


def spread(rows, n: int):
    """`n` of `rows` evenly spaced over them (trainer/data/mds.py's spread_indices): the first or last n
    rows of a split the encode job partitioned are one form only."""
    idx = spread_indices(len(rows), n)
    return rows[idx] if isinstance(rows, np.ndarray) else [rows[i] for i in idx]


def frechet(train_latents: np.ndarray, held_latents: np.ndarray, generated: np.ndarray, pca_dims: int) -> dict:
    """Fréchet distance of the samples to as many held-out latents, beside that of as many training
    latents to the same held-out ones (both sets spread over their splits), in PCA-`pca_dims` space
    fitted on training latents."""
    features = M.PCAFeatures(train_latents, pca_dims)
    n = len(generated)
    real_a, real_b = spread(held_latents, n), spread(train_latents, n)
    out = {"generated_vs_real": M.frechet_distance(features(generated), features(real_a)),
           "real_vs_real": M.frechet_distance(features(real_b), features(real_a)),
           "n": int(min(n, len(real_a))), "pca_dims": int(features.components.shape[0])}
    out["ratio"] = out["generated_vs_real"] / max(out["real_vs_real"], 1e-12)
    return out


def denoiser_vs_linear(pipe, gauss: M.GaussianLatents, held_latents: np.ndarray, prompts: list[str],
                       sigmas=(0.2, 0.4, 0.8, 1.5), seed: int = 0) -> dict:
    """Per noise level: mean squared error (diffusion space) of the pipeline's denoiser on noised
    held-out latents with their own prompts, beside the best linear denoiser's (the Wiener filter of
    the training latents' Gaussian: the exact posterior mean if latents were Gaussian) and the noisy
    input's. A denoiser no better than the linear one knows only the latents' mean and covariance,
    and samples from it are draws from that Gaussian."""
    import torch

    from trainer.diffusion.linear import errors_vs_linear

    x0 = gauss.norm(held_latents)
    prompt = pipe.encode_prompts(list(prompts))
    noise = torch.Generator().manual_seed(seed)
    out = {}
    with torch.no_grad():
        for sigma in sigmas:
            e = errors_vs_linear(lambda x: pipe.net(x.to(pipe.device), torch.tensor(float(sigma)), prompt).sample.cpu(),
                                 gauss.linear, x0, sigma, noise)
            out[str(sigma)] = {k: float(v.mean()) for k, v in e.items()}
    return out


def distinct(generated: list[str], real: list[str]) -> dict:
    return {f"distinct_{n}": {"generated": M.distinct_n(generated, n), "real": M.distinct_n(real, n)}
            for n in (1, 2, 3, 4)}


def memorisation_4gram(generated: list[str], held_out: list[str], train_texts: list[str]) -> dict:
    train_grams = M.ngram_set(train_texts, 4)
    return {"generated": M.memorisation(generated, train_grams, 4),
            "held_out": M.memorisation(held_out, train_grams, 4)}


def word_validity(vocabulary: set, **poems: list[str]) -> dict:
    """{name: share of the poems' words in the vocabulary} for each named set of poems."""
    return {name: M.word_validity(texts, vocabulary) for name, texts in poems.items()}


def mauve(real: list[str], generated: list[str], gaussian_draws: list[str], free: Optional[list[str]] = None,
          greedy: Optional[list[str]] = None, seed: int = 0) -> dict:
    """MAUVE of the samples against the real poems over MiniLM sentence features, beside that of the
    Gaussian draws, and of the samples spelt freely and read greedily where given (a list given twice,
    as the greedy readings that are the samples themselves, is scored once)."""
    encoder = build_prompt_encoder(PromptEncoderConfig(max_length=128))

    def sentence_features(texts: list[str]) -> np.ndarray:
        return np.concatenate([encoder(texts[i:i + 64])[2].numpy() for i in range(0, len(texts), 64)])

    real_features = sentence_features(real)
    scores: dict[int, Optional[float]] = {}

    def score(texts: list[str]) -> Optional[float]:
        if id(texts) not in scores:
            scores[id(texts)] = M.mauve_score(sentence_features(texts), real_features, seed=seed)
        return scores[id(texts)]

    generated_score = score(generated)
    out = {"mauve": generated_score if generated_score is not None else "mauve-text is not importable here",
           "mauve_gaussian_draws": score(gaussian_draws)}
    if free is not None:
        out["mauve_free"] = score(free)
    if greedy is not None:
        out["mauve_greedy"] = score(greedy)
    return out
