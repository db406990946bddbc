"""The best linear denoiser (trainer/diffusion/linear.py) and the diffusion job's eval metric built on it,
eval/EMAvsLinear_<sigma>: the EMA denoiser's squared error on noised eval latents ÷ the Wiener filter's."""
import json

import pytest
import torch
from torch import nn

from trainer.diffusion.edm import EDMLoss
from trainer.diffusion.linear import LinearDenoiser
from trainer.models.denoisers.interface import DenoiserOutput
from trainer.training.diffusion_model import DiffusionComposerModel


def gaussian_latents(n, seed=0, shape=(4, 3)):
    d = shape[0] * shape[1]
    mix = (torch.randn(d, d, generator=torch.Generator().manual_seed(100), dtype=torch.float64)
           * torch.linspace(0.05, 1.5, d, dtype=torch.float64))     # one covariance for every seed
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + 0.3).reshape(n, *shape)


def test_the_wiener_filter_beats_every_other_shrinkage_on_gaussian_latents():
    train, test = gaussian_latents(20000, 0), gaussian_latents(4000, 1)
    lin = LinearDenoiser.fit(train)
    noisy = test + 0.8 * torch.randn(test.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mse = (lambda d: float((d - test).pow(2).mean()))
    best = mse(lin(noisy, 0.8))
    # the posterior's own expected error, the mean over directions of ev sigma^2 / (ev + sigma^2), at two
    # noise levels (sampling error of these means ~0.7%)
    for sigma in (0.8, 0.25):
        x = test + sigma * torch.randn(test.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        s2 = sigma * sigma
        assert mse(lin(x, sigma)) == pytest.approx(float((lin.ev * s2 / (lin.ev + s2)).mean()), rel=0.02)
    # the same filter at the wrong noise level, or shrinking every direction alike, does worse
    assert best < mse(lin(noisy, 0.4)) and best < mse(lin(noisy, 1.6))
    for a in (0.3, 0.5, 0.7, 0.9):
        assert best < mse(lin.mean.reshape(test.shape[1:]) + a * (noisy - lin.mean.reshape(test.shape[1:])))
    # and its draws have the training latents' covariance
    draws = lin.sample(20000, seed=3).double().reshape(20000, -1)
    want = torch.cov(train.reshape(20000, -1).T)
    assert float((torch.cov(draws.T) - want).norm() / want.norm()) < 0.03


class Fixed(nn.Module):
    """A stand-in for the EMA net whose output the metric must score: f(x, sigma)."""

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x, sigma, prompt=None, **kw):
        return DenoiserOutput(self.f(x, round(float(sigma.reshape(-1)[0]), 6)), None)


def ratio(model, batch, sigma):
    key = f"EMAvsLinear_{sigma:g}"
    metric = model.get_metrics()[key]
    metric.update(model.eval_forward(batch)[key])
    return float(metric.compute())


@pytest.mark.parametrize("sigma", [0.4, 0.8])
def test_eval_metric_is_one_for_the_wiener_filter_itself_and_the_error_ratio_for_another_denoiser(sigma):
    train, val = gaussian_latents(5000, 0).float(), gaussian_latents(64, 1).float()
    lin = LinearDenoiser.fit(train)
    batch = {"latent": val, "sample_index": torch.arange(64)}

    def model_with(f):
        m = DiffusionComposerModel(Fixed(f), EDMLoss(), linear=lin, linear_sigmas=(0.4, 0.8))
        m.ema = Fixed(f)
        m.train_step.loss_fn = lambda net, y, *a, **k: type("O", (), {"per_sample": torch.zeros(len(y))})()
        return m

    assert ratio(model_with(lambda x, s: lin(x.double(), s).float()), batch, sigma) == pytest.approx(1.0, abs=1e-6)
    # the identity (the noisy input as its own estimate): the ratio is noisy MSE ÷ Wiener MSE on the same
    # noise, recomputed here from the noise the metric drew (seeded by the batch's sample indices)
    identity = model_with(lambda x, s: x)
    seen = {}
    identity.ema = Fixed(lambda x, s: seen.setdefault(s, x))
    r = ratio(identity, batch, sigma)
    noisy = seen[sigma]
    expect = float((noisy - val).pow(2).sum() / (lin(noisy.double(), sigma).float() - val).pow(2).sum())
    assert r == pytest.approx(expect, rel=1e-6) and r > 1.1
    # the draws are the same at every evaluation (the same noise for the same batch)
    again = model_with(lambda x, s: x)
    assert ratio(again, batch, sigma) == pytest.approx(r, rel=1e-9)


def test_the_fits_before_training_read_the_training_sample_once(tmp_path, monkeypatch):
    """The prompt-mean fit and the linear check share one read of the spread training records."""
    import os

    from launch.cli import load_config, load_job_module
    from trainer.data.loaders import LatentNormalizer, load_latent_stats
    from trainer.data.synthetic import write_latent_shards
    from trainer.jobs import train_diffusion as T

    from .conftest import ROOT

    shards = write_latent_shards(tmp_path / "lat", n_train=40, n_val=8, prompt_dim=16)
    cfg = load_config(load_job_module("train"), os.path.join(ROOT, "yamls/diffusion/pretrain_masked_tiny_cpu.yaml"),
                      [f"data.path={shards['train']}", f"data.eval_path={shards['val']}", "data.root=", "data.streams=[]",
                       "model.prompt_dim=16", "autoencoder="])
    norm = LatentNormalizer(load_latent_stats(os.path.join(shards["train"], "latent_stats.json")))
    reads = []
    spread = T._spread_records
    monkeypatch.setattr(T, "_spread_records", lambda *a: reads.append(a[0]) or spread(*a))
    sample = T.TrainingSample(cfg, norm)
    T.fit_prompt_mean(cfg, norm, sample)
    linear = T.fitted_linear_denoiser(cfg, sample)
    assert reads == [[shards["train"]], [shards["val"]]] and linear.shape == (32, 64)   # val: the ridge's choice
    assert torch.allclose(linear.mean.float().reshape(32, 64), sample.pairs(cfg.prompt_mean.max_samples)[1].mean(0), atol=1e-5)
