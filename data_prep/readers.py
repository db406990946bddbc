"""Readers for the user's own poems: a folder tree (Kaggle poems-dataset layout), JSONL, CSV and
webdataset tar shards. Each yields `Record`s and reports what it skipped or repaired; nothing here
raises on bad data, only on a root that does not exist or holds no poems at all, and (before any
reading, `check_text_column`) on a CSV or JSONL file that has no text column at all.

Work is cut into `Unit`s (one file each) so that ranks can share it: `list_units` is cheap and
deterministic (sorted paths), `read_unit` does the reading.
"""
from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import os
import sys
import tarfile
from typing import Iterator

from trainer.base.config import UserError
from data_prep.report import Report
from trainer.base.schema import LABELS

FORMATS = ("folder", "jsonl", "csv", "wds")
_EXTS = {"folder": (".txt",), "jsonl": (".jsonl",), "csv": (".csv",), "wds": (".tar",)}


@dataclasses.dataclass
class Record:
    text: str
    source: str
    title: str = ""
    author: str = ""
    form: str = ""
    topic: str = ""
    meter: str = ""
    id: str = ""       # set by cleaning: source + hash of the normalised text (schema.TEXT_COLUMNS)
    origin: str = ""   # where it came from (file, file:line, ...), for the skip report

    def labels(self) -> dict:
        return {k: getattr(self, k) for k in LABELS}


@dataclasses.dataclass(frozen=True)
class Unit:
    """One piece of work: a source name, a reader kind and its argument (a path, a line range...)."""
    source: str
    kind: str
    arg: tuple


# ---------------------------------------------------------------------------------------------
# bytes -> text, repairing what can be repaired


def decode_bytes(data: bytes, origin: str, report: Report) -> str | None:
    """UTF-8 text from raw bytes; BOMs, UTF-16 and legacy 8-bit encodings are repaired (and
    counted), empty and binary content is skipped (and counted). CRLF is left to normalize_text
    but counted here, since it is a property of the file."""
    if not data.strip():
        report.skip("empty", origin)
        return None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
            report.repair("utf16", origin)
            return _crlf(text, origin, report)
        except UnicodeDecodeError:
            report.skip("binary", origin, "UTF-16 BOM but undecodable")
            return None
    head = data[:4096]
    controls = sum(b < 32 and b not in (9, 10, 13, 12) for b in head)
    if b"\x00" in head or controls > len(head) // 10:
        report.skip("binary", origin)
        return None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
        report.repair("bom", origin)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        try:
            text = data.decode("cp1252")
            report.repair("not_utf8", origin, f"{e.reason} at byte {e.start}; decoded as cp1252")
        except UnicodeDecodeError:
            text = data.decode("latin-1")
            report.repair("not_utf8", origin, f"{e.reason} at byte {e.start}; decoded as latin-1")
    return _crlf(text, origin, report)


def _crlf(text: str, origin: str, report: Report) -> str:
    if "\r" in text:
        report.repair("crlf", origin)
    return text


def _read_file(path: str, origin: str, max_bytes: int | None, report: Report) -> bytes | None:
    try:
        size = os.path.getsize(path)
        if max_bytes is not None and size > max_bytes:
            report.skip("too_large", origin, f"{size} bytes > {max_bytes}")
            return None
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        report.skip("unreadable", origin, e.strerror or str(e))
        return None


# ---------------------------------------------------------------------------------------------
# listing


def list_files(fmt: str, path: str, key: str = "data.path") -> list[tuple[str, str]]:
    """(absolute path, path relative to the root) of every input file, sorted; one-line errors
    for a root that does not exist or holds no input files."""
    if not os.path.exists(path):
        raise UserError(f"{key}: no such file or folder: {path}")
    exts = _EXTS[fmt]
    if os.path.isfile(path):
        return [(path, os.path.basename(path))]
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(exts):
                full = os.path.join(dirpath, name)
                out.append((full, os.path.relpath(full, path)))
    if not out:
        raise UserError(f"{key}: {path} holds no poems: no {' or '.join('*' + e for e in exts)} files")
    return sorted(out, key=lambda x: x[1])


def list_units(fmt: str, path: str, max_files: int | None = None, key: str = "data.path") -> list[Unit]:
    files = list_files(fmt, path, key)
    if max_files is not None:
        files = files[:max_files]
    return [Unit(fmt, fmt, (full, rel)) for full, rel in files]


# ---------------------------------------------------------------------------------------------
# the text column, checked before any work

HEAD_BYTES = 1 << 20   # enough for a CSV header or the first JSONL records
MAX_LISTED = 30        # column names shown in the error


def check_text_column(units: list[Unit], text_column: str, key: str = "data.text_column") -> None:
    """One-line error naming the file, the column asked for (`key`) and the columns found, when a
    CSV's header lacks `text_column` or no object of a JSONL file has it. A file that cannot be
    read or decoded is left to its reader (skipped and counted there)."""
    for unit in units:
        if unit.kind not in ("csv", "jsonl"):
            continue
        full, rel = unit.arg
        found = _csv_columns(full, rel) if unit.kind == "csv" else _jsonl_keys(full, rel, text_column)
        if found is None or text_column in found:
            continue
        what = "column" if unit.kind == "csv" else "record has the key"
        names = ", ".join(found[:MAX_LISTED]) or "none"
        if len(found) > MAX_LISTED:
            names += f" (and {len(found) - MAX_LISTED} more)"
        raise UserError(f"{full}: no {what} {text_column!r} ({key}); found: {names}")


class _Unreported(Report):
    """A look ahead of the readers: what they will report is not reported twice."""

    def _add(self, *args, **kwargs) -> None:
        pass


def _head(full: str, rel: str, limit: int | None) -> tuple[str | None, bool]:
    """The file's first `limit` bytes (whole lines) as text, and whether that is the whole file."""
    try:
        with open(full, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError:
        return None, True
    whole = limit is None or len(data) <= limit
    if not whole:
        data = data[:limit]
        utf16 = data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE))
        data = data[:len(data) // 2 * 2] if utf16 else data[:data.rfind(b"\n") + 1]
    return decode_bytes(data, rel, _Unreported()), whole


def _csv_columns(full: str, rel: str) -> list[str] | None:
    text, _ = _head(full, rel, HEAD_BYTES)
    if text is None:
        return None
    try:
        return next(csv.reader(io.StringIO(text, newline="")), None)
    except csv.Error:
        return None


def _jsonl_keys(full: str, rel: str, text_column: str) -> list[str] | None:
    """The keys of the file's objects (sorted), or None when one has `text_column` (looking past
    the head of the file only when the head has none) or no line is a JSON object."""
    for limit in (HEAD_BYTES, None):
        text, whole = _head(full, rel, limit)
        if text is None:
            return None
        keys: set = set()
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                if text_column in row:
                    return None
                keys.update(row)
        if whole:
            return sorted(keys) or None
    return None


# ---------------------------------------------------------------------------------------------
# readers


def read_folder_file(full: str, rel: str, max_bytes: int, report: Report) -> Iterator[Record]:
    """One poem per file; `forms/<form>/x.txt` and `topics/<topic>/x.txt` give the labels (the same
    poem in both places becomes one record with both labels when duplicates are merged)."""
    data = _read_file(full, rel, max_bytes, report)
    text = decode_bytes(data, rel, report) if data is not None else None
    if text is None:
        return
    parts = rel.replace(os.sep, "/").split("/")
    labels = {}
    if len(parts) >= 3 and parts[0].lower() in ("forms", "topics"):
        labels["form" if parts[0].lower() == "forms" else "topic"] = parts[1]
    title = os.path.splitext(parts[-1])[0].replace("_", " ")
    yield Record(text=text, source="folder", title=title, origin=rel, **labels)


def _labels_from(row: dict, label_columns: dict) -> dict:
    out = {}
    for label in LABELS:
        col = label_columns.get(label, label)
        v = row.get(col)
        if v is not None and not isinstance(v, (dict, list)):
            out[label] = str(v)
    return out


def read_jsonl(full: str, rel: str, text_column: str, label_columns: dict, max_records: int | None,
               report: Report) -> Iterator[Record]:
    data = _read_file(full, rel, None, report)
    text = decode_bytes(data, rel, report) if data is not None else None
    if text is None:
        return
    n = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if max_records is not None and n >= max_records:
            return
        if not line.strip():
            continue
        where = f"{rel}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip("bad_json", where, e.msg)
            continue
        if not isinstance(row, dict):
            report.skip("bad_json", where, "not an object")
            continue
        poem = row.get(text_column)
        if not isinstance(poem, str):
            report.skip("no_text", where, f"no string {text_column!r}")
            continue
        n += 1
        yield Record(text=poem, source="jsonl", origin=where, **_labels_from(row, label_columns))


def read_csv(full: str, rel: str, text_column: str, label_columns: dict, max_records: int | None,
             report: Report) -> Iterator[Record]:
    data = _read_file(full, rel, None, report)
    text = decode_bytes(data, rel, report) if data is not None else None
    if text is None:
        return
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or text_column not in reader.fieldnames:
        report.skip("no_text_column", rel, f"no column {text_column!r} in {reader.fieldnames}")
        return
    n = 0
    try:
        for row in reader:
            if max_records is not None and n >= max_records:
                return
            where = f"{rel}:{reader.line_num}"
            poem = row.get(text_column)
            if not isinstance(poem, str) or not poem.strip():
                report.skip("no_text", where)
                continue
            n += 1
            yield Record(text=poem, source="csv", origin=where, **_labels_from(row, label_columns))
    except csv.Error as e:
        report.skip("bad_csv", f"{rel}:{reader.line_num}", f"{e}; rest of file skipped")


def read_wds(full: str, rel: str, label_columns: dict, max_records: int | None,
             max_bytes: int, report: Report) -> Iterator[Record]:
    """webdataset shards: members `<key>.txt` (the poem) and `<key>.json` (labels), grouped by key
    as webdataset does (the key is the member path up to the first dot of its file name)."""
    n = 0

    def emit(key, members):
        where = f"{rel}:{key}"
        if "txt" not in members:
            report.skip("no_text", where, "no .txt member")
            return None
        poem = decode_bytes(members["txt"], where, report)
        if poem is None:
            return None
        labels = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8-sig"))
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
                labels = _labels_from(meta, label_columns)
            except (ValueError, UnicodeDecodeError) as e:
                report.repair("bad_json_labels", where, f"{e}; labels dropped")
        return Record(text=poem, source="wds", origin=where, **labels)

    try:
        with tarfile.open(full) as tar:
            key, members = None, {}
            for m in tar:
                if not m.isfile():
                    continue
                d, base = os.path.split(m.name)
                k, _, ext = base.partition(".")
                k = f"{d}/{k}" if d else k
                if k != key and key is not None:
                    rec = emit(key, members)
                    if rec is not None:
                        yield rec
                        n += 1
                        if max_records is not None and n >= max_records:
                            return
                    members = {}
                key = k
                if m.size > max_bytes:
                    report.skip("too_large", f"{rel}:{m.name}", f"{m.size} bytes > {max_bytes}")
                    continue
                members[ext.lower()] = tar.extractfile(m).read()
            if key is not None:
                rec = emit(key, members)
                if rec is not None:
                    yield rec
    except (tarfile.TarError, OSError, EOFError) as e:
        report.skip("bad_tar", rel, f"{e}; rest of file skipped")
