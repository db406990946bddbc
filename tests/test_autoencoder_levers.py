"""The two levers against a decoder that ignores the latent: a decoder-token-dropout schedule and a
bag-of-words auxiliary loss on the decoder memory."""
import pytest
import torch

from trainer.base import config as C
from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder

from .test_autoencoder import POEMS, TINY, make, tok  # noqa: F401  (the same tiny model and its tokenizer)


def test_schedule_values_at_given_steps():
    cfg = AutoencoderConfig(decoder_token_dropout=0.1, decoder_token_dropout_start=1.0,
                            decoder_token_dropout_end=0.3, decoder_token_dropout_anneal_steps=100)
    assert cfg.token_dropout_at(0) == 1.0
    assert cfg.token_dropout_at(50) == pytest.approx(0.65)
    assert cfg.token_dropout_at(100) == pytest.approx(0.3)
    assert cfg.token_dropout_at(10_000) == pytest.approx(0.3)
    # Without a schedule the fixed value keeps its old meaning at every step.
    assert AutoencoderConfig(decoder_token_dropout=0.25).token_dropout_at(12345) == 0.25


def test_full_dropout_masks_every_decoder_input_but_the_start(tok):
    m = make(tok, decoder_token_dropout_start=1.0, decoder_token_dropout_end=0.0,
             decoder_token_dropout_anneal_steps=10)
    enc = m.tokenize(POEMS)
    seen = {}
    def grab(mod, args, out):
        seen["ids"] = args[0]

    hook = m.bart.model.decoder.embed_tokens.register_forward_hook(grab)
    m.train()
    m.train_step = 0
    m(**enc)
    hook.remove()
    ids, real = seen["ids"], enc["attention_mask"]
    assert ids[0, 0].item() == m.decoder_start_id
    # Positions 1.. of real tokens are all <mask> at step 0 (schedule start 1.0).
    inner = real[:, :-1].bool()
    assert (ids[:, 1:][inner] == tok.mask_token_id).all()


def test_bow_loss_has_gradient_into_the_encoder_and_falls_on_a_tiny_overfit(tok):
    m = make(tok, bow_loss_weight=1.0)
    enc = m.tokenize(POEMS)
    m.train()
    out = m(**enc)
    assert torch.isclose(out["loss"], out["reconstruction_loss"] + out["bow_loss"])
    out["bow_loss"].backward()
    g = m.perceiver.latents.grad
    assert g is not None and g.abs().sum() > 0
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = m(**enc)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first if first is not None else out["bow_loss"].item()
    assert out["bow_loss"].item() < 0.8 * first


def test_bow_head_survives_save_and_load(tok, tmp_path):
    m = make(tok, bow_loss_weight=0.5).eval()
    m.save_pretrained(str(tmp_path / "ae"))
    m2 = LatentAutoencoder.from_pretrained(str(tmp_path / "ae"))
    assert torch.equal(m2.bow_head.weight, m.bow_head.weight)
    enc = m.tokenize(POEMS)
    assert torch.equal(m(**enc)["loss"], m2(**enc)["loss"])


def test_without_levers_no_bow_head_and_loss_is_reconstruction(tok):
    m = make(tok)
    assert m.bow_head is None
    out = m.train()(**m.tokenize(POEMS))
    assert "bow_loss" not in out and torch.equal(out["loss"], out["reconstruction_loss"])


@pytest.mark.parametrize("bad", [{"decoder_token_dropout_start": 1.0},
                                 {"decoder_token_dropout_start": 1.5, "decoder_token_dropout_end": 0.3},
                                 {"decoder_token_dropout_anneal_steps": -1}, {"bow_loss_weight": -1.0}])
def test_lever_config_refuses_bad_values_in_one_line(bad):
    with pytest.raises(C.ConfigError) as e:
        C.from_dict(AutoencoderConfig, bad, source="x.yaml")
    msg = str(e.value)
    assert msg.startswith("x.yaml: "), msg          # the file
    assert any(key in msg for key in bad), msg      # and the key given
    assert "\n" not in msg


def decoder_inputs(m):
    """(the latents of POEMS, what the decoder side reads from them in evaluation, and in training)."""
    enc = m.tokenize(POEMS)
    seen = []
    hook = m.reconstruction.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    m.eval()
    z = m.encode_ids(**enc)
    m(**enc)
    torch.manual_seed(0)
    m.train()
    m(**enc)
    hook.remove()
    return z, seen[0], seen[1]


def test_latent_noise_reaches_the_decoder_in_training_only_and_stays_on_the_sphere(tok):
    m = make(tok, latent_noise=0.5)
    z, clean, noisy = decoder_inputs(m)
    assert torch.equal(clean, z)                                      # evaluation: the clean latent
    assert not torch.allclose(noisy, z, atol=1e-3)
    assert torch.allclose(noisy.norm(dim=-1), torch.full(noisy.shape[:2], 64 ** 0.5), atol=1e-4)
    # Without the lever training reads the clean latent too.
    m0 = make(tok)
    assert torch.equal(m0.train().noised(z), z)
    with pytest.raises(C.ConfigError, match="latent_noise"):
        C.from_dict(AutoencoderConfig, {"latent_noise": -0.1}, source="x.yaml")


def test_latent_prior_keeps_the_covariance_and_reaches_the_decoder_in_training_only(tok):
    m = make(tok)
    n = 32 * 64
    g = torch.Generator().manual_seed(0)
    factor = torch.zeros(n, 3)                       # a rank-3 Gaussian with known covariance
    factor[:3, :3] = torch.tensor([[2.0, 0, 0], [1.0, 1.0, 0], [0, 0, 0.5]])
    mean = torch.zeros(n)
    mean[5] = 3.0
    with pytest.raises(ValueError, match="prior mix"):
        m.set_latent_prior(mean, factor, 0.0)
    m.set_latent_prior(mean, factor, 1.0)
    z = (mean + torch.randn(20000, 3, generator=g) @ factor.T).reshape(-1, 32, 64)
    m.perceiver.l2_normalize = False                 # the raw mixing, without the sphere
    torch.manual_seed(1)
    out = m.noised(z).reshape(len(z), -1)
    cov = torch.cov(out[:, :3].T)
    assert torch.allclose(cov, factor[:3] @ factor[:3].T, atol=0.15)        # the covariance is kept
    assert abs(float(out[:, 5].mean()) - 3.0) < 0.05 and float(out[:, 6:].abs().max()) == 0.0
    # ... while each latent moves toward an independent draw: correlation with its own latent < 1.
    r = float(torch.corrcoef(torch.stack([z.reshape(len(z), -1)[:, 0], out[:, 0]]))[0, 1])
    assert 0.5 < r < 0.9
    m.perceiver.l2_normalize = True
    zc, clean, mixed = decoder_inputs(m)
    assert torch.equal(clean, zc)                    # evaluation reads the clean latent
    assert not torch.allclose(mixed, zc, atol=1e-3)
    assert torch.allclose(mixed.norm(dim=-1), torch.full(zc.shape[:2], 8.0), atol=1e-4)
