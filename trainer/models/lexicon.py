"""Decoding that spells only words of the training corpus (lexically constrained decoding).

A latent the diffusion model samples can sit between the latents of real poems; the decoder then
blends sub-word pieces into words no poem has ("omhes-ves"). `Lexicon` holds the corpus's words and
their prefixes; `LexiconLogitsProcessor` lets the decoder (greedy or beam search) choose, at every
step, only tokens that keep the text spelt in that lexicon: a token that ends a word must end a
lexicon word, a token that leaves a word open must leave a prefix of one. Punctuation, digits, line
breaks and non-Latin letters are free; control characters are not allowed. What counts as a word is
`trainer.text.words.words`: lower-cased runs of a-z with at most one inner apostrophe ("o'er").

The tokenizers here are byte-level BPEs with every single byte in the vocabulary, so any prefix of
a lexicon word can always be continued: the constraint never leaves the decoder without a choice.
"""
from __future__ import annotations

import os
from collections import Counter
from typing import Iterable, Optional

import torch
from transformers import LogitsProcessor
from trainer.base.config import UserError
from trainer.text.words import WORD, words
LEXICON_NAME = "lexicon.txt"
_LETTER = frozenset("abcdefghijklmnopqrstuvwxyz")


class Lexicon:
    """A set of lower-cased words (as `trainer.text.words.words` splits text) and all their prefixes."""

    def __init__(self, words: Iterable[str]):
        self.words = frozenset(w for w in words if WORD.fullmatch(w))
        self.prefixes = frozenset(w[:i] for w in self.words for i in range(1, len(w) + 1))

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1) -> "Lexicon":
        """The words seen at least `min_count` times in the texts."""
        counts = Counter(w for t in texts for w in words(t))
        return cls(w for w, c in counts.items() if c >= min_count)

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, LEXICON_NAME), "w", encoding="utf-8") as f:
            f.write("\n".join(sorted(self.words)) + "\n")

    @classmethod
    def load(cls, directory: str) -> Optional["Lexicon"]:
        """The lexicon saved in a directory, or None when it has none."""
        path = os.path.join(directory, LEXICON_NAME)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            ws = [line.strip() for line in f if line.strip()]
        if not ws:
            raise UserError(f"{path}: the lexicon is empty")
        return cls(ws)

    def close(self, text: str) -> str:
        """The text without a word left unfinished at its end (generation stopped inside it)."""
        p = self.step("", text)
        return text[:len(text) - len(p)] if p and not self.ends(p) else text

    # ---- the spelling automaton: state = the open (unfinished) word as written, "" between words ----

    def ends(self, open_word: str) -> bool:
        """Can the open word end here (at a non-letter, or the end of the text)?"""
        if not open_word:
            return True
        # A trailing apostrophe is a closing quote, not part of the word.
        w = open_word[:-1] if open_word.endswith("'") else open_word
        return w.lower() in self.words

    def step(self, open_word: str, text: str) -> Optional[str]:
        """The open word after appending `text`, or None if that misspells a word. Case is part of the
        spelling: a word is written small, Capitalised or in CAPITALS ("the", "The", "THE"; not "tHe",
        "THe")."""
        p, prefixes = open_word, self.prefixes
        for c in text:
            low = c.lower()
            if low in _LETTER:
                if c != low:
                    if p and not p.replace("'", "").isupper():  # a capital after a small letter
                        return None
                elif len(p) > 1 and p[1].isupper():  # a small letter after two capitals
                    return None
                p += c
                if p.lower() not in prefixes:
                    return None
            elif c == "'" and p and "'" not in p:
                # Either an inner apostrophe (o'er) or a closing quote (the word ends before it).
                if (p + "'").lower() not in prefixes and p.lower() not in self.words:
                    return None
                p += "'"
            else:
                if not self.ends(p):
                    return None
                p = ""
        return p


class LexiconLogitsProcessor(LogitsProcessor):
    """A transformers logits processor: -inf for every token that would misspell a word.

    `prefix_len`: how many leading ids of each row are not text (the decoder start token).
    `max_length`: the generation's max_length; at the last step only tokens that end a word (or leave
    none open) are allowed, so a cut-off poem does not end on half a word (when no token can end it,
    only </s>; decode then drops the unfinished word with `Lexicon.close`).

    Speed: the allowed tokens depend only on the open word, so their mask is cached per open word
    (up to `cache_size`); tokens that begin at a word boundary (" the", ",\n") are allowed or not as a
    block, worked out once; the others are ruled out by their first character where it misspells;
    each row's open word is carried over from the row one token shorter.
    """

    def __init__(self, lexicon: Lexicon, tokenizer, prefix_len: int = 1, max_length: Optional[int] = None,
                 cache_size: int = 16384):
        self.lexicon, self.prefix_len, self.max_length, self.cache_size = lexicon, prefix_len, max_length, cache_size
        n = len(tokenizer)
        self.special = set(tokenizer.all_special_ids)
        self.eos, self.bos = tokenizer.eos_token_id, tokenizer.bos_token_id
        # Each token's text on its own (a lone byte of a multi-byte character decodes to U+FFFD,
        # which is not a letter either way).
        self.pieces = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                       for i in range(n)]
        usable = [i for i in range(n) if i not in self.special  # control characters are no poem's
                  and all(c.isprintable() or c in "\n\t" for c in self.pieces[i])]
        # Tokens that start with a boundary: the open word must end before them, then they spell alike
        # whatever it was.
        starts_word = [i for i in usable if self.pieces[i][:1].lower() in _LETTER or self.pieces[i][:1] == "'"]
        boundary = sorted(set(usable) - set(starts_word))
        after = {i: lexicon.step("", self.pieces[i]) for i in boundary}
        self._boundary_ok = torch.zeros(n, dtype=torch.bool)
        self._boundary_ok[[i for i in boundary if after[i] is not None]] = True
        self._boundary_last = torch.zeros(n, dtype=torch.bool)
        self._boundary_last[[i for i in boundary if after[i] is not None and lexicon.ends(after[i])]] = True
        # Tokens that continue or start a word, by their first character: a first character that
        # misspells rules out all its tokens at once.
        self._word_ids: dict[str, list[int]] = {}
        for i in starts_word:
            self._word_ids.setdefault(self.pieces[i][0], []).append(i)
        self._allowed: dict[tuple[str, bool], torch.Tensor] = {}
        self._open: dict[tuple, str] = {}

    def open_word(self, ids: list[int]) -> str:
        """The open word at the end of a row of ids (memoised on the row's shorter prefixes)."""
        key = tuple(ids)
        p = self._open.get(key)
        if p is None:
            p = self.open_word(ids[:-1]) if ids else ""
            if ids and ids[-1] not in self.special:
                p = self.lexicon.step(p, self.pieces[ids[-1]])
                if p is None:  # a prefix given from outside the constraint: start afresh
                    p = ""
            self._open[key] = p
        return p

    def allowed(self, open_word: str, last: bool) -> torch.Tensor:
        key = (open_word, last)
        mask = self._allowed.get(key)
        if mask is None:
            lx = self.lexicon
            if lx.ends(open_word):
                mask = (self._boundary_last if last else self._boundary_ok).clone()
            else:
                mask = torch.zeros_like(self._boundary_ok)
            ok = []
            for first, ids in self._word_ids.items():
                if lx.step(open_word, first) is None:
                    continue
                for i in ids:
                    q = lx.step(open_word, self.pieces[i])
                    if q is not None and (not last or lx.ends(q)):
                        ok.append(i)
            mask[ok] = True
            if self.eos is not None:
                # At the last step a word may be too long to close in one token: then the poem ends
                # there, and `Lexicon.close` drops the unfinished word from the text.
                mask[self.eos] = lx.ends(open_word) or not mask.any()
            if len(self._allowed) >= self.cache_size:
                self._allowed.clear()
            self._allowed[key] = mask
        return mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] <= self.prefix_len:
            self._open.clear()  # a new generation: the rows of the last one are done with
        last = self.max_length is not None and input_ids.shape[1] + 1 >= self.max_length
        masks = []
        for row in input_ids.tolist():
            ids = row[self.prefix_len:]
            mask = self.allowed(self.open_word(ids), last)
            if not ids and self.bos is not None:
                mask = mask.clone()
                mask[self.bos] = True  # a BART decoder writes <s> first, as its training texts begin
            if self.eos is not None and mask[self.eos] and not any(i not in self.special for i in ids):
                mask = mask.clone()
                mask[self.eos] = False  # no empty poems
            masks.append(mask)
        keep = torch.stack(masks).to(scores.device)
        if keep.shape[1] < scores.shape[1]:  # an output layer larger than the tokenizer
            keep = torch.cat([keep, keep.new_zeros(len(keep), scores.shape[1] - keep.shape[1])], 1)
        return scores.masked_fill(~keep[:, :scores.shape[1]], float("-inf"))
