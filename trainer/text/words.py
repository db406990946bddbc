"""Words as every part of latentverse counts them: lower-cased alphabetic words, syllables."""
from __future__ import annotations

import re

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased alphabetic words (apostrophes kept inside words); punctuation and digits dropped."""
    return WORD.findall(text.lower())


_VOWELS = re.compile(r"[aeiouy]+")


def syllables(word: str) -> int:
    """A vowel-group estimate of a word's syllables (a final silent e dropped), at least 1."""
    n = len(_VOWELS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and n > 1:
        n -= 1
    return max(1, n)
