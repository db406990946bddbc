"""Pieces of the prep job: cleaning, long poems cut into pieces, prompts, decoding repairs, the bundled
corpora (slices)."""
import codecs
import dataclasses
import random

import pytest

from data_prep import sources
from trainer.text import prosody
from data_prep.cleaning import count_tokens, digest, near_key, normalize_text, split_long, split_of
from data_prep.prompts import PromptConfig, build_prompt
from data_prep.readers import decode_bytes
from data_prep.report import Report


def test_normalize_keeps_line_breaks_and_folds_the_rest():
    raw = "\ufeffShall I compare\tthee\r\nto a  summer\u00a0day?\r\n\r\n\r\n\r\n  Thou art more lovely \n\n"
    assert normalize_text(raw) == "Shall I compare thee\nto a summer day?\n\nThou art more lovely"
    assert normalize_text("  indented\nline", keep_indent=True) == "  indented\nline"
    # NFC composes, NFKC also folds compatibility forms (the ligature "ﬁ").
    assert normalize_text("cafe\u0301 \ufb01re") == "caf\u00e9 \ufb01re"
    assert normalize_text("cafe\u0301 \ufb01re", form="NFKC") == "caf\u00e9 fire"


def test_token_counter_and_keys():
    assert count_tokens("O'er the hills, and far away!") == 8  # o'er the hills , and far away !
    assert near_key("Hello,  World!\nAgain") == near_key("hello world again") == "helloworldagain"
    assert digest("a") != digest("b") and len(digest("a")) == 16


def test_long_poem_pieces_cut_stanzas_then_lines_then_words():
    poem = "a b c\nd e f g\n\nh i\n\nj k l m n o p q r\ns"   # stanzas of 7, 2 and 10 tokens
    assert split_long(poem, 19) == [(poem, 19, "")]
    # whole stanzas while they fit; the third alone is too long: cut between lines
    assert split_long(poem, 9) == [("a b c\nd e f g\n\nh i", 9, "\n\n"), ("j k l m n o p q r", 9, "\n"), ("s", 1, "")]
    # a line alone too long: cut between words; the pieces of a cut stanza never take in the next one
    assert split_long(poem, 4) == [("a b c", 3, "\n"), ("d e f g", 4, "\n\n"), ("h i", 2, "\n\n"),
                                   ("j k l m", 4, " "), ("n o p q", 4, " "), ("r", 1, "\n"), ("s", 1, "")]
    # a run without spaces: cut between tokens; an indent goes with the words after it
    assert split_long("x\n!!!!!!!", 3) == [("x", 1, "\n"), ("!!!", 3, ""), ("!!!", 3, ""), ("!", 1, "")]
    assert split_long("  a b c", 2) == [("  a b", 2, " "), ("c", 1, "")]
    with pytest.raises(ValueError, match="max_tokens"):
        split_long(poem, 0)
    # any poem: pieces that fit, in order, that give the poem back, and the same pieces every time
    rng = random.Random(0)
    for trial in range(200):
        stanzas = ["\n".join((" " * rng.choice((0, 0, 2))) + " ".join(
            rng.choice(("o'er", "the", "sea", ",", "!", "moon--", "x")) for _ in range(rng.randint(1, 30)))
            for _ in range(rng.randint(1, 9))) for _ in range(rng.randint(1, 6))]
        text = normalize_text("\n\n".join(stanzas), keep_indent=True)
        limit = rng.randint(1, 60)
        pieces = split_long(text, limit)
        assert "".join(p + sep for p, _, sep in pieces) == text, (trial, limit)
        assert all(0 < n == count_tokens(p) <= limit for p, n, _ in pieces), (trial, limit)
        assert all(sep in ("\n\n", "\n", " ", "") for _, _, sep in pieces[:-1]) and pieces[-1][2] == ""
        assert split_long(text, limit) == pieces
        if count_tokens(text) <= limit:
            assert pieces == [(text, count_tokens(text), "")]


def test_split_is_a_function_of_the_text_and_roughly_the_fractions():
    splits = [split_of(digest(near_key(f"poem {i}")), 0.1, 0.1, "s") for i in range(5000)]
    assert splits == [split_of(digest(near_key(f"poem {i}")), 0.1, 0.1, "s") for i in range(5000)]
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        assert abs(splits.count(name) / 5000 - frac) < 0.03
    # another salt reshuffles
    assert splits != [split_of(digest(near_key(f"poem {i}")), 0.1, 0.1, "t") for i in range(5000)]


def test_prompts_from_labels():
    cfg = PromptConfig()
    assert build_prompt({"form": "sonnet", "topic": "love"}, cfg) == "sonnet about love"
    assert build_prompt({"form": "tanka", "author": "Ono no Komachi"}, cfg) == "tanka by Ono no Komachi"
    assert build_prompt({"form": "stanza", "meter": "iambic pentameter"}, cfg) == "stanza in iambic pentameter"
    assert build_prompt({"topic": "nature"}, cfg) == "poem about nature"
    assert build_prompt({"title": "only a title"}, cfg) == ""
    assert build_prompt({}, cfg) == ""
    custom = PromptConfig(parts=["a {form}", "on {topic}"], noun="verse")
    assert build_prompt({"topic": "sea"}, custom) == "verse on sea"
    with pytest.raises(ValueError, match="unknown label"):
        PromptConfig(parts=["{colour}"])


def test_decode_repairs_and_skips_with_names():
    r = Report()
    assert decode_bytes(codecs.BOM_UTF8 + b"hi\r\nthere", "bom.txt", r) == "hi\r\nthere"
    assert decode_bytes("caf\u00e9".encode("cp1252"), "latin.txt", r) == "caf\u00e9"
    assert decode_bytes("hi".encode("utf-16"), "u16.txt", r) == "hi"
    assert decode_bytes(b"  \n ", "empty.txt", r) is None
    assert decode_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "img.txt", r) is None
    assert r.repaired["bom"]["files"] == ["bom.txt"] and r.repaired["crlf"]["files"] == ["bom.txt"]
    assert r.repaired["not_utf8"]["files"] == ["latin.txt"] and r.repaired["utf16"]["count"] == 1
    assert r.skipped["empty"]["files"] == ["empty.txt"] and r.skipped["binary"]["files"] == ["img.txt"]


def test_shakespeare_all_154_sonnets():
    recs = list(sources.read_shakespeare(sources.ShakespeareConfig(), Report()))
    assert len(recs) == 154
    assert [r.title for r in recs[:2]] == ["Sonnet 1", "Sonnet 2"] and recs[-1].title == "Sonnet 154"
    assert recs[0].text.strip().startswith("From fairest creatures we desire increase,")
    assert all(r.form == "sonnet" and r.author == "William Shakespeare" for r in recs)
    # 14 lines each, give or take the few irregular ones (99 has 15, 126 has 12)
    lines = [len(normalize_text(r.text).split("\n")) for r in recs]
    assert sum(n == 14 for n in lines) >= 150
    assert sources.roman_to_int("CXLIV") == 144


def test_ogura_tanka_with_poets():
    recs = list(sources.read_ogura(sources.OguraConfig(), Report()))
    assert len(recs) == 100 and all(r.form == "tanka" for r in recs)
    komachi = recs[8]
    assert komachi.author == "Ono no Komachi"
    assert komachi.text.split("\n")[0] == "Color of the flower" and len(komachi.text.split("\n")) == 5
    jp = list(sources.read_ogura(sources.OguraConfig(language="japanese", max_records=3), Report()))
    assert len(jp) == 3 and jp[0].author == "天智天皇" and len(jp[0].text.split("\n")) == 5


def test_gutenberg_slice_stanzas_and_meter():
    cfg = sources.GutenbergConfig(start_line=100, max_stanzas=50, min_lines=2, max_lines=8, unit_stanzas=20)
    units = sources.gutenberg_units(cfg)
    assert len(units) == 3  # 20 + 20 + 10 stanzas
    recs = [r for u in units for r in sources.read_gutenberg(*u.arg, cfg, Report())]
    assert len(recs) == 50
    texts, meters, syllables = sources.gutenberg_lines()
    assert len(texts) == 3085117 == len(meters) == len(syllables)
    assert recs[0].text.split("\n")[0] == texts[100]
    sizes = [len(r.text.split("\n")) for r in recs]
    assert min(sizes) >= 2 and max(sizes) <= 8 and len(set(sizes)) > 1
    # consecutive: stanza k+1 starts where stanza k ended
    assert recs[1].text.split("\n")[0] == texts[100 + sizes[0]]
    # meter = the meter most lines count for (their syllables fitting it), kept when half the lines do
    import collections
    fits = {"iambic trimeter": (6, 7), "trochaic tetrameter": (7, 8), "iambic tetrameter": (8, 9),
            "iambic pentameter": (10, 11), "trochaic pentameter": (9, 10)}
    lo, kept, old_kept = 100, 0, 0
    for r, n in zip(recs, sizes):
        scanned = [(m, s) for m, s in zip(meters[lo:lo + n], syllables[lo:lo + n]) if m != "null"]
        votes = collections.Counter(m for m, s in scanned if s in fits[m])
        ranked = votes.most_common()
        ok = ranked and 2 * ranked[0][1] >= len(scanned) and (len(ranked) == 1 or ranked[1][1] < ranked[0][1])
        assert r.meter == (ranked[0][0] if ok else "")
        if r.meter:
            assert sum(s in fits[r.meter] for m, s in scanned if m == r.meter) * 2 >= len(scanned)
        kept += bool(r.meter)
        lo += n
    assert 0 < kept < len(recs)
    report = Report()
    assert sum(1 for u in units for _ in sources.read_gutenberg(*u.arg, cfg, report)) == 50
    assert report.repaired["meter_unclear"]["count"] == len(recs) - kept
    # the corpus's own labels: two thirds of the lines agreeing keep more stanzas than fitting ones
    old = dataclasses.replace(cfg, meter_syllables=False, meter_agreement=2 / 3)
    lo = 100
    for r, n in zip([r for u in units for r in sources.read_gutenberg(*u.arg, old, Report())], sizes):
        votes = collections.Counter(m for m in meters[lo:lo + n] if m != "null")
        top, count = votes.most_common(1)[0]
        assert r.meter == (top if 3 * count >= 2 * sum(votes.values()) else "")
        old_kept += bool(r.meter)
        lo += n
    assert old_kept > kept
    # meter_agreement=0 without the syllable check: always the majority
    loose = dataclasses.replace(cfg, meter_agreement=0.0, meter_syllables=False)
    assert all(r.meter for u in units for r in sources.read_gutenberg(*u.arg, loose, Report()))
    with pytest.raises(ValueError, match="meter_agreement"):
        sources.GutenbergConfig(meter_agreement=1.5)
    assert [prosody.meter_fits("iambic pentameter", n) for n in (9, 10, 11, 12)] == [False, True, True, False]
    assert [prosody.meter_fits("trochaic tetrameter", n) for n in (6, 7, 8, 9)] == [False, True, True, False]
    assert [prosody.meter_fits("dactylic dimeter", n) for n in (3, 4, 5, 6, 7)] == [False, True, True, True, False]
    assert prosody.meter_fits("free verse", 3)  # a meter it cannot count always fits
    assert prosody.meter_templates("Iambic trimeter") == ["010101", "0101010"]
    assert prosody.meter_templates("dactylic dimeter") == ["100100", "10010", "1001"]
    assert prosody.meter_templates("free verse") == [] == prosody.meter_templates("iambic")
    # same seed, same stanzas; another seed, others
    assert [r.text for u in sources.gutenberg_units(cfg) for r in sources.read_gutenberg(*u.arg, cfg, Report())] \
        == [r.text for r in recs]
    other = sources.GutenbergConfig(start_line=100, max_stanzas=50, min_lines=2, max_lines=8, seed=1)
    assert [r.text for u in sources.gutenberg_units(other) for r in sources.read_gutenberg(*u.arg, other, Report())] \
        != [r.text for r in recs]
