"""Text cleaning: Unicode and whitespace normalisation that keeps line breaks, the counting
tokenizer, long poems cut into pieces that fit, content hashes (exact and near-duplicate keys) and
the hash-decided split.

Everything here is a pure function of the text, so every rank and every re-run agrees.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

# The counting tokenizer: a word (letters/digits, with inner apostrophes: "thy", "o'er", "feed'st")
# or one punctuation mark. Simple, fast and deterministic; it is only used for length bounds and
# the histogram, never by a model. CJK text without spaces counts one token per run of characters.
TOKEN_RE = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")

_NEWLINES = re.compile(r"\r\n|\r|\u2028|\u2029|\x85|\x0b|\x0c")
# Every horizontal whitespace (tabs, NBSP, ideographic space, ...) becomes one plain space.
_HSPACE = re.compile(r"[^\S\n]+")
# Control characters other than newline (tab is folded into spaces first); zero-width marks too.
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u200b\u200c\u200d\u2060\ufeff]")
_BLANKS = re.compile(r"\n{3,}")
# Near-duplicate key: case, punctuation and whitespace do not count.
_NOT_WORD = re.compile(r"[\W_]+")


def count_tokens(text: str) -> int:
    return len(TOKEN_RE.findall(text))


_EDGE_SPACES = re.compile(r" *\n *")


def normalize_text(text: str, form: str = "NFC", keep_indent: bool = False) -> str:
    """Unicode `form` (NFC/NFKC), one kind of line ending, one kind of space; line breaks kept
    (they are the poem's form), at most one blank line between stanzas, no blank lines around."""
    text = unicodedata.normalize(form, text)
    text = _NEWLINES.sub("\n", text)
    text = _CONTROL.sub("", text.replace("\t", " "))
    if keep_indent:
        lines = []
        for line in text.split("\n"):
            stripped = line.strip()
            indent = " " * (len(line) - len(line.lstrip())) if stripped else ""
            lines.append(indent + _HSPACE.sub(" ", stripped))
        text = "\n".join(lines)
    else:
        # Whole-text regexes, no per-line Python loop: this runs once per poem on millions of poems.
        text = _EDGE_SPACES.sub("\n", _HSPACE.sub(" ", text)).strip(" ")
    return _BLANKS.sub("\n\n", text).strip("\n")


def normalize_label(value, lower: bool) -> str:
    """Labels are one line: folder-name separators become spaces ('free_verse' -> 'free verse')."""
    if value is None:
        return ""
    value = unicodedata.normalize("NFC", str(value))
    if lower:
        value = value.replace("_", " ").replace("-", " ").lower()
    return " ".join(value.split())


# Where a long poem is cut, best first: between stanzas, between lines, between words.
CUTS = ("\n\n", "\n", " ")


def split_long(text: str, max_tokens: int) -> list[tuple[str, int, str]]:
    """A normalised poem as consecutive pieces of at most `max_tokens` counting tokens each:
    (piece, tokens, sep), where sep is the text that followed the piece in the poem ('' after the
    last), so ''.join(piece + sep) is the poem again. Whole stanzas are packed into a piece while
    they fit; a stanza too long alone is cut between lines, a line between words, and a run without
    spaces (punctuation) between tokens. Tokens never span whitespace, so the counts add up."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    pieces = _pack(text, max_tokens, 0)
    pieces[-1][2] = ""
    return [tuple(p) for p in pieces]


def _pack(text: str, max_tokens: int, level: int) -> list[list]:
    if level == len(CUTS):
        ends = [m.end() for m in TOKEN_RE.finditer(text)][max_tokens - 1:-1:max_tokens]
        starts = [0, *ends]
        return [[text[a:b], count_tokens(text[a:b]), ""] for a, b in zip(starts, [*ends, len(text)])]
    sep = CUTS[level]
    out: list[list] = []
    run: list[str] = []   # parts packed into the piece being built
    run_n = 0
    for part in text.split(sep):
        n = count_tokens(part)
        if n > max_tokens:
            if run_n:
                out.append([sep.join(run), run_n, sep])
            else:      # only token-less parts so far (indents): they go with the cut part
                part = sep.join([*run, part])
            sub = _pack(part, max_tokens, level + 1)
            sub[-1][2] = sep
            out += sub
            run, run_n = [], 0
        elif run_n and run_n + n > max_tokens:
            out.append([sep.join(run), run_n, sep])
            run, run_n = [part], n
        else:
            run.append(part)
            run_n += n
    if run:
        if out and not run_n:  # token-less tail: it belongs to the last piece
            out[-1][0] += out[-1][2] + sep.join(run)
        else:
            out.append([sep.join(run), run_n, sep])
    return out


def near_key(text: str) -> str:
    return _NOT_WORD.sub("", text.lower())


def digest(s: str) -> bytes:
    """128-bit content hash (blake2b: stable across processes and Python versions, unlike hash())."""
    return hashlib.blake2b(s.encode("utf-8"), digest_size=16).digest()


def split_of(near_digest: bytes, val: float, test: float, salt: str) -> str:
    """train/val/test from a salted hash of the near-duplicate key: a poem (and any near copy of it)
    keeps its split when the corpus grows, and never sits in two splits."""
    h = hashlib.blake2b(near_digest, digest_size=8, key=salt.encode("utf-8")[:64]).digest()
    u = int.from_bytes(h, "big") / 2.0**64
    if u < val:
        return "val"
    if u < val + test:
        return "test"
    return "train"


def bucket_of(near_digest: bytes, world_size: int) -> int:
    """The rank that owns a poem: all copies of a poem meet on one rank, so dedup holds across ranks."""
    return int.from_bytes(near_digest[:8], "big") % world_size
