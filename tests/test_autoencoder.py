"""The BART-Perceiver autoencoder as a plain PyTorch module: shapes, save/load, frozen BART, learning, errors."""
import math

import pytest
import torch

from trainer.base import config as C
from trainer.base.config import UserError
from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
from trainer.models.tokenizers import save_tokenizer, train_bpe

from .tiny import fit

torch.set_num_threads(1)

POEMS = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:",
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date;",
    "The woods are lovely, dark and deep,\nBut I have promises to keep,",
    "Because I could not stop for Death,\nHe kindly stopped for me;",
]
TINY = dict(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=64, perceiver_depth=1,
            perceiver_heads=2, perceiver_dim_head=16, reconstruction_depth=1, max_tokens=32)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([line for p in POEMS for line in p.split("\n")] * 10, vocab_size=300, min_frequency=1)


def make(tok, **kw):
    torch.manual_seed(0)
    return LatentAutoencoder(AutoencoderConfig(**{**TINY, **kw}), tok)


def test_shapes_and_per_slot_norm(tok):
    m = make(tok).eval()
    z = m.encode(POEMS)
    assert z.shape == (4, 32, 64)
    assert torch.allclose(z.norm(dim=-1), torch.full((4, 32), math.sqrt(64)), atol=1e-4)
    out = m(**m.tokenize(POEMS))
    assert out["logits"].shape[:2] == out["labels"].shape and out["logits"].shape[-1] == len(tok)
    assert m.reconstruct(z).shape == (4, 32, 32)  # [B, slots, d_model]
    texts = m.decode(z, max_length=8)
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    short = make(tok, max_tokens=6)                     # what a latent can hold: the first max_tokens tokens
    clipped = short.clip_texts(POEMS[:2])
    assert all(p.startswith(c) and 0 < len(c) < len(p) for c, p in zip(clipped, POEMS))
    assert make(tok, max_tokens=128).clip_texts(POEMS) == POEMS   # texts that fit come back whole


def test_latent_does_not_depend_on_batch_padding(tok):
    m = make(tok).eval()
    alone = m.encode(POEMS[3:])
    batched = m.encode(POEMS)[3:]
    assert torch.allclose(alone, batched, atol=1e-4)


def test_save_load_round_trip_is_identical(tok, tmp_path):
    m = make(tok).eval()
    m.save_pretrained(str(tmp_path / "ae"))
    m2 = LatentAutoencoder.from_pretrained(str(tmp_path / "ae"))
    z, z2 = m.encode(POEMS), m2.encode(POEMS)
    assert torch.equal(z, z2)
    enc = m.tokenize(POEMS)
    assert torch.equal(m(**enc)["logits"], m2(**enc)["logits"])
    assert torch.equal(m.generate_ids(z, 10), m2.generate_ids(z, 10))
    assert m2.tokenizer(POEMS[0])["input_ids"] == tok(POEMS[0])["input_ids"]
    # Saving again over an existing dir replaces it (temp dir + rename) and still loads.
    m2.save_pretrained(str(tmp_path / "ae"))
    assert torch.equal(LatentAutoencoder.from_pretrained(str(tmp_path / "ae")).encode(POEMS), z)


def train_steps(m, steps, lr=3e-3):
    return fit(m, POEMS, steps, lr)


def test_a_few_steps_lower_the_loss(tok):
    losses = train_steps(make(tok, decoder_token_dropout=0.2), 25)
    assert losses[-1] < 0.7 * losses[0]


def test_frozen_pretrained_bart_gets_no_gradient_and_does_not_change(tok, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    # A tiny BART saved to disk plays the downloaded facebook/bart-base, tokenizer files included.
    bc = BartConfig(vocab_size=len(tok), d_model=48, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                    pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    torch.manual_seed(1)
    BartForConditionalGeneration(bc).save_pretrained(str(tmp_path / "bart"))
    save_tokenizer(tok, str(tmp_path / "bart_tok"))
    m = make(tok, pretrained_path=str(tmp_path / "bart"))
    assert m.frozen and m.bart.config.d_model == 48
    before = {k: v.clone() for k, v in m.bart.state_dict().items()}
    perceiver_before = [p.clone() for p in m.perceiver.parameters()]
    m.train()
    assert not m.bart.training  # frozen BART keeps dropout off
    loss = m(**m.tokenize(POEMS))["loss"]
    loss.backward()
    assert all(p.grad is None for p in m.bart.parameters())
    assert all(p.grad is not None for p in m.perceiver.parameters())
    assert all(p.grad is not None for p in m.reconstruction.parameters())
    train_steps(m, 3)
    after = m.bart.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(a, b) for a, b in zip(perceiver_before, m.perceiver.parameters()))
    # The export carries the frozen BART's weights and still loads without the original path.
    import shutil

    m.save_pretrained(str(tmp_path / "ae"))
    shutil.rmtree(tmp_path / "bart")
    m2 = LatentAutoencoder.from_pretrained(str(tmp_path / "ae"))
    assert m2.frozen and torch.equal(m2.encode(POEMS), m.eval().encode(POEMS))


def test_unfrozen_pretrained_bart_trains(tok, tmp_path):
    from transformers import BartConfig, BartForConditionalGeneration

    bc = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                    decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    BartForConditionalGeneration(bc).save_pretrained(str(tmp_path / "bart"))
    m = make(tok, pretrained_path=str(tmp_path / "bart"), freeze_bart=False)
    m(**m.tokenize(POEMS))["loss"].backward()
    assert not m.frozen and all(p.grad is not None for p in m.bart.model.encoder.parameters())


@pytest.mark.parametrize("shape", [(2, 32, 63), (2, 31, 64), (32, 64)])
def test_wrong_latent_shape_is_one_line(tok, shape):
    m = make(tok).eval()
    with pytest.raises(UserError) as e:
        m.decode(torch.zeros(shape))
    assert "[batch, 32, 64]" in str(e.value) and "\n" not in str(e.value)


def test_bad_pretrained_path_is_one_line(tok, tmp_path):
    (tmp_path / "notbart").mkdir()
    with pytest.raises(UserError) as e:
        make(tok, pretrained_path=str(tmp_path / "notbart"))
    assert "pretrained_path" in str(e.value) and "\n" not in str(e.value)


def test_not_an_autoencoder_dir(tmp_path):
    with pytest.raises(UserError, match=r"not an autoencoder folder \(no autoencoder_config.json\)$"):
        LatentAutoencoder.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("bad", [{"max_tokens": 1024}, {"pretrained_path": "/no/such/bart"},
                                 {"decoder_token_dropout": 1.0}])
def test_config_refuses_bad_values_in_one_line(bad):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(AutoencoderConfig, bad, source="x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: ") and next(iter(bad)) in msg and "\n" not in msg


def test_gumbel_max_draws_from_the_softmax_at_the_temperature():
    """The sampled readings' processor: the argmax of scores / T plus its noise is a draw from
    softmax(scores / T); a token ruled out stays out; the same generator seed, the same draws."""
    import math

    from trainer.models.autoencoder import _GumbelMax

    scores = torch.tensor([[0.0, math.log(2.0), float("-inf"), -1.0]]).repeat(20000, 1)
    for t in (1.0, 0.5):
        picks = _GumbelMax(t, torch.Generator().manual_seed(0))(None, scores).argmax(-1)
        p = torch.softmax(scores[0] / t, -1)
        freq = torch.bincount(picks, minlength=4) / len(picks)
        assert freq[2] == 0 and torch.allclose(freq, p, atol=0.015), (t, freq, p)
    a = _GumbelMax(0.7, torch.Generator().manual_seed(3))(None, scores[:50])
    assert torch.equal(a, _GumbelMax(0.7, torch.Generator().manual_seed(3))(None, scores[:50]))
