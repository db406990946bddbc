"""Each generation metric on hand-made inputs with known answers."""
import numpy as np
import pytest

from trainer.evaluation import metrics as M
from trainer.text import prosody, words as W


def test_words_and_ngrams():
    assert W.words("O, Rose! thou art sick.\nThe invisible worm's 2 ways") == \
        ["o", "rose", "thou", "art", "sick", "the", "invisible", "worm's", "ways"]
    assert M.ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]


def test_frechet_distance_of_known_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 3))
    # same distribution: ~0; mean shifted by (2, 0, 0): ~4; std doubled in every dim: 3 * (2 - 1)^2 = 3
    assert M.frechet_distance(a, rng.normal(size=(20000, 3))) < 0.01
    assert M.frechet_distance(a, rng.normal(size=(20000, 3)) + [2, 0, 0]) == pytest.approx(4.0, abs=0.1)
    assert M.frechet_distance(a, 2 * rng.normal(size=(20000, 3))) == pytest.approx(3.0, abs=0.1)


def test_pca_features_keep_the_dominant_direction():
    rng = np.random.default_rng(0)
    x = np.zeros((500, 2, 2))
    x[:, 0, 0] = rng.normal(size=500) * 10
    x[:, 1, 1] = rng.normal(size=500) * 0.1
    f = M.PCAFeatures(x, k=1)
    assert abs(abs(f.components[0, 0]) - 1) < 1e-6
    assert f(x).shape == (500, 1)


def test_distinct_n():
    assert M.distinct_n(["a b a b"], 1) == 0.5          # 2 distinct of 4
    assert M.distinct_n(["a b a b"], 2) == 2 / 3        # (a b), (b a), (a b)
    assert M.distinct_n(["a b", "c d"], 2) == 1.0
    assert M.distinct_n(["a"], 2) == 0.0


def test_memorisation_and_validity():
    train = M.ngram_set(["the cat sat on the mat"], 4)
    # generated 4-grams: (the cat sat on) in train, (cat sat on a) not -> 1/2
    assert M.memorisation(["the cat sat on a"], train, 4) == 0.5
    assert M.memorisation(["too short"], train, 4) == 0.0
    vocab = M.vocabulary(["the cat sat"])
    assert M.word_validity(["the dog sat", "cat"], vocab) == 0.75


def test_label_classifier_separates_separable_latents():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4, 4))
    y = ["sonnet" if v > 0 else "tanka" for v in x[:, 0, 0]]
    clf = M.LabelClassifier(x, y)
    assert clf.accuracy(x, y) > 0.95
    assert clf.accuracy(x, ["tanka" if v == "sonnet" else "sonnet" for v in y]) < 0.05


def test_syllable_estimate_and_text_shape():
    assert [W.syllables(w) for w in ("the", "love", "summer", "beautiful", "table", "free")] == [1, 1, 2, 3, 2, 1]
    n_lines, mean_syl, _, mean_words, first, second, *meter = M.text_shape("Shall I compare thee\nto a summer's day")
    assert (n_lines, first, second, mean_words) == (2, 5, 5, 4.0) and mean_syl == 5.0
    assert len(meter) == 7 + 4 + 4


def test_line_stresses_tell_iambs_from_trochees():
    # the dictionary's stresses; one-syllable function words weak; a word it lacks stressed first
    assert prosody.line_stresses("Shall I compare thee to a summer's day") == "1001100101"
    assert prosody.line_stresses("Tell me not in mournful numbers") == "10101010"
    assert prosody.line_stresses("the zorblatt") == "010"
    iambic = "The curfew tolls the knell of parting day"
    trochaic = "Tell me not in mournful numbers"
    assert prosody.line_meter(iambic)[3] < -0.5 < 0.5 < prosody.line_meter(trochaic)[3]   # odd - even stressed


def test_prompt_meter_and_scansion():
    assert prosody.prompt_meter("Stanza in Iambic  Pentameter, about the sea") == "iambic pentameter"
    assert prosody.prompt_meter("sonnet by William Shakespeare") == "" == prosody.prompt_meter("iambic verse")
    gray = "The curfew tolls the knell of parting day"            # 0101010101: every syllable fits
    assert prosody.scansion(gray, "iambic pentameter") == 1.0
    assert prosody.scansion(gray, "trochaic pentameter") == 0.0                # every syllable against it
    # too short a line loses the syllables it lacks: 6 of 10 positions agree
    assert prosody.scansion("the knell of parting day", "iambic pentameter") == pytest.approx(0.6)
    # the mean over lines; blank lines are skipped; a meter without a pattern has no scansion
    hia = "Tell me not, in mournful numbers"                        # 10101010: trochaic tetrameter
    assert prosody.scansion(f"{gray}\n\n{hia}", "trochaic tetrameter") == pytest.approx((prosody.scansion(gray, "trochaic tetrameter") + 1.0) / 2)
    assert prosody.scansion(gray, "free verse") is None and prosody.scansion("", "iambic pentameter") == 0.0


def test_text_label_classifier_reads_line_shape_and_words():
    rng = np.random.default_rng(0)
    words = ["moon", "river", "autumn", "blossom", "wind", "silver", "mountain", "dew"]
    def poem(n_lines):
        return "\n".join(" ".join(rng.choice(words, size=3)) for _ in range(n_lines))
    texts = [poem(5) for _ in range(60)] + [poem(2) for _ in range(60)]
    labels = ["tanka"] * 60 + ["stanza"] * 60
    clf = M.TextLabelClassifier(texts, labels)
    test = [poem(5) for _ in range(20)] + [poem(2) for _ in range(20)]
    assert clf.accuracy(test, ["tanka"] * 20 + ["stanza"] * 20) > 0.95      # same words: the line shape decides
    assert clf.accuracy(test, ["stanza"] * 20 + ["tanka"] * 20) < 0.05


def test_mauve_same_vs_different_distributions():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    far = rng.normal(size=(200, 8)) + 3
    same, diff = M.mauve_score(a, b), M.mauve_score(a, far)
    assert same is not None, "mauve-text (extra `eval`, in requirements.lock, which CI installs) is not importable"
    assert same > 0.8 and diff < 0.2


def test_mauve_is_none_only_without_the_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mauve", None)           # `import mauve` raises ImportError
    assert M.mauve_score(np.zeros((20, 4)), np.ones((20, 4))) is None


def test_gaussian_latents_wiener_filter_and_draws_match_the_closed_form():
    import torch

    rng = np.random.default_rng(0)
    cov = np.array([[4.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 0.25]])
    mean = np.array([1.0, -2.0, 0.5])
    x = rng.multivariate_normal(mean, cov, size=40000).reshape(-1, 1, 3)
    g = M.GaussianLatents(x)
    y = torch.tensor([[[3.0, 0.0, 1.0]]])
    expected = mean + cov @ np.linalg.solve(cov + 0.5 ** 2 * np.eye(3), y.numpy().ravel() - mean)
    assert np.allclose(g.wiener(y, 0.5).numpy().ravel(), expected, atol=0.05)
    draws = g.sample(20000, seed=1).numpy().reshape(-1, 3)
    assert np.allclose(draws.mean(0), mean, atol=0.05) and np.allclose(np.cov(draws.T), cov, atol=0.1)
    scaled = M.GaussianLatents(x, normalize=lambda z: z * 2)       # fitted in the normalised space
    assert np.allclose(scaled.sample(20000, seed=1).numpy().reshape(-1, 3).mean(0), 2 * mean, atol=0.1)


def test_conditional_gaussian_draws_have_each_values_mean_and_the_pooled_covariance():
    rng = np.random.default_rng(0)
    cov = np.array([[1.0, 0.5], [0.5, 2.0]])
    means = {"a": np.array([0.0, 0.0]), "b": np.array([3.0, -1.0])}
    labels = ["a"] * 6000 + ["b"] * 2000
    x = np.concatenate([rng.multivariate_normal(means[v], cov, size=labels.count(v)) for v in ("a", "b")])
    draws = M.conditional_gaussian_draws(x.reshape(-1, 1, 2), labels, ["a", "b"], 20000, seed=1)
    for v in ("a", "b"):
        d = draws[v].reshape(-1, 2)
        assert draws[v].shape == (20000, 1, 2)
        assert np.allclose(d.mean(0), means[v], atol=0.05)
        assert np.allclose(np.cov(d.T), cov, atol=0.1)     # within a value, not the total covariance
    # A latent classifier tells the draws apart as it tells the real latents; values with one mean: chance.
    clf = M.LabelClassifier(x.reshape(-1, 1, 2), labels)
    assert clf.accuracy(draws["b"][:2000], ["b"] * 2000) > 0.9
    same = M.conditional_gaussian_draws(rng.multivariate_normal([0, 0], cov, size=8000).reshape(-1, 1, 2),
                                        labels, ["a", "b"], 2000, seed=2)
    flat = M.LabelClassifier(np.concatenate([same["a"], same["b"]]), ["a"] * 2000 + ["b"] * 2000)
    assert 0.4 < flat.accuracy(np.concatenate([same["a"], same["b"]]), ["a"] * 2000 + ["b"] * 2000) < 0.6
