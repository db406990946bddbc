"""Generation metrics, each a plain function with a known answer on hand-made inputs.

Fréchet distance (Heusel et al., 2017) between Gaussians fitted to two feature sets; distinct-n
(Li et al., 2016); n-gram memorisation against a training set; word validity against a vocabulary;
prompt adherence from a small label classifier on latents; MAUVE (Pillutla et al., 2021) if the
`mauve-text` package is importable.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Optional

import numpy as np

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased alphabetic words (apostrophes kept inside words); punctuation and digits dropped."""
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for rows of a [N, d] and b [M, d]."""
    from scipy import linalg

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s_a @ s_b, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise, as the FID reference does
        eps = np.eye(s_a.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    covmean = covmean.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


class PCAFeatures:
    """Latents [N, T, C] -> the top-k principal components of the flattened latents, fitted on a
    reference set (T*C = 2048 dims is too many for a covariance from a few hundred samples)."""

    def __init__(self, reference: np.ndarray, k: int = 32):
        x = reference.reshape(len(reference), -1).astype(np.float64)
        self.mean = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        self.components = vt[: min(k, len(vt))]

    def __call__(self, latents: np.ndarray) -> np.ndarray:
        x = latents.reshape(len(latents), -1).astype(np.float64)
        return (x - self.mean) @ self.components.T


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set (0 when there are none)."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def ngram_set(texts: Iterable[str], n: int = 4) -> set:
    return {g for t in texts for g in ngrams(words(t), n)}


def memorisation(texts: Iterable[str], train_ngrams: set, n: int = 4) -> float:
    """Share of the texts' n-grams (with repeats) that occur in the training set."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return sum(g in train_ngrams for g in grams) / len(grams) if grams else 0.0


def word_validity(texts: Iterable[str], vocabulary: set) -> float:
    """Share of the texts' words (with repeats) found in the corpus vocabulary."""
    ws = [w for t in texts for w in words(t)]
    return sum(w in vocabulary for w in ws) / len(ws) if ws else 0.0


def vocabulary(texts: Iterable[str]) -> set:
    return {w for t in texts for w in words(t)}


class LabelClassifier:
    """Logistic regression on latent features: which form (or meter) a latent is of."""

    def __init__(self, latents: np.ndarray, labels: list[str], seed: int = 0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = latents.reshape(len(latents), -1)
        self.scaler = StandardScaler().fit(x)
        self.clf = LogisticRegression(max_iter=2000, C=0.5, random_state=seed).fit(self.scaler.transform(x), labels)
        self.classes = list(self.clf.classes_)

    def predict(self, latents: np.ndarray) -> list[str]:
        return list(self.clf.predict(self.scaler.transform(latents.reshape(len(latents), -1))))

    def accuracy(self, latents: np.ndarray, labels: list[str]) -> float:
        pred = self.predict(latents)
        return float(np.mean([p == y for p, y in zip(pred, labels)])) if labels else 0.0


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 0) -> Optional[float]:
    """MAUVE between two feature sets, or None when the mauve-text package is not importable."""
    try:
        import mauve
    except Exception:
        return None
    n = min(len(p_features), len(q_features))
    out = mauve.compute_mauve(p_features=np.asarray(p_features[:n]), q_features=np.asarray(q_features[:n]),
                              num_buckets=max(2, n // 10), seed=seed, verbose=False, device_id=-1)
    return float(out.mauve)


def most_common(values: Iterable[str], k: int) -> list[str]:
    return [v for v, _ in Counter(v for v in values if v).most_common(k)]
