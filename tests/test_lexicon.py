"""Lexically constrained decoding: the spelling automaton, the logits processor inside transformers'
generate (greedy and beam search) on a real tiny autoencoder, save/load, and the pipeline's switch."""
import pytest
import torch

from trainer.base.config import UserError
from trainer.text.words import words
from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
from trainer.models.lexicon import Lexicon, LexiconLogitsProcessor

from .test_autoencoder import POEMS as AE_POEMS
from .test_autoencoder import TINY, tok  # noqa: F401 (tok: the fixture)
from .tiny import fit

torch.set_num_threads(1)

POEMS = AE_POEMS + ["O'er the hills the morning breaks, and all the birds are singing."]


def test_from_texts_counts_words_as_the_metric_does():
    lx = Lexicon.from_texts(["The sea, the SEA!", "o'er the sea", "seas"], min_count=2)
    assert lx.words == {"the", "sea"}
    assert Lexicon.from_texts(["O'er the sea"]).words == {"o'er", "the", "sea"}
    assert {"t", "th", "the", "s", "se", "sea"} <= lx.prefixes and "h" not in lx.prefixes


@pytest.mark.parametrize("text, ok", [
    ("the sea", True), ("The Sea.", True), ("THE SEA", True), ("the se", True),   # "se" is still open
    ("the sae", False), ("tHe", False), ("THe", False), ("theSea", False), ("the sea ", True),
    ("o'er the sea", True), ("'the' sea", True), ("sea's", False), ("12, ... ;\n", True),
    ("mer", False), ("café", False), ("the\u00e9sea", True),  # a non-Latin letter separates words
])
def test_step_accepts_exactly_the_lexicon_spellings(text, ok):
    lx = Lexicon(["the", "sea", "o'er"])
    assert (lx.step("", text) is not None) == ok


def test_open_word_must_end_in_the_lexicon():
    lx = Lexicon(["the", "sea", "o'er"])
    assert lx.step("", "the se") == "se" and not lx.ends("se") and lx.ends("sea") and lx.ends("")
    assert lx.step("", "o'") == "o'" and not lx.ends("o'")      # "o" is no word: the apostrophe must go on
    assert lx.step("", "the'") == "the'" and lx.ends("the'")    # a closing quote after a word


def test_close_drops_an_unfinished_last_word():
    lx = Lexicon(["the", "sea"])
    assert lx.close("the sea, the s") == "the sea, the " and lx.close("the sea") == "the sea"
    assert lx.close("the sea'") == "the sea'"                  # a closing quote


def test_save_load_and_missing(tmp_path):
    lx = Lexicon(["the", "sea", "o'er"])
    lx.save(str(tmp_path))
    assert Lexicon.load(str(tmp_path)).words == lx.words
    assert Lexicon.load(str(tmp_path / "none")) is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "lexicon.txt").write_text("\n")
    with pytest.raises(UserError, match="lexicon.txt: the lexicon is empty"):
        Lexicon.load(str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def briefly_trained(tok):
    """A tiny autoencoder trained for a few steps: it spells, badly."""
    torch.manual_seed(0)
    m = LatentAutoencoder(AutoencoderConfig(**TINY), tok)
    fit(m, POEMS, 10)
    m.lexicon = Lexicon.from_texts(POEMS)
    return m.eval()


@pytest.mark.parametrize("beams", [1, 3])
def test_a_poor_decoder_spells_only_lexicon_words(briefly_trained, beams):
    """A poor decoder on random latents spells junk freely; with the lexicon every word is one of it,
    no poem is empty, and none ends on half a word."""
    m = briefly_trained
    z = torch.randn(6, 32, 64)
    free = m.decode(z, num_beams=beams)
    assert any(w not in m.lexicon.words for t in free for w in words(t))   # the check could fail
    texts = m.decode(z, num_beams=beams, lexicon=True)
    assert all(words(t) for t in texts)
    assert all(w in m.lexicon.words for t in texts for w in words(t)), texts
    for w in (w for t in texts for w in t.split()):                        # written small, Capitalised or in CAPITALS
        assert w == w.lower() or w == w.upper() or w == w.capitalize(), texts


def test_the_first_step_leaves_the_start_of_text_token_alone(tok, briefly_trained):
    """A BART decoder writes <s> first (its training texts are <s> ... </s>): the lexicon must not
    push it off that, or the first word of every poem is spelt from a wrong start."""
    m = briefly_trained
    z = torch.randn(4, 32, 64)
    free, lex = m.generate_ids(z), m.generate_ids(z, lexicon=True)
    assert (free[:, 0] == tok.bos_token_id).all() and (lex[:, 0] == tok.bos_token_id).all()
    proc = LexiconLogitsProcessor(m.lexicon, tok, prefix_len=1, max_length=33)
    start = torch.tensor([[m.decoder_start_id]])
    assert proc(start, torch.zeros(1, len(tok)))[0, tok.bos_token_id] == 0                   # allowed first
    later = torch.tensor([[m.decoder_start_id, tok.bos_token_id]])
    assert proc(later, torch.zeros(1, len(tok)))[0, tok.bos_token_id] == float("-inf")      # not later


@pytest.mark.parametrize("prefix, can_close", [("The woods are lovely, dark and dee", True), ("The w", False)])
def test_the_last_step_closes_the_word_or_ends_the_poem(tok, briefly_trained, prefix, can_close):
    """At the last step every allowed token ends the open word in the lexicon; when no token can,
    only </s> is allowed (and decode drops the unfinished word)."""
    m = briefly_trained
    ids = torch.tensor([[m.decoder_start_id] + tok(prefix, add_special_tokens=False)["input_ids"]])
    proc = LexiconLogitsProcessor(m.lexicon, tok, prefix_len=1, max_length=ids.shape[1] + 1)
    open_word = proc.open_word(ids[0, 1:].tolist())
    assert open_word == prefix.split()[-1]
    closing = [i for i, piece in enumerate(proc.pieces) if i not in proc.special
               and (q := m.lexicon.step(open_word, piece)) is not None and m.lexicon.ends(q)]
    assert bool(closing) == can_close
    scores = proc(ids, torch.zeros(1, len(tok)))
    allowed = [i for i in range(len(tok)) if scores[0, i] > float("-inf")]
    assert allowed == (closing or [tok.eos_token_id])


@pytest.mark.parametrize("last", [False, True])
def test_cached_block_masks_equal_the_token_by_token_definition(tok, last):
    lx = Lexicon.from_texts(POEMS)
    proc = LexiconLogitsProcessor(lx, tok, prefix_len=1, max_length=33, cache_size=3)
    for open_word in ["", "th", "The", "o'", "summer", "summer'", "Sh"]:
        naive = torch.zeros(len(tok), dtype=torch.bool)
        for i, piece in enumerate(proc.pieces):
            printable = all(c.isprintable() or c in "\n\t" for c in piece)
            q = lx.step(open_word, piece) if i not in proc.special and printable else None
            naive[i] = q is not None and (not last or lx.ends(q))
        naive[tok.eos_token_id] = lx.ends(open_word) or not naive.any()
        assert torch.equal(proc.allowed(open_word, last), naive), open_word
        assert len(proc._allowed) <= 3                                    # the cache stays bounded


def test_save_load_keeps_the_lexicon_and_without_one_it_is_one_line(briefly_trained, tmp_path):
    m = briefly_trained
    m.save_pretrained(str(tmp_path / "ae"))
    m2 = LatentAutoencoder.from_pretrained(str(tmp_path / "ae"))
    assert m2.lexicon.words == m.lexicon.words
    z = torch.randn(2, 32, 64)
    spelt = m.decode(z, lexicon=True)
    # lexicon words only, at least one per text: the comparison below is of real texts, not empty strings
    assert all(words(t) and set(words(t)) <= m.lexicon.words for t in spelt), spelt
    assert m2.decode(z, lexicon=True) == spelt
    proc = m2.lexicon_processor(33)
    assert m2.lexicon_processor(33) is proc                                  # kept, with its cached masks
    m2.lexicon = Lexicon(["the"])
    assert m2.lexicon_processor(33) is not proc and m2.lexicon_processor(33).lexicon is m2.lexicon
    m2.lexicon = None
    with pytest.raises(UserError, match="^decode.lexicon: this autoencoder has no lexicon"):
        m2.decode(z, lexicon=True)
