"""Prompts built from labels: what the diffusion model is conditioned on, so one rule for all sources.

A prompt is the template's parts joined by spaces; a part appears only when every label it names is
set. The form part falls back to `noun` when the form is unknown but another part is present, so
'sonnet about love', 'tanka by Ono no Komachi', 'stanza in iambic pentameter', 'poem about nature'.
A record with no labels gets ''.
"""
from __future__ import annotations

import dataclasses
import string

from trainer.base.schema import LABELS


@dataclasses.dataclass
class PromptConfig:
    # Parts in order; placeholders are label names (title, author, form, topic, meter).
    parts: list[str] = dataclasses.field(
        default_factory=lambda: ["{form}", "about {topic}", "by {author}", "in {meter}"])
    # Said in place of {form} when a record has other labels but no form.
    noun: str = "poem"

    def __post_init__(self):
        for part in self.parts:
            for name in placeholders(part):
                if name not in LABELS:
                    raise ValueError(f"prompt part {part!r}: unknown label {{{name}}}; labels: {', '.join(LABELS)}")


def placeholders(part: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(part) if f]


def build_prompt(labels: dict, cfg: PromptConfig) -> str:
    out = []
    form_missing = False
    for part in cfg.parts:
        names = placeholders(part)
        if all(labels.get(n) for n in names):
            out.append(part.format(**{n: labels[n] for n in names}))
        elif names == ["form"]:
            form_missing = True
            out.append(None)  # placeholder for the fallback noun
    words = [p for p in out if p]
    if not words:
        return ""
    if form_missing:
        out = [cfg.noun if p is None else p for p in out]
    return " ".join(p for p in out if p)
