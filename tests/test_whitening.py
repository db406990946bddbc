"""data.normalize=whiten (trainer/data/whitening.py, trainer/data/loaders.py): the whitening's round trip,
whitened training latents with mean 0 and covariance I, the loader's batches, and the claim the lever
rests on: an untrained MoE DiT (zero output) under EDM preconditioning with sigma_data 1 is, on
whitened latents, the best linear denoiser, so the evaluation's denoiser ÷ linear ratio is 1.00 at init."""
import os
import types

import numpy as np
import pytest
import torch

from trainer.base.config import ConfigError
from trainer.data.loaders import LatentDataConfig, LatentNormalizer, build_latent_dataloader, load_latent_stats
from trainer.data.whitening import Whitening

SHAPE = (4, 6)


def correlated_latents(n, seed=0, shape=SHAPE):
    """Latents [n, T, C] with one strongly anisotropic covariance (eigenvalues 0.01 .. 9) and a mean."""
    d = shape[0] * shape[1]
    g = torch.Generator().manual_seed(100)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    mix = q * torch.logspace(-1, 0.5, d, dtype=torch.float64)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mix.T
    return (x + torch.linspace(-1, 1, d, dtype=torch.float64)).float().reshape(n, *shape)


def test_round_trip_and_whitened_training_latents_have_mean_0_and_covariance_I():
    train, held = correlated_latents(6000, 0), correlated_latents(6000, 1)
    w = Whitening.fit(train)
    torch.testing.assert_close(w.whiten, w.whiten.T, atol=1e-5, rtol=0)          # ZCA: symmetric
    x = w(train)
    assert x.shape == train.shape
    flat = x.reshape(len(x), -1).double()
    assert float(flat.mean(0).abs().max()) < 1e-4
    assert float((torch.cov(flat.T) - torch.eye(flat.shape[1])).abs().max()) < 1e-3
    torch.testing.assert_close(w.inverse(w(held)), held, atol=1e-4, rtol=1e-4)
    # held-out latents of the same distribution: covariance I up to sampling error (~sqrt(d / n))
    hf = w(held).reshape(len(held), -1).double()
    assert float((torch.cov(hf.T) - torch.eye(hf.shape[1])).norm() / hf.shape[1] ** 0.5) < 0.1
    # fewer latents than numbers: the floor keeps W finite, the round trip exact, and the fitted directions
    # (n - 1 of them) at unit variance, the rest below
    few = train[:10]
    wf = Whitening.fit(few)
    assert torch.isfinite(wf.whiten).all()
    torch.testing.assert_close(wf.inverse(wf(held)), held, atol=1e-3, rtol=1e-3)
    ev = torch.linalg.eigvalsh(torch.cov(wf(few).reshape(10, -1).double().T))
    assert int((ev > 0.999).sum()) == 9 and float(ev.max()) < 1.001
    assert wf.floored == SHAPE[0] * SHAPE[1] - 9 and w.floored == 0


def test_normalizer_whiten_mode_and_the_loader_batches(tmp_path):
    from trainer.data.synthetic import write_latent_shards
    from streaming import StreamingDataset

    shards = write_latent_shards(tmp_path, n_train=40, n_val=8, tokens=SHAPE[0], dim=SHAPE[1])
    stats = load_latent_stats(os.path.join(shards["train"], "latent_stats.json"))
    raw = StreamingDataset(local=shards["train"], shuffle=False, batch_size=1)
    lat = torch.stack([torch.from_numpy(raw[i]["latent"].astype(np.float32)) for i in range(len(raw))])
    w = Whitening.fit(lat)
    n = LatentNormalizer(stats, "whiten", w)
    assert n.sigma_data == 1.0
    torch.testing.assert_close(n(lat), w(lat))
    torch.testing.assert_close(n.inverse(n(lat)), lat, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="normalize whiten: needs the fitted whitening"):
        LatentNormalizer(stats, "whiten")
    cfg = LatentDataConfig(path=shards["train"], normalize="whiten", drop_last=False)
    with pytest.raises(ConfigError, match="^data.normalize: whiten needs the whitening"):
        build_latent_dataloader(cfg, batch_size=8)
    loader, norm = build_latent_dataloader(cfg, batch_size=8, whitening=w)
    for batch in loader:
        for j, i in enumerate(batch["sample_index"].tolist()):
            torch.testing.assert_close(batch["latent"][j], w(lat[i]))


def tiny_moe_dit(shape=SHAPE):
    from trainer.models.denoisers import DenoiserConfig, MoEDiTConfig, build_denoiser

    torch.manual_seed(0)
    return build_denoiser(DenoiserConfig(latent_tokens=shape[0], latent_dim=shape[1], prompt_dim=0,
                                         moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, patch_mixer_depth=1,
                                                              num_experts=2)))


def init_ratio(train, held, normalizer, sigma):
    """The generation evaluation's check (denoiser_vs_linear, GaussianLatents fitted in the normalised
    space) of an untrained EDMPrecond(MoE DiT) with the normaliser's sigma_data: its error ÷ the linear one's."""
    from trainer.diffusion.edm import EDMPrecond
    from trainer.evaluation.generation import denoiser_vs_linear
    from trainer.evaluation.metrics import GaussianLatents
    from trainer.models.denoisers.interface import Prompt

    net = EDMPrecond(tiny_moe_dit(), sigma_data=normalizer.sigma_data).eval()
    pipe = types.SimpleNamespace(net=net, device="cpu", encode_prompts=lambda prompts: Prompt())
    gauss = GaussianLatents(train.numpy(), normalizer)
    e = denoiser_vs_linear(pipe, gauss, held.numpy(), [""] * len(held), sigmas=(sigma,), seed=3)[str(sigma)]
    return e["denoiser"] / e["linear"]


@pytest.mark.parametrize("sigma", [0.4, 0.8])
def test_an_untrained_denoiser_on_whitened_latents_is_the_best_linear_denoiser(sigma):
    train, held = correlated_latents(8000, 0), correlated_latents(2000, 1)
    stats = {"channel_mean": train.mean((0, 1)).tolist(), "channel_std": train.std((0, 1)).tolist(),
             "std": float(train.std()), "sigma_data": float(train.std((0, 1)).pow(2).mean().sqrt())}
    whiten = LatentNormalizer(stats, "whiten", Whitening.fit(train))
    # the DiT's output is zero at init: D(x; sigma) = x / (1 + sigma^2), the Wiener filter of N(0, I)
    from trainer.diffusion.edm import EDMPrecond

    x = torch.randn(3, *SHAPE)
    with torch.no_grad():
        out = EDMPrecond(tiny_moe_dit(), sigma_data=1.0)(x, torch.tensor(sigma)).sample
    torch.testing.assert_close(out, x / (1 + sigma ** 2), atol=1e-6, rtol=0)
    assert init_ratio(train, held, whiten, sigma) == pytest.approx(1.0, abs=0.01)
    # centred latents (the default) start far from it: isotropic shrinkage of an anisotropic Gaussian
    center = LatentNormalizer(stats, "center")
    assert init_ratio(train, held, center, sigma) > 1.3
