"""Skipped and repaired inputs, counted per reason with the files (or file:line) they came from.

Bad input never stops the job: each reader reports here and moves on. A Report is plain data, so
ranks pickle theirs and the job merges them into stats.json.
"""
from __future__ import annotations

import dataclasses

from trainer.base.log import get_logger

log = get_logger("prep")

MAX_NAMES = 50   # file names kept per reason (the count is always exact)
MAX_WARNINGS = 20  # warnings logged per reason and rank; the rest are only counted


@dataclasses.dataclass
class Report:
    skipped: dict = dataclasses.field(default_factory=dict)   # reason -> {"count": n, "files": [...]}
    repaired: dict = dataclasses.field(default_factory=dict)
    quiet: tuple = ("duplicate_exact", "duplicate_near", "meter_unclear")  # expected, not worth a warning each

    def _add(self, table: dict, kind: str, reason: str, origin: str, detail: str = "") -> None:
        entry = table.setdefault(reason, {"count": 0, "files": []})
        entry["count"] += 1
        if len(entry["files"]) < MAX_NAMES:
            entry["files"].append(origin)
        if reason not in self.quiet and entry["count"] <= MAX_WARNINGS:
            log.warning(f"{kind} {origin}: {reason}{': ' + detail if detail else ''}")

    def skip(self, reason: str, origin: str, detail: str = "") -> None:
        self._add(self.skipped, "skipped", reason, origin, detail)

    def repair(self, reason: str, origin: str, detail: str = "") -> None:
        self._add(self.repaired, "repaired", reason, origin, detail)

    def merge(self, other: "Report") -> "Report":
        for mine, theirs in ((self.skipped, other.skipped), (self.repaired, other.repaired)):
            for reason, e in theirs.items():
                m = mine.setdefault(reason, {"count": 0, "files": []})
                m["count"] += e["count"]
                m["files"] = (m["files"] + e["files"])[:MAX_NAMES]
        return self

    def as_dict(self) -> dict:
        order = lambda t: {k: t[k] for k in sorted(t)}  # noqa: E731
        return {"skipped": order(self.skipped), "repaired": order(self.repaired)}
