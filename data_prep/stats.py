"""Corpus statistics of the kept records (counts per split, source, form, topic and meter; the
token-length histogram), merged across ranks, written as stats.json and a PNG of the histogram."""
from __future__ import annotations

import collections
import dataclasses

from trainer.base.files import write_json_atomic

FIELDS = ("split", "source", "form", "topic", "meter")


@dataclasses.dataclass
class Stats:
    bin_width: int
    counts: dict = dataclasses.field(default_factory=lambda: {f: collections.Counter() for f in FIELDS})
    hist: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # bin -> n
    n: int = 0
    tokens: int = 0
    max_tokens: int = 0

    def add(self, split: str, source: str, labels: dict, n_tokens: int) -> None:
        self.n += 1
        self.tokens += n_tokens
        self.max_tokens = max(self.max_tokens, n_tokens)
        self.counts["split"][split] += 1
        self.counts["source"][source] += 1
        for f in ("form", "topic", "meter"):
            self.counts[f][labels.get(f) or "(none)"] += 1
        self.hist[n_tokens // self.bin_width] += 1

    def as_dict(self) -> dict:
        top = max(self.hist, default=-1)
        return {
            "records": self.n,
            "tokens": {"total": self.tokens, "mean": round(self.tokens / self.n, 2) if self.n else 0.0,
                       "max": self.max_tokens},
            **{f"per_{f}": dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for f, c in self.counts.items()},
            "token_histogram": {"bin_width": self.bin_width,
                                "bin_starts": [b * self.bin_width for b in range(top + 1)],
                                "counts": [self.hist.get(b, 0) for b in range(top + 1)]},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        s = cls(bin_width=d["token_histogram"]["bin_width"])
        s.n, s.tokens, s.max_tokens = d["records"], d["tokens"]["total"], d["tokens"]["max"]
        for f in FIELDS:
            s.counts[f] = collections.Counter(d[f"per_{f}"])
        for b, c in enumerate(d["token_histogram"]["counts"]):
            if c:
                s.hist[b] = c
        return s

    def merge(self, other: "Stats") -> "Stats":
        self.n += other.n
        self.tokens += other.tokens
        self.max_tokens = max(self.max_tokens, other.max_tokens)
        for f in FIELDS:
            self.counts[f].update(other.counts[f])
        self.hist.update(other.hist)
        return self


def plot_histogram(stats: dict, path: str, title: str, token_counter: str) -> None:
    """The token-length histogram as a PNG (written to a temporary name, then renamed)."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = stats["token_histogram"]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax.bar(h["bin_starts"], h["counts"], width=h["bin_width"], align="edge", color="#4a6fa5", edgecolor="white")
    ax.set_xlabel(f"tokens per record ({token_counter})")
    ax.set_ylabel("records")
    ax.set_title(f"{title}: {stats['records']} records, mean {stats['tokens']['mean']} tokens")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def write_stats(path: str, stats: dict) -> None:
    write_json_atomic(path, stats)
