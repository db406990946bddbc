"""latentverse prep: poem corpora -> cleaned, deduplicated, split text shards (MDS, zstd).

Reads the user's poems (folder tree, JSONL, CSV, webdataset tar) and/or the bundled corpora
(Gutenberg stanzas, Shakespeare's sonnets, the Hyakunin Isshu tanka), cleans them, removes exact and
near duplicates (merging their labels), builds a prompt from the labels and writes
out_dir/<split>/<slot>/ shards with a merged out_dir/<split>/index.json, plus stats.json and
token_hist.png. Bad input is skipped or repaired, counted and named in stats.json. A poem longer
than clean.max_tokens is cut into pieces that fit (one record each, tied to the poem by poem_id,
piece and pieces), after dedup and with the poem's split, so a poem's pieces never straddle splits.

Work runs in slots: `num_workers` processes here, times WORLD_SIZE ranks under a launcher.
Phase 1 reads a slice of the input per slot and routes each poem to the slot that owns its content
hash; phase 2 deduplicates, splits and writes there, so dedup holds across slots and the output
does not depend on which slot read what. Re-running a finished job does nothing; re-running after a
kill redoes only the unfinished slots.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import gc
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
from typing import Literal

from tqdm import tqdm

from trainer.base import config as C, uris
from trainer.base.config import UserError
from trainer.base.log import get_logger
from data_prep import readers, shuffle, sources
from data_prep.sources import SourcesConfig
from data_prep.cleaning import (bucket_of, count_tokens, digest, near_key, normalize_label, normalize_text,
                                split_long, split_of)
from trainer.data.mds import RankedDataset, wait_for, world_from_env
from trainer.data.remote import write_through_stage
from trainer.base.files import check_out_dir, read_json, write_json_atomic
from data_prep.prompts import PromptConfig, build_prompt
from data_prep.report import Report
from trainer.base.schema import LABELS, PREP_COLUMNS, SPLITS
from data_prep.stats import Stats, plot_histogram

log = get_logger("prep")

TOKEN_COUNTER = r"regex \w+(?:['’]\w+)*|[^\w\s] (words with inner apostrophes, or one punctuation mark)"


@dataclasses.dataclass
class DataConfig:
    """The user's own poems (in addition to the bundled corpora); none when path is null."""
    path: str | None = None                 # a folder, or one file
    format: Literal["folder", "jsonl", "csv", "wds"] = "folder"
    text_column: str = "text"               # jsonl / csv: where the poem is
    label_columns: dict[str, str] = dataclasses.field(default_factory=dict)  # label -> column; default: same name
    max_files: int | None = None            # the first N input files (sorted by path)
    max_records_per_file: int | None = None  # jsonl / csv / wds: the first N records of each file
    max_file_bytes: int = 1_000_000         # a one-poem file (or tar member) larger than this is skipped unread

    def __post_init__(self):
        bad = set(self.label_columns) - set(LABELS)
        if bad:
            raise ValueError(f"label_columns: unknown label {sorted(bad)[0]!r}; labels: {', '.join(LABELS)}")


@dataclasses.dataclass
class CleanConfig:
    unicode_form: Literal["NFC", "NFKC"] = "NFC"               # NFC keeps compatibility characters; NFKC folds them
    keep_indent: bool = False               # keep leading spaces of lines (indented couplets)
    min_tokens: int = 4                     # length bounds, in the counting tokenizer (TOKEN_COUNTER)
    max_tokens: int = 512
    # A poem over max_tokens: cut at stanza (else line, else word) boundaries into pieces that fit
    # (split; every line is kept, so a last piece may be under min_tokens), or dropped and counted
    # as too_long (skip).
    long_poems: Literal["split", "skip"] = "split"
    max_line_chars: int = 1000              # a longer line is not verse (e.g. a whole file on one line)
    near_dedup: bool = True                 # also drop copies differing only in case/punctuation/spacing

    def __post_init__(self):
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 0 <= min_tokens <= max_tokens, got {self.min_tokens}, {self.max_tokens}")


@dataclasses.dataclass
class SplitConfig:
    val: float = 0.05
    test: float = 0.05
    salt: str = "latentverse"   # changing it reshuffles the splits; keep it fixed for a growing corpus

    def __post_init__(self):
        if self.val < 0 or self.test < 0 or self.val + self.test >= 1:
            raise ValueError(f"need val, test >= 0 and val + test < 1, got {self.val}, {self.test}")


@dataclasses.dataclass
class PrepConfig:
    out_dir: str = "out/text_shards"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sources: SourcesConfig = dataclasses.field(default_factory=SourcesConfig)
    clean: CleanConfig = dataclasses.field(default_factory=CleanConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    prompt: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    num_workers: int = 1                    # processes on this machine (per launcher rank)
    shard_size_limit: int = 1 << 24         # bytes per MDS shard before compression
    compression: str = "zstd"
    hist_bin_width: int = 8                 # tokens per histogram bar
    overwrite: bool = False                 # replace an out_dir written with another config
    wait_timeout_s: float = 24 * 3600.0     # launcher ranks: how long to wait for the other ranks

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.hist_bin_width < 1:
            raise ValueError(f"hist_bin_width must be >= 1, got {self.hist_bin_width}")


CONFIG = PrepConfig


# ---------------------------------------------------------------------------------------------
# units of work


def data_units(cfg: PrepConfig) -> list[readers.Unit]:
    """The user's input files, checked for their text column: bad input stops here, before any work."""
    if cfg.data.path is None:
        return []
    units = readers.list_units(cfg.data.format, cfg.data.path, cfg.data.max_files)
    readers.check_text_column(units, cfg.data.text_column)
    return units


def list_units(cfg: PrepConfig, data: list[readers.Unit] | None = None) -> list[readers.Unit]:
    units = data_units(cfg) if data is None else list(data)
    units += sources.bundled_units(cfg.sources)
    if not units:
        raise UserError("nothing to read: set data.path or enable a source under sources")
    return units


def read_unit(unit: readers.Unit, cfg: PrepConfig, report: Report):
    d = cfg.data
    if unit.kind == "folder":
        return readers.read_folder_file(*unit.arg, d.max_file_bytes, report)
    if unit.kind == "jsonl":
        return readers.read_jsonl(*unit.arg, d.text_column, d.label_columns, d.max_records_per_file, report)
    if unit.kind == "csv":
        return readers.read_csv(*unit.arg, d.text_column, d.label_columns, d.max_records_per_file, report)
    if unit.kind == "wds":
        return readers.read_wds(*unit.arg, d.label_columns, d.max_records_per_file, d.max_file_bytes, report)
    if unit.kind == "gutenberg":
        return sources.read_gutenberg(*unit.arg, cfg.sources.gutenberg, report)
    if unit.kind == "shakespeare":
        return sources.read_shakespeare(cfg.sources.shakespeare, report)
    if unit.kind == "ogura":
        return sources.read_ogura(cfg.sources.ogura, report)
    raise ValueError(f"unknown unit kind {unit.kind!r}")


def clean_record(rec: readers.Record, c: CleanConfig, report: Report):
    """(exact digest, near digest, n_tokens, text, labels) or None (skipped, counted). A long poem
    stays whole here (unless long_poems=skip): dedup and the split key on the poem, phase 2 cuts it."""
    text = normalize_text(rec.text, c.unicode_form, c.keep_indent)
    if not text:
        report.skip("empty", rec.origin)
        return None
    longest = max(len(line) for line in text.split("\n"))
    if longest > c.max_line_chars:
        report.skip("line_too_long", rec.origin, f"{longest} characters > {c.max_line_chars}")
        return None
    n = count_tokens(text)
    if n < c.min_tokens:
        report.skip("too_short", rec.origin, f"{n} tokens < {c.min_tokens}")
        return None
    if n > c.max_tokens and c.long_poems == "skip":
        report.skip("too_long", rec.origin, f"{n} tokens > {c.max_tokens}")
        return None
    key = near_key(text)
    labels = tuple(normalize_label(getattr(rec, k), lower=k in ("form", "topic", "meter")) for k in LABELS)
    return digest(text), digest(key), n, text, labels


# ---------------------------------------------------------------------------------------------
# phase 1: read + clean a slice of the units, route each poem to the slot owning its hash


def phase1(cfg: PrepConfig, units: list, slot: int, n_slots: int, work: str, show: bool) -> dict:
    t, cpu = time.time(), time.process_time()
    report = Report()
    read = {}
    spill = shuffle.SpillWriter(work, slot, n_slots)
    mine = list(range(slot, len(units), n_slots))  # interleaved: neighbouring units cost alike
    for u in tqdm(mine, desc=f"prep read  [slot {slot}/{n_slots}]", unit="unit", disable=not show):
        unit = units[u]
        for i, rec in enumerate(read_unit(unit, cfg, report)):
            read[rec.source] = read.get(rec.source, 0) + 1
            out = clean_record(rec, cfg.clean, report)
            if out is not None:
                ex, nd, n, text, labels = out
                spill.add(bucket_of(nd, n_slots), (u, i, ex, nd, n, rec.source, text, labels, rec.origin))
    info = {"read": read, "report": report.as_dict(), "finished_at": time.time()}
    spill.finish(info)
    log.debug(f"slot {slot}: phase 1, {sum(read.values())} records read in {time.time() - t:.2f} s "
              f"({time.process_time() - cpu:.2f} s CPU)")
    return info


# ---------------------------------------------------------------------------------------------
# phase 2: dedup (merging labels), split, prompt, write this slot's shards


def phase2(cfg: PrepConfig, ds: RankedDataset, slot: int, n_slots: int, work: str, show: bool) -> dict:
    report = Report()
    items = sorted(shuffle.read_for(work, slot, n_slots), key=lambda t: (t[0], t[1]))  # input order
    kept: list[list] = []
    by_exact: dict = {}
    by_near: dict = {}
    merged = 0
    for u, i, ex, nd, n, source, text, labels, origin in items:
        j, reason = by_exact.get(ex), "duplicate_exact"
        if j is None and cfg.clean.near_dedup:
            j, reason = by_near.get(nd), "duplicate_near"
        if j is None:
            by_exact[ex] = by_near.setdefault(nd, len(kept)) if cfg.clean.near_dedup else len(kept)
            kept.append([ex, nd, n, source, text, list(labels), origin])
            continue
        report.skip(reason, origin, f"copy of {kept[j][6]}")
        # A copy's labels fill the kept poem's empty ones: forms/sonnet/x.txt + topics/love/x.txt.
        first = kept[j][5]
        filled = [a or b for a, b in zip(first, labels)]
        if filled != first:
            kept[j][5] = filled
            merged += 1

    stats = Stats(bin_width=cfg.hist_bin_width)
    long_poems = {"poems": 0, "pieces": 0}
    max_tokens = cfg.clean.max_tokens
    with ds.rank_writer(slot) as w:
        for ex, nd, n, source, text, labels, origin in tqdm(kept, desc=f"prep write [slot {slot}/{n_slots}]",
                                                            unit="poem", disable=not show):
            lab = dict(zip(LABELS, labels))
            prompt = build_prompt(lab, cfg.prompt)
            split = split_of(nd, cfg.split.val, cfg.split.test, cfg.split.salt)  # the poem's: all its pieces
            poem_id = f"{source}-{ex.hex()[:16]}"
            pieces = split_long(text, max_tokens) if n > max_tokens else [(text, n, "")]
            if len(pieces) > 1:
                report.repair("split_long", origin, f"{n} tokens > {max_tokens}: {len(pieces)} pieces")
                long_poems["poems"] += 1
                long_poems["pieces"] += len(pieces)
            for p, (piece, m, sep) in enumerate(pieces):
                w.write({"id": poem_id if len(pieces) == 1 else f"{poem_id}-p{p}", "text": piece,
                         "prompt": prompt, "source": source, **lab, "n_tokens": m, "poem_id": poem_id,
                         "piece": p, "pieces": len(pieces), "piece_sep": sep}, split=split)
                stats.add(split, source, lab, m)
        return w.finish({"stats": stats.as_dict(), "report": report.as_dict(), "labels_merged": merged,
                         "long_poems": long_poems})


# ---------------------------------------------------------------------------------------------
# the job


def run_slot(cfg: PrepConfig, units: list, ds: RankedDataset, slot: int, n_slots: int, work: str,
             show: bool) -> dict:
    """Both phases of one slot: phase 1 (unless an earlier run finished it), wait until every slot
    has finished phase 1, then phase 2."""
    if shuffle.done(work, slot) is None:
        phase1(cfg, units, slot, n_slots, work, show)
    wait_for([shuffle.marker(work, s) for s in range(n_slots)], cfg.wait_timeout_s, poll=0.05,
             what="phase 1 of every slot")
    return phase2(cfg, ds, slot, n_slots, work, show)


def fingerprint(cfg: PrepConfig, n_slots: int) -> str:
    d = C.to_dict(cfg)
    for k in ("out_dir", "overwrite", "wait_timeout_s", "num_workers"):
        d.pop(k)
    d["slots"] = n_slots
    if cfg.data.path:   # a corpus in a bucket is named by its URI, not by this node's copy of it
        d["data"]["path"] = uris.origin(cfg.data.path)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _context():
    # fork shares the loaded Gutenberg lines with the workers; spawn elsewhere (slower start).
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _run_slots(fn, jobs: list[tuple], workers: int) -> None:
    """fn(*job, show=...) for each job, in `workers` processes; the first job shows the progress bar.

    The cyclic garbage collector is paused meanwhile: the work makes millions of small acyclic
    tuples, and in forked workers each collection would also touch (and so copy) every page of the
    parent's objects, e.g. the Gutenberg lines shared copy-on-write."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        _run_jobs(fn, jobs, workers)
    finally:
        gc.enable()
        gc.unfreeze()


def _run_jobs(fn, jobs: list[tuple], workers: int) -> None:
    if workers == 1 or len(jobs) <= 1:
        for k, job in enumerate(jobs):
            fn(*job, show=k == 0)
        return
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=_context()) as pool:
        futs = [pool.submit(fn, *job, show=k == 0) for k, job in enumerate(jobs)]
        for f in futs:
            try:
                f.result()
            except cf.process.BrokenProcessPool:
                raise UserError("prep: a worker process died (killed?); run the same command again to "
                                "finish the job") from None


def run(cfg: PrepConfig) -> dict:
    if cfg.data.path:   # a corpus in a bucket is read from this node's copy of it
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=uris.local_path(cfg.data.path, "data.path")))
    rank, world = world_from_env()
    workers = cfg.num_workers
    n_slots = world * workers
    if uris.is_uri(cfg.out_dir):   # staged on this node's disk, then uploaded (trainer/data/remote.py)
        return write_through_stage(cfg, run, fingerprint(cfg, n_slots), "stats.json")
    my_slots = [rank * workers + k for k in range(workers)]
    out = cfg.out_dir
    ds = RankedDataset(out, PREP_COLUMNS, splits=SPLITS, compression=cfg.compression,
                       size_limit=cfg.shard_size_limit)
    work = os.path.join(out, "_work")
    fp = fingerprint(cfg, n_slots)
    check_out_dir(out, create=False)
    data = data_units(cfg)  # one-line errors before out_dir is claimed for this config
    done = ds.claim(fp, {"slots": n_slots, "config": C.to_dict(cfg)}, cfg.overwrite, rank, "_job.json",
                    "text shards", also_remove=("stats.json", "token_hist.png", "_work"),
                    wait_timeout=cfg.wait_timeout_s)
    if done is not None:
        log.info(f"{out}: finished earlier ({done['records']} records); nothing to do")
        return read_json(os.path.join(out, "stats.json"))

    t0 = time.time()
    units = list_units(cfg, data)
    log.info(f"{len(units)} units of work over {n_slots} slot(s); this process runs slots {my_slots}")

    todo = [s for s in my_slots if ds.rank_done(s) is None]
    skipped = [s for s in my_slots if s not in todo]
    if skipped:
        log.info(f"slots {skipped} finished in an earlier run; kept")
    # One process per slot runs both phases, meeting the other slots at the phase-1 barrier (files),
    # so the workers are forked once.
    _run_slots(run_slot, [(cfg, units, ds, s, n_slots, work) for s in todo], workers)
    if rank != 0:
        return {}
    markers = ds.wait_ranks(n_slots, cfg.wait_timeout_s)
    ds.merge(n_slots)
    t2 = time.time()
    t1 = min(max(t0, *(shuffle.done(work, s).get("finished_at", t0) for s in range(n_slots))), t2)

    stats, report, read, merged = Stats(bin_width=cfg.hist_bin_width), Report(), {}, 0
    long_poems = {"mode": cfg.clean.long_poems, "poems_split": 0, "pieces": 0}
    for s in range(n_slots):
        p1 = shuffle.done(work, s)
        for k, v in p1["read"].items():
            read[k] = read.get(k, 0) + v
        report.merge(Report(**p1["report"]))
        info = markers[s]["info"]
        stats.merge(Stats.from_dict(info["stats"]))
        report.merge(Report(**info["report"]))
        merged += info["labels_merged"]
        long_poems["poems_split"] += info["long_poems"]["poems"]
        long_poems["pieces"] += info["long_poems"]["pieces"]
    result = {**stats.as_dict(), "read_per_source": read, **report.as_dict(), "labels_merged": merged,
              "long_poems": long_poems, "token_counter": TOKEN_COUNTER, "slots": n_slots,
              "seconds": {"read_clean": round(t1 - t0, 2), "dedup_write": round(t2 - t1, 2)}}
    write_json_atomic(os.path.join(out, "stats.json"), result)
    if stats.n == 0:
        raise UserError(f"{out}: no poems left after cleaning ({sum(read.values())} read); "
                        f"see the skip reasons in {out}/stats.json")
    plot_histogram(result, os.path.join(out, "token_hist.png"), "prep", "regex word/punct tokens")
    ds.mark_complete({"records": stats.n, "fingerprint": fp})
    shutil.rmtree(work, ignore_errors=True)
    n_skip = sum(e["count"] for e in result["skipped"].values())
    reasons = ", ".join(f"{k} {v['count']}" for k, v in result["skipped"].items()) or "none"
    log.info(f"{out}: {stats.n} records ({dict(stats.counts['split'])}) from {sum(read.values())} read; "
             f"{n_skip} skipped ({reasons}); "
             f"{long_poems['poems_split']} long poems split into {long_poems['pieces']} pieces; "
             f"{time.time() - t0:.1f} s")
    return result
