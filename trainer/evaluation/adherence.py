"""Prompt adherence: does a sample made for a label's value (a form, a meter) show that value?

A logistic-regression classifier of each label is trained on real training latents; its accuracy on
samples generated for each value's most common prompt is reported beside its accuracy on real held-out
latents (the ceiling) and chance. A second classifier asks the same of the decoded poems (character
n-grams and line shape: lines, syllables and words per line), so a decoder that ignores its latent
shows. Beside them, the latent classifier's accuracy on draws from each value's Gaussian (its mean, the
covariance pooled within values): what a model reaches that has learnt how the label moves the latents'
mean and no more. With a meter, the samples' scansion in their meter (trainer.text.prosody.scansion)
beside the real held-out poems'; every text figure is also given for the greedy reading (`*_greedy`)
and, where the decoder has a lexicon, for the poems spelt without it (`*_free`).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Optional

import numpy as np

from trainer.evaluation import metrics as M
from trainer.evaluation.samples import Samples, Sampling
from trainer.text.prosody import meter_templates, scansion


@dataclasses.dataclass
class Classifiers:
    """The label's most common values and the two classifiers trained on the training poems of those values."""
    values: list[str]
    latent: M.LabelClassifier
    text: M.TextLabelClassifier


@dataclasses.dataclass
class HeldOut:
    """The real held-out poems of the label's values, asked once by both classifiers."""
    labels: list[str]
    texts: list[str]
    latent_predictions: list[str]
    text_predictions: list[str]

    def accuracy(self, predictions: list[str], value: Optional[str] = None) -> float:
        """Share of the poems (of `value`, or all of them) predicted as their label."""
        return float(np.mean([p == y for p, y in zip(predictions, self.labels) if value in (None, y)]))


def label_adherence(source, label: str, train: dict, held: dict, train_texts: list[str], held_texts: list[str],
                    sampling: Sampling, n_values: int) -> dict:
    """The adherence figures of one label (`source`: a pipeline or a token LM, trainer/evaluation/sources.py;
    `train`, `held`: read_latent_split's; `*_texts`: their poems cut to the tokens the encoder reads);
    samples made for each value's most common training prompt."""
    values = M.most_common(train[label], n_values)
    if len(values) < 2:
        return {"skipped": f"fewer than 2 values of {label!r} in the training latents"}
    rows = [i for i, v in enumerate(train[label]) if v in values]
    labels = [train[label][i] for i in rows]
    classifiers = Classifiers(values, M.LabelClassifier(train["latent"][rows], labels, seed=sampling.seed),
                              M.TextLabelClassifier([train_texts[i] for i in rows], labels, seed=sampling.seed))
    real = held_out_answers(held, held_texts, label, classifiers)
    samples = source.generate(value_prompts(train, label, values), sampling)
    free = source.spelt_freely(samples, sampling)
    predictions = sample_predictions(classifiers, samples, free)
    draws = M.conditional_gaussian_draws(train["latent"][rows], labels, values, sampling.samples_per_prompt,
                                         sampling.seed)
    per_value = {v: value_figures(j, v, label, samples, predictions, classifiers.latent.predict(draws[v]), real)
                 | {"samples": value_readings(j, samples, free)} for j, v in enumerate(values)}
    return label_summary(per_value, real, len(values), free is not None)


def value_prompts(train: dict, label: str, values: list[str]) -> list[str]:
    """Each value's most common prompt among the training poems (the value itself where none has one)."""
    prompts = []
    for v in values:
        candidates = Counter(p for p, lv in zip(train["prompt"], train[label]) if lv == v and p)
        prompts.append(candidates.most_common(1)[0][0] if candidates else v)
    return prompts


def held_out_answers(held: dict, held_texts: list[str], label: str, classifiers: Classifiers) -> HeldOut:
    rows = [i for i, v in enumerate(held[label]) if v in classifiers.values]
    texts = [held_texts[i] for i in rows]
    return HeldOut([held[label][i] for i in rows], texts,
                   classifiers.latent.predict(held["latent"][rows]) if rows else [],
                   classifiers.text.predict(texts) if rows else [])


def sample_predictions(classifiers: Classifiers, samples: Samples, free: Optional[Samples]) -> dict[str, list[str]]:
    """{per-value figure name: the label predicted for each sample}: the latents by the latent classifier,
    the poems (as read, read greedily, and spelt freely where given) by the text classifier."""
    text = classifiers.text.predict(samples.poems)
    out = {"accuracy": classifiers.latent.predict(samples.latents), "text_accuracy": text,
           "text_accuracy_greedy": text if samples.greedy is samples.poems else classifiers.text.predict(samples.greedy)}
    if free is not None:
        free_text = classifiers.text.predict(free.poems)
        out["text_accuracy_free"] = free_text
        out["text_accuracy_free_greedy"] = free_text if free.greedy is free.poems else classifiers.text.predict(free.greedy)
    return out


def value_readings(j: int, samples: Samples, free: Optional[Samples]) -> list[dict]:
    """The j-th value's samples as its figures read them (Samples.records' rows, without the prompt)."""
    return [{k: v for k, v in row.items() if k != "prompt"} for row in samples.of_prompt(j, samples.records(free))]


def value_figures(j: int, value: str, label: str, samples: Samples, predictions: dict[str, list[str]],
                  draw_predictions: list[str], real: HeldOut) -> dict:
    """The figures of the j-th value: the share of its samples predicted as it, under each name of
    `predictions`; the same share of its label-conditional Gaussian draws; for a meter, the samples'
    scansion; and the real held-out poems of this value asked the same question (the samples' reference)."""
    out = {"prompt": samples.prompts[j], "conditional_gaussian_accuracy": _share(draw_predictions, value)}
    out.update({name: _share(samples.of_prompt(j, predicted), value) for name, predicted in predictions.items()})
    if label == "meter" and meter_templates(value):   # the lines' stresses against the meter's patterns
        out.update(scansion=_scansion(samples.of_prompt(j, samples.poems), value),
                   scansion_greedy=_scansion(samples.of_prompt(j, samples.greedy), value),
                   real_held_out_scansion=_scansion([t for t, y in zip(real.texts, real.labels) if y == value], value))
    n_real = real.labels.count(value)
    if n_real:
        out.update(real_held_out_accuracy=real.accuracy(real.latent_predictions, value),
                   real_held_out_text_accuracy=real.accuracy(real.text_predictions, value), n_real_held_out=n_real)
    return out


def label_summary(per_value: dict[str, dict], real: HeldOut, n_values: int, free_spelling: bool) -> dict:
    """The samples' figures averaged over the values alike, as is the balanced figure of the real
    held-out poems (real_held_out_accuracy weighs the values by their share of the held-out poems)."""
    def over_values(key: str) -> Optional[float]:
        figures = [d[key] for d in per_value.values() if key in d]
        return float(np.mean(figures)) if figures else None

    text = {"accuracy": over_values("text_accuracy"), "accuracy_greedy": over_values("text_accuracy_greedy"),
            "real_held_out_accuracy": real.accuracy(real.text_predictions) if real.labels else None,
            "real_held_out_balanced_accuracy": over_values("real_held_out_text_accuracy")}
    if free_spelling:
        text.update(accuracy_free=over_values("text_accuracy_free"),
                    accuracy_free_greedy=over_values("text_accuracy_free_greedy"))
    return {"accuracy": over_values("accuracy"),
            "real_held_out_accuracy": real.accuracy(real.latent_predictions) if real.labels else None,
            "real_held_out_balanced_accuracy": over_values("real_held_out_accuracy"),
            "chance": 1.0 / n_values, "per_value": per_value,
            "conditional_gaussian_accuracy": over_values("conditional_gaussian_accuracy"),
            "text": text}   # the same question asked of the decoded poems (character n-grams and line shape)


def _share(predictions: list[str], value: str) -> float:
    return float(np.mean([p == value for p in predictions]))


def _scansion(texts: list[str], meter: str) -> Optional[float]:
    return float(np.mean([scansion(t, meter) for t in texts])) if texts else None
