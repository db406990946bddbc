"""The prep job end to end on small trees and files made here: bad input, dedup and label merging,
formats, long poems cut into pieces, shards readable by StreamingDataset, determinism, 2 slots ==
1 slot, resume after a kill."""
import io
import json
import os
import random

import pytest

from trainer.base import config as C
from data_prep import prep_job
from data_prep.cleaning import count_tokens, digest, near_key, normalize_text, split_of
from trainer.base.schema import LABELS, PREP_COLUMNS, SPLITS
from tests import faults
from tests.conftest import run_cli

WORDS = ("moon river stone wind quiet ember harbor lantern meadow thunder silver hollow crow orchard "
         "winter salt candle marrow bell thistle ash tide glass sparrow iron velvet cedar dusk").split()
NO_BUNDLED = ["sources.gutenberg.enabled=false", "sources.shakespeare.enabled=false",
              "sources.ogura.enabled=false"]


def poem(k: int, lines: int = 4) -> str:
    rng = random.Random(k)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) + f" {k}" for _ in range(lines))


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))


def kaggle_tree(root, n=40):
    """forms/<form>/*.txt and topics/<topic>/*.txt; poems 0..9 are in both a form and a topic."""
    forms, topics = ("sonnet", "free_verse"), ("love", "nature")
    for k in range(n):
        if k < 30:
            write(f"{root}/forms/{forms[k % 2]}/p{k}.txt", poem(k))
        if k < 10 or k >= 30:
            write(f"{root}/topics/{topics[k % 2]}/p{k}.txt", poem(k))
    return root


def load(overrides, path=None):
    return C.load(prep_job.CONFIG, path, overrides)


def read_split(out, split):
    from streaming import StreamingDataset
    idx = json.load(open(f"{out}/{split}/index.json"))
    if not idx["shards"]:
        return []
    ds = StreamingDataset(local=f"{out}/{split}", shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def read_all(out):
    return {s: read_split(out, s) for s in SPLITS}


def test_folder_tree_labels_merge_and_bad_files(tmp_path):
    root = kaggle_tree(str(tmp_path / "poems"))
    write(f"{root}/forms/sonnet/empty.txt", b"")
    write(f"{root}/forms/sonnet/blank.txt", b"  \n\n \t\n")
    write(f"{root}/forms/sonnet/binary.txt", bytes(range(256)) * 8)
    write(f"{root}/topics/love/cp1252.txt", ("Caf\u00e9 by the r\u00eeve, na\u00efve and so forth\n" + poem(100)).encode("cp1252"))
    write(f"{root}/topics/love/crlf.txt", poem(101).replace("\n", "\r\n"))
    write(f"{root}/topics/love/bom.txt", b"\xef\xbb\xbf" + poem(102).encode())
    write(f"{root}/topics/love/oneline.txt", "word " * 50_000)               # 250 kB on one line
    write(f"{root}/topics/love/enormous.txt", b"x" * 1_200_000)             # > data.max_file_bytes
    write(f"{root}/topics/love/short.txt", "too short")
    write(f"{root}/topics/nature/z_near_copy.txt", poem(35).upper().replace(" ", "  ,"))  # near copy of p35
    write(f"{root}/notes.md", "not a poem")
    out = str(tmp_path / "out")
    stats = prep_job.run(load([f"data.path={root}", f"out_dir={out}", *NO_BUNDLED], "yamls/prep/folder_tree.yaml"))

    rows = [r for rs in read_all(out).values() for r in rs]
    assert sorted(rows[0]) == sorted(PREP_COLUMNS)
    # 40 poems (10 in two places merged into one) + cp1252 + crlf + bom
    assert len(rows) == stats["records"] == 43
    assert len({r["id"] for r in rows}) == 43
    by_title = {r["title"]: r for r in rows}
    for k in range(10):   # in a form and a topic: one record with both labels
        r = by_title[f"p{k}"]
        assert (r["form"], r["topic"]) == (("sonnet", "free verse")[k % 2], ("love", "nature")[k % 2])
        assert r["prompt"] == f"{r['form']} about {r['topic']}"
    assert by_title["p12"]["prompt"] == "sonnet" and by_title["p31"]["prompt"] == "poem about nature"
    assert stats["labels_merged"] == 10
    assert "\r" not in by_title["crlf"]["text"] and by_title["crlf"]["text"] == poem(101)
    assert by_title["bom"]["text"] == poem(102)
    assert by_title["cp1252"]["text"].startswith("Caf\u00e9 by the r\u00eeve, na\u00efve")
    assert all(r["source"] == "folder" and r["n_tokens"] > 0 for r in rows)

    sk, rep = stats["skipped"], stats["repaired"]
    assert sk["empty"]["files"] == ["forms/sonnet/blank.txt", "forms/sonnet/empty.txt"]
    assert sk["binary"]["files"] == ["forms/sonnet/binary.txt"]
    assert sk["line_too_long"]["files"] == ["topics/love/oneline.txt"]
    assert sk["too_large"]["files"] == ["topics/love/enormous.txt"]
    assert sk["too_short"]["files"] == ["topics/love/short.txt"]
    assert sk["duplicate_exact"]["count"] == 10
    assert sk["duplicate_near"]["files"] == ["topics/nature/z_near_copy.txt"]
    assert rep["not_utf8"]["files"] == ["topics/love/cp1252.txt"]
    assert rep["crlf"]["files"] == ["topics/love/crlf.txt"] and rep["bom"]["files"] == ["topics/love/bom.txt"]
    assert stats["per_source"] == {"folder": 43} and stats["per_topic"]["love"] == 10 + 3
    assert sum(stats["per_split"].values()) == 43 and sum(stats["token_histogram"]["counts"]) == 43
    on_disk = json.load(open(f"{out}/stats.json"))
    assert on_disk["records"] == 43
    assert open(f"{out}/token_hist.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_and_empty_roots_are_one_line_errors(tmp_path):
    r = run_cli("prep", "yamls/prep/folder_tree.yaml", f"data.path={tmp_path}/nope", f"out_dir={tmp_path}/o")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"data.path: no such file or folder: {tmp_path}/nope"]
    os.makedirs(tmp_path / "empty" / "forms" / "sonnet")
    write(f"{tmp_path}/empty/readme.md", "no poems here")
    with pytest.raises(C.UserError, match=r"holds no poems: no \*\.txt files"):
        prep_job.run(load([f"data.path={tmp_path}/empty", f"out_dir={tmp_path}/o2"], "yamls/prep/folder_tree.yaml"))
    # poems that are all bad: an error naming stats.json, which explains why
    write(f"{tmp_path}/bad/forms/x/a.txt", b"")
    with pytest.raises(C.UserError, match="no poems left after cleaning"):
        prep_job.run(load([f"data.path={tmp_path}/bad", f"out_dir={tmp_path}/o3"], "yamls/prep/folder_tree.yaml"))
    assert json.load(open(f"{tmp_path}/o3/stats.json"))["skipped"]["empty"]["files"] == ["forms/x/a.txt"]


def test_jsonl_csv_wds_readers(tmp_path):
    import webdataset as wds
    lines = [json.dumps({"poem": poem(k), "kind": "ode", "author": "A. Poet"}) for k in range(12)]
    lines.insert(3, "{not json")
    lines.insert(5, json.dumps({"other": 1}))
    write(f"{tmp_path}/j/a.jsonl", "\n".join(lines) + "\n")
    out = f"{tmp_path}/oj"
    stats = prep_job.run(load([f"data.path={tmp_path}/j", f"out_dir={out}", "data.text_column=poem",
                               "data.label_columns.form=kind"], "yamls/prep/jsonl.yaml"))
    rows = [r for rs in read_all(out).values() for r in rs]
    assert len(rows) == 12 and {r["prompt"] for r in rows} == {"ode by A. Poet"}
    assert stats["skipped"]["bad_json"]["files"] == ["a.jsonl:4"] and stats["skipped"]["no_text"]["files"] == ["a.jsonl:6"]

    import csv
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["text", "topic", "meter"])
    for k in range(8):
        w.writerow([poem(k + 50), "sea", "iambic tetrameter"])
    w.writerow(["", "sea", ""])
    write(f"{tmp_path}/c/a.csv", buf.getvalue())
    out = f"{tmp_path}/oc"
    stats = prep_job.run(load([f"data.path={tmp_path}/c", "data.format=csv", f"out_dir={out}", *NO_BUNDLED]))
    rows = [r for rs in read_all(out).values() for r in rs]
    assert len(rows) == 8 and "\n" in rows[0]["text"]
    assert {r["prompt"] for r in rows} == {"poem about sea in iambic tetrameter"}
    assert stats["skipped"]["no_text"]["count"] == 1

    os.makedirs(f"{tmp_path}/w")
    with wds.TarWriter(f"{tmp_path}/w/shard-000.tar") as tw:
        for k in range(6):
            tw.write({"__key__": f"s{k:03d}", "txt": poem(k + 70), "json": {"form": "haiku", "topic": "rain"}})
        tw.write({"__key__": "nolabels", "txt": poem(80)})
        tw.write({"__key__": "badjson", "txt": poem(81), "json": b"{oops"})
        tw.write({"__key__": "notext", "json": {"form": "haiku"}})
    write(f"{tmp_path}/w/shard-001.tar", b"this is not a tar file at all" * 40)
    out = f"{tmp_path}/ow"
    stats = prep_job.run(load([f"data.path={tmp_path}/w", "data.format=wds", f"out_dir={out}", *NO_BUNDLED]))
    rows = {r["id"]: r for rs in read_all(out).values() for r in rs}
    assert len(rows) == 8 and sum(r["prompt"] == "haiku about rain" for r in rows.values()) == 6
    assert sum(r["prompt"] == "" for r in rows.values()) == 2
    assert stats["repaired"]["bad_json_labels"]["files"] == ["shard-000.tar:badjson"]
    assert stats["skipped"]["no_text"]["files"] == ["shard-000.tar:notext"]
    assert stats["skipped"]["bad_tar"]["files"] == ["shard-001.tar"]


def test_bundled_slices_deterministic_and_rerun_does_nothing(tmp_path):
    over = ["sources.gutenberg.max_stanzas=300", "sources.shakespeare.max_records=20",
            "sources.ogura.max_records=30", "num_workers=1", "shard_size_limit=20000"]
    a, b = f"{tmp_path}/a", f"{tmp_path}/b"
    stats = prep_job.run(load([f"out_dir={a}", *over], "yamls/prep/bundled.yaml"))
    assert stats["per_source"] == {"gutenberg": 300, "ogura": 30, "shakespeare": 20}
    assert stats["per_form"] == {"stanza": 300, "tanka": 30, "sonnet": 20}
    rows = [r for rs in read_all(a).values() for r in rs]
    prompts = {r["prompt"] for r in rows}
    assert "tanka by Ono no Komachi" in prompts and "sonnet by William Shakespeare" in prompts
    assert any(p.startswith("stanza in iambic ") or p.startswith("stanza in trochaic ") for p in prompts)
    assert len(os.listdir(f"{a}/train/0")) > 2  # several shards
    prep_job.run(load([f"out_dir={b}", *over], "yamls/prep/bundled.yaml"))

    def files(root):
        return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
                for d, _, fs in os.walk(root) for f in fs if f.endswith((".zstd", "index.json"))}
    assert files(a) == files(b) and len(files(a)) > 6  # byte for byte

    before = {p: os.stat(os.path.join(a, p)).st_mtime_ns for p in files(a)}
    again = prep_job.run(load([f"out_dir={a}", *over], "yamls/prep/bundled.yaml"))
    assert again["records"] == 350
    assert {p: os.stat(os.path.join(a, p)).st_mtime_ns for p in files(a)} == before
    # another config in the same out_dir is refused, not mixed in
    with pytest.raises(C.UserError, match="another config"):
        prep_job.run(load([f"out_dir={a}", *over, "split.val=0.2"], "yamls/prep/bundled.yaml"))
    # overwrite=true replaces that run: out_dir then holds what a fresh run of the new config writes
    prep_job.run(load([f"out_dir={a}", *over, "split.val=0.2", "overwrite=true"], "yamls/prep/bundled.yaml"))
    prep_job.run(load([f"out_dir={b}-fresh", *over, "split.val=0.2"], "yamls/prep/bundled.yaml"))
    assert files(a) == files(f"{b}-fresh") and files(a) != files(b)


def test_two_workers_equal_one_worker_as_a_set(tmp_path):
    root = kaggle_tree(str(tmp_path / "poems"), n=60)
    for k in range(60, 70):   # duplicates that two different slots will read
        write(f"{root}/topics/love/dup{k}.txt", poem(k - 60))
    common = [f"data.path={root}", *NO_BUNDLED, "shard_size_limit=4000"]
    s1 = prep_job.run(load([*common, f"out_dir={tmp_path}/w1", "num_workers=1"], "yamls/prep/folder_tree.yaml"))
    s2 = prep_job.run(load([*common, f"out_dir={tmp_path}/w2", "num_workers=2"], "yamls/prep/folder_tree.yaml"))
    assert os.path.isdir(f"{tmp_path}/w2/train/1") and not os.path.isdir(f"{tmp_path}/w1/train/1")
    for split in SPLITS:
        one = {tuple(sorted(r.items())) for r in read_split(f"{tmp_path}/w1", split)}
        two = {tuple(sorted(r.items())) for r in read_split(f"{tmp_path}/w2", split)}
        assert one == two
    assert s1["records"] == s2["records"] == 60
    assert s1["skipped"]["duplicate_exact"]["count"] == s2["skipped"]["duplicate_exact"]["count"] == 20
    assert s1["per_form"] == s2["per_form"] and s1["token_histogram"] == s2["token_histogram"]


def _as_set(out):
    return {s: {tuple(sorted(r.items())) for r in rows} for s, rows in read_all(out).items()}


def _unfinished_shards(out, slot):
    """Shard files of `slot` on disk while the slot has no done-marker: it died mid-write."""
    return not os.path.exists(f"{out}/_ranks/{slot}.json") and [
        f for s in SPLITS if os.path.isdir(f"{out}/{s}/{slot}") for f in os.listdir(f"{out}/{s}/{slot}")
        if f.endswith(".zstd")]


@pytest.mark.slow
def test_kill_and_rerun_writes_every_record_exactly_once(tmp_path):
    root = kaggle_tree(str(tmp_path / "poems"), n=120)
    common = ["yamls/prep/folder_tree.yaml", f"data.path={root}", "shard_size_limit=3000"]
    ref = f"{tmp_path}/ref"
    prep_job.run(load([*common[1:], f"out_dir={ref}"], common[0]))
    expected = read_all(ref)
    assert sum(map(len, expected.values())) == 120

    # one process, killed (SIGKILL) in the middle of writing its shards
    out = f"{tmp_path}/k1"
    r = run_cli("prep", *common, f"out_dir={out}", env=faults.env(KILL_AFTER_RECORDS=50))
    assert r.returncode == -9 and "slot 0 SIGKILLs its process after 50 records" in r.stderr, r.stderr
    assert not os.path.exists(f"{out}/_done.json") and _unfinished_shards(out, 0)
    r = run_cli("prep", *common, f"out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert read_all(out) == expected    # the same records in the same order as a run never killed

    # two workers: slot 1 is killed, slot 0 finishes; the re-run keeps slot 0 and redoes slot 1
    out = f"{tmp_path}/k2"
    r = run_cli("prep", *common, f"out_dir={out}", "num_workers=2",
                env=faults.env(KILL_AFTER_RECORDS=40, KILL_SLOT=1, KILL_WAITS_FOR=0))
    assert r.returncode == 2 and "run the same command again" in r.stderr, r.stderr
    assert "slot 1 SIGKILLs its process after 40 records" in r.stderr
    assert os.path.exists(f"{out}/_ranks/0.json") and _unfinished_shards(out, 1)
    slot0 = os.stat(f"{out}/_ranks/0.json").st_mtime_ns
    r = run_cli("prep", *common, f"out_dir={out}", "num_workers=2")
    assert r.returncode == 0, r.stderr
    assert "slots [0] finished in an earlier run" in r.stderr
    assert os.stat(f"{out}/_ranks/0.json").st_mtime_ns == slot0
    assert _as_set(out) == _as_set(ref)   # 2 slots: the same records (slot order differs from 1 slot)
    # and a third run finds it finished
    r = run_cli("prep", *common, f"out_dir={out}", "num_workers=2")
    assert r.returncode == 0 and "nothing to do" in r.stderr


@pytest.mark.slow
def test_launcher_ranks_share_the_work(tmp_path):
    """RANK/WORLD_SIZE as a launcher sets them: two processes, one output, same set as one process."""
    import subprocess
    import sys
    root = kaggle_tree(str(tmp_path / "poems"), n=50)
    args = ["prep", "yamls/prep/folder_tree.yaml", f"data.path={root}", f"out_dir={tmp_path}/ranks"]
    procs = [subprocess.Popen([sys.executable, "-m", "launch.cli", *args], cwd=os.path.dirname(os.path.dirname(__file__)),
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert os.path.isdir(f"{tmp_path}/ranks/train/1") and os.path.exists(f"{tmp_path}/ranks/_done.json")
    prep_job.run(load([*args[2:3], f"out_dir={tmp_path}/one"], args[1]))
    for split in SPLITS:
        assert {r["id"] for r in read_split(f"{tmp_path}/ranks", split)} == \
               {r["id"] for r in read_split(f"{tmp_path}/one", split)}


# ---------------------------------------------------------------------------------------------
# long poems: cut into pieces that fit, not dropped

MAX = 60   # clean.max_tokens in these tests; poem() lines are 7 tokens, its 4-line stanzas 28
ALL_LABELS = {"title": "The Long Road", "author": "A. Poet", "form": "ode", "topic": "sea",
              "meter": "iambic tetrameter"}


def long_poems() -> list[str]:
    """Over MAX tokens: five stanzas (two fit in a piece); a stanza alone too long (cut between
    lines); one line alone too long (cut between words)."""
    several = ["\n\n".join(poem(1000 * k + s) for s in range(5)) for k in range(1, 7)]
    return [*several, poem(900) + "\n\n" + poem(901, lines=12), poem(902) + "\n\n" + " ".join(WORDS * 3)]


def check_pieces(out: str, poems: list[str], source: str, labels=None, split_cfg=(0.3, 0.3, "latentverse")) -> dict:
    """Each long poem is pieces 0..n-1 that fit, whose texts (with what followed each) give the
    poem's cleaned text, all with its labels, its poem_id and the poem's split. {poem_id: rows}"""
    rows = [dict(r, split=split) for split, rs in read_all(out).items() for r in rs]
    by_poem = {}
    for r in rows:
        by_poem.setdefault(r["poem_id"], []).append(r)
    found = {}
    for k, text in enumerate(poems):
        cleaned = normalize_text(text)
        pid = f"{source}-{digest(cleaned).hex()[:16]}"
        pieces = sorted(by_poem.get(pid, []), key=lambda r: r["piece"])
        assert len(pieces) > 1, (k, pid, sorted(by_poem))
        assert [r["piece"] for r in pieces] == list(range(len(pieces)))
        assert {r["pieces"] for r in pieces} == {len(pieces)}
        assert [r["id"] for r in pieces] == [f"{pid}-p{p}" for p in range(len(pieces))]
        assert all(0 < count_tokens(r["text"]) == r["n_tokens"] <= MAX for r in pieces)
        assert "".join(r["text"] + r["piece_sep"] for r in pieces) == cleaned
        assert {r["split"] for r in pieces} == {split_of(digest(near_key(cleaned)), *split_cfg)}
        for label in LABELS:
            assert len({r[label] for r in pieces}) == 1, (k, label)
        if labels is not None:
            assert {label: pieces[0][label] for label in labels} == labels
        assert len({r["prompt"] for r in pieces}) == 1
        found[pid] = pieces
    # several poems, and their pieces land in more than one split: a split per piece would scatter them
    assert len({r["split"] for ps in found.values() for r in ps}) > 1
    return found


def test_long_poems_become_pieces_in_a_folder_tree(tmp_path):
    root = str(tmp_path / "poems")
    longs = long_poems()
    for k, text in enumerate(longs):
        write(f"{root}/forms/ode/long{k}.txt", text)
    write(f"{root}/topics/sea/long0.txt", longs[0])                  # the same poem under a topic: merged
    write(f"{root}/topics/sea/stanza.txt", longs[1].split("\n\n")[0])  # one stanza of a long poem: a poem
    write(f"{root}/topics/sea/copy.txt", longs[2].upper())           # a near copy of a long poem: dropped
    for k in range(5):
        write(f"{root}/forms/ode/short{k}.txt", poem(k))
    common = [f"data.path={root}", *NO_BUNDLED, f"clean.max_tokens={MAX}", "split.val=0.3", "split.test=0.3"]
    out = f"{tmp_path}/out"
    stats = prep_job.run(load([*common, f"out_dir={out}"], "yamls/prep/folder_tree.yaml"))
    found = check_pieces(out, longs, "folder")
    seps = [{r["piece_sep"] for r in ps} for ps in found.values()]
    assert all(s == {"\n\n", ""} for s in seps[:6])           # whole stanzas
    assert "\n" in seps[6] and " " in seps[7]                  # a stanza cut between lines, a line between words
    assert all("\n\n" in r["text"] for ps in list(found.values())[:6] for r in ps[:-1])  # two stanzas a piece
    l0 = list(found.values())[0]
    assert {(r["title"], r["form"], r["topic"], r["prompt"]) for r in l0} == {("long0", "ode", "sea", "ode about sea")}
    rows = [r for rs in read_all(out).values() for r in rs]
    n_pieces = sum(len(ps) for ps in found.values())
    assert stats["records"] == len(rows) == n_pieces + 5 + 1
    stanza = [r for r in rows if r["title"] == "stanza"]
    assert len(stanza) == 1 and (stanza[0]["piece"], stanza[0]["pieces"]) == (0, 1) and stanza[0]["piece_sep"] == ""
    assert stanza[0]["poem_id"] == stanza[0]["id"]
    assert stats["long_poems"] == {"mode": "split", "poems_split": len(longs), "pieces": n_pieces}
    assert stats["repaired"]["split_long"]["count"] == len(longs) and "too_long" not in stats["skipped"]
    assert stats["skipped"]["duplicate_near"]["files"] == ["topics/sea/copy.txt"]
    assert stats["skipped"]["duplicate_exact"]["files"] == ["topics/sea/long0.txt"]

    # two slots cut and place the same pieces
    two = f"{tmp_path}/two"
    prep_job.run(load([*common, f"out_dir={two}", "num_workers=2"], "yamls/prep/folder_tree.yaml"))
    for split in SPLITS:
        assert {tuple(sorted(r.items())) for r in read_split(out, split)} == \
               {tuple(sorted(r.items())) for r in read_split(two, split)}

    # long_poems=skip: the old behaviour, long poems (and their copies) dropped as too_long
    skip = f"{tmp_path}/skip"
    stats = prep_job.run(load([*common, f"out_dir={skip}", "clean.long_poems=skip"], "yamls/prep/folder_tree.yaml"))
    rows = [r for rs in read_all(skip).values() for r in rs]
    assert stats["records"] == len(rows) == 5 + 1 and all(r["pieces"] == 1 for r in rows)
    assert stats["skipped"]["too_long"]["count"] == len(longs) + 2 and "split_long" not in stats["repaired"]
    assert stats["long_poems"] == {"mode": "skip", "poems_split": 0, "pieces": 0}


def test_long_poems_become_pieces_in_jsonl_csv_wds(tmp_path):
    import csv
    import webdataset as wds
    longs = long_poems()
    shorts = [poem(k) for k in range(4)]
    common = [*NO_BUNDLED, f"clean.max_tokens={MAX}", "split.val=0.3", "split.test=0.3"]

    write(f"{tmp_path}/j/a.jsonl", "".join(json.dumps({"text": t, **ALL_LABELS}) + "\n" for t in longs + shorts))
    out = f"{tmp_path}/oj"
    stats = prep_job.run(load([f"data.path={tmp_path}/j", f"out_dir={out}", *common], "yamls/prep/jsonl.yaml"))
    found = check_pieces(out, longs, "jsonl", ALL_LABELS)
    assert stats["records"] == sum(map(len, found.values())) + len(shorts)
    assert stats["repaired"]["split_long"]["files"] == [f"a.jsonl:{k + 1}" for k in range(len(longs))]

    buf = io.StringIO()
    w = csv.DictWriter(buf, ["text", *ALL_LABELS])
    w.writeheader()
    for t in longs + shorts:
        w.writerow({"text": t, **ALL_LABELS})
    write(f"{tmp_path}/c/a.csv", buf.getvalue())
    out = f"{tmp_path}/oc"
    stats = prep_job.run(load([f"data.path={tmp_path}/c", "data.format=csv", f"out_dir={out}", *common]))
    found = check_pieces(out, longs, "csv", ALL_LABELS)
    assert stats["long_poems"]["poems_split"] == len(longs)

    os.makedirs(f"{tmp_path}/w")
    with wds.TarWriter(f"{tmp_path}/w/shard-000.tar") as tw:
        for k, t in enumerate(longs + shorts):
            tw.write({"__key__": f"s{k:03d}", "txt": t, "json": ALL_LABELS})
    out = f"{tmp_path}/ow"
    stats = prep_job.run(load([f"data.path={tmp_path}/w", "data.format=wds", f"out_dir={out}", *common]))
    check_pieces(out, longs, "wds", ALL_LABELS)
    assert stats["long_poems"]["poems_split"] == len(longs)


def test_missing_text_column_is_one_line_before_any_work(tmp_path):
    write(f"{tmp_path}/c/a.csv", "text,topic\nmoon river stone wind,sea\n")
    write(f"{tmp_path}/c/b.csv", "title,author,poem\nx,y,z\n")
    r = run_cli("prep", f"data.path={tmp_path}/c", "data.format=csv", f"out_dir={tmp_path}/oc", *NO_BUNDLED)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"{tmp_path}/c/b.csv: no column 'text' (data.text_column); found: title, author, poem"]
    assert not os.path.exists(f"{tmp_path}/oc")
    # JSONL: no record of the file has the key (a record without it among others is skipped, counted)
    write(f"{tmp_path}/j/a.jsonl", "".join(json.dumps({"poem": poem(k), "form": "ode"}) + "\n" for k in range(3)))
    r = run_cli("prep", "yamls/prep/jsonl.yaml", f"data.path={tmp_path}/j", f"out_dir={tmp_path}/oj")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"{tmp_path}/j/a.jsonl: no record has the key 'text' (data.text_column); found: form, poem"]
    assert not os.path.exists(f"{tmp_path}/oj")
    # the key named: it runs
    stats = prep_job.run(load([f"data.path={tmp_path}/j", f"out_dir={tmp_path}/oj", "data.text_column=poem"],
                              "yamls/prep/jsonl.yaml"))
    assert stats["records"] == 3
