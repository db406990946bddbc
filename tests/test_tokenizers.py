"""The autoencoder's tokenizers: exact round trips (line breaks kept), non-empty vocabularies, clear errors."""
import pytest

from trainer.base.config import UserError
from trainer.models.tokenizers import (TokenizerConfig, build_tokenizer, gpt2_tokenizer, load_tokenizer,
                                       save_tokenizer, train_bpe)

POEMS = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;",
    "  Indented line,\n\n\tafter a blank line and a tab —\n“curly quotes” and naïve café, 秋の田の",
    "The woods are lovely, dark and deep,\nBut I have promises to keep,\n",
]
CORPUS = [line for p in POEMS for line in p.split("\n")] * 20 + ["the and of to a in that is"] * 50


def roundtrip(tok, text):
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    return tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400, min_frequency=1)


@pytest.mark.parametrize("text", POEMS)
def test_bpe_round_trip(bpe, text):
    assert roundtrip(bpe, text) == text


@pytest.mark.parametrize("text", POEMS)
def test_gpt2_round_trip(text):
    tok = gpt2_tokenizer()
    assert roundtrip(tok, text) == text


def test_gpt2_vocabulary_is_the_real_one():
    tok = gpt2_tokenizer()
    assert len(tok) == 50257 + 5  # GPT-2's 50257 entries + BART's special tokens
    # A common word is one token in GPT-2's vocabulary, and " summer" too (byte-level leading space).
    assert len(tok(" summer", add_special_tokens=False)["input_ids"]) == 1
    assert {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id} <= set(range(50257, 50262))


def test_bpe_vocab_size_and_special_ids(bpe):
    assert len(bpe) <= 400
    # BART's layout: <s>=0 <pad>=1 </s>=2 <unk>=3.
    assert (bpe.bos_token_id, bpe.pad_token_id, bpe.eos_token_id, bpe.unk_token_id) == (0, 1, 2, 3)


def test_save_and_load_keeps_ids(bpe, tmp_path):
    save_tokenizer(bpe, str(tmp_path / "tok"))
    again = load_tokenizer(str(tmp_path / "tok"))
    for p in POEMS:
        assert again(p)["input_ids"] == bpe(p)["input_ids"]
        assert roundtrip(again, p) == p


def test_bad_tokenizer_path_is_one_line(tmp_path):
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(UserError) as e:
            load_tokenizer(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_pretrained_kind_needs_a_path():
    with pytest.raises(UserError, match="pretrained_path"):
        build_tokenizer(TokenizerConfig(kind="pretrained"))


def test_gpt2_save_and_load_keeps_ids(tmp_path):
    tok = gpt2_tokenizer()
    save_tokenizer(tok, str(tmp_path / "gpt2"))
    again = load_tokenizer(str(tmp_path / "gpt2"))
    assert len(again) == len(tok)
    for p in POEMS:
        assert again(p)["input_ids"] == tok(p)["input_ids"] and roundtrip(again, p) == p


def test_pretrained_kind_round_trips_from_a_local_folder(bpe, tmp_path):
    """kind=pretrained, as the training job builds it: the tokenizer saved in a local folder (no hub) is
    read from model.pretrained_path into the run's out_dir, with the same ids and exact round trips."""
    from trainer.training.tokenizer_run import run_tokenizer

    src = str(tmp_path / "bart")
    save_tokenizer(bpe, src)
    tok = run_tokenizer(str(tmp_path / "run"), TokenizerConfig(kind="pretrained"), train_local=str(tmp_path / "no-data"),
                        text_column="text", pretrained_path=src)
    assert (tmp_path / "run" / "tokenizer").is_dir() and len(tok) == len(bpe)
    for p in POEMS:
        assert tok(p)["input_ids"] == bpe(p)["input_ids"]
        assert roundtrip(tok, p) == p
