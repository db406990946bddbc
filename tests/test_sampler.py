"""The EDM Heun sampler (and the DDPM baseline) recover a Gaussian data distribution from its exact denoiser."""
import math

import pytest
import torch

from trainer.diffusion.ddpm import DDPM, DDPMConfig
from trainer.diffusion.guidance import drop_prompt
from trainer.diffusion.sampler import SamplerConfig, edm_sampler, sigma_steps
from trainer.models.denoisers.interface import DenoiserOutput, Prompt

torch.set_num_threads(1)

T, C = 4, 8


class GaussianDenoiser(torch.nn.Module):
    """The exact D(x; sigma) = E[y | y + sigma n = x] for y ~ N(mu, s^2 I): mu + s^2/(s^2+sigma^2) (x - mu).

    The mean is mu0 + prompt.pooled[:, :1] * shift, so a prompt moves it (the null prompt has pooled = 0)."""

    def __init__(self, mu0: torch.Tensor, s: float, shift: float = 0.0):
        super().__init__()
        self.mu0, self.s, self.shift = mu0, s, shift
        self.calls, self.batch_sizes = 0, []

    def null_prompt(self, batch, length=None):
        return Prompt(pooled=torch.zeros(batch, 2))

    def forward(self, x, sigma, prompt=None, mask_ratio=0.0, keep_idx=None):
        self.calls += 1
        self.batch_sizes.append(x.shape[0])
        mu = self.mu0.expand_as(x)
        if prompt is not None and prompt.pooled is not None:
            mu = mu + prompt.pooled[:, :1].view(-1, 1, 1).to(x.dtype) * self.shift
        s2 = self.s ** 2
        sig2 = sigma.to(x.dtype).view(-1, 1, 1) ** 2
        return DenoiserOutput(mu + s2 / (s2 + sig2) * (x - mu))


def test_sigma_steps_are_eq5():
    cfg = SamplerConfig(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    t = sigma_steps(cfg)
    assert t.shape == (19,) and float(t[-1]) == 0.0
    for i in range(18):
        ref = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        assert float(t[i]) == pytest.approx(ref, rel=1e-12)
    assert float(t[0]) == pytest.approx(80.0) and float(t[17]) == pytest.approx(0.002)
    assert bool((t[:-1] > t[1:]).all())


def heun_reference(s: float, N: int, sigma_min=0.002, sigma_max=80.0, rho=7.0) -> float:
    """Algorithm 2 without churn for scalar data N(0, s^2), in plain floats: x_N = a * noise."""
    t = [(sigma_max ** (1 / rho) + i / (N - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
         for i in range(N)] + [0.0]
    x = sigma_max
    for i in range(N):
        h = t[i + 1] - t[i]
        d = t[i] / (s * s + t[i] ** 2) * x          # (x - D(x; t)) / t for the Gaussian denoiser
        x_next = x + h * d
        if i < N - 1:
            d2 = t[i + 1] / (s * s + t[i + 1] ** 2) * x_next
            x_next = x + h * (d + d2) / 2
        x = x_next
    return x


def test_heun_18_steps_is_algorithm_2():
    g = torch.Generator().manual_seed(0)
    net = GaussianDenoiser(torch.zeros(1, T, C), 0.5)
    noise = torch.randn(16, T, C, generator=g)
    x = edm_sampler(net, noise, cfg=SamplerConfig(num_steps=18))
    assert net.calls == 35  # 2N - 1 evaluations for N = 18
    assert torch.allclose(x, noise * heun_reference(0.5, 18), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_recovers_gaussian(churn):
    g = torch.Generator().manual_seed(0)
    mu0 = torch.randn(1, T, C, generator=g)
    s = 0.5
    net = GaussianDenoiser(mu0, s)
    # 128 steps: Heun's truncation error on this ODE is ~5% of the std at 18 steps (more with churn),
    # ~1% here; it shrinks with N, which is the convergence this test checks.
    cfg = SamplerConfig(num_steps=128, S_churn=churn, S_min=0.05, S_max=50.0)
    n = 4000
    x = edm_sampler(net, torch.randn(n, T, C, generator=g), cfg=cfg, generator=g)
    mean_err = (x.mean(0) - mu0[0]).abs()
    assert float(mean_err.max()) < 5 * s / math.sqrt(n)
    assert float(x.std(0).mean()) == pytest.approx(s, rel=0.02)
    # And not trivially: a denoiser for a different std gives a visibly different spread.
    x2 = edm_sampler(GaussianDenoiser(mu0, 0.8), torch.randn(n, T, C, generator=g), cfg=cfg, generator=g)
    assert float(x2.std(0).mean()) == pytest.approx(0.8, rel=0.02)


def test_guidance_calls_cond_and_uncond_together_and_extrapolates():
    g = torch.Generator().manual_seed(1)
    mu0 = torch.zeros(1, T, C)
    net = GaussianDenoiser(mu0, 0.3, shift=1.0)
    n = 2000
    prompt = Prompt(pooled=torch.ones(n, 2))
    w = 3.0
    x = edm_sampler(net, torch.randn(n, T, C, generator=g), prompt, SamplerConfig(guidance_scale=w))
    assert net.calls == 35 and set(net.batch_sizes) == {2 * n}  # cond + uncond in one batch
    # The guided denoiser is affine in the means, so samples centre on mu_u + w (mu_c - mu_u) = w.
    assert float(x.mean()) == pytest.approx(w, abs=0.02)
    net1 = GaussianDenoiser(mu0, 0.3, shift=1.0)
    x1 = edm_sampler(net1, torch.randn(n, T, C, generator=g), prompt, SamplerConfig(guidance_scale=1.0))
    assert set(net1.batch_sizes) == {n} and float(x1.mean()) == pytest.approx(1.0, abs=0.02)


def test_drop_prompt():
    B, L, D = 64, 5, 3
    prompt = Prompt(torch.randn(B, L, D), torch.rand(B, L) > 0.3, None)
    null = Prompt(torch.full((B, L, D), 7.0), torch.zeros(B, L, dtype=torch.bool).index_fill(1, torch.tensor([0]), True),
                  torch.full((B, D), -1.0))
    assert drop_prompt(prompt, null, 0.0) is prompt
    all_null = drop_prompt(prompt, null, 1.0)
    assert torch.equal(all_null.emb, null.emb) and torch.equal(all_null.mask, null.mask)
    assert torch.equal(all_null.pooled, null.pooled)
    half = drop_prompt(prompt, null, 0.5, generator=torch.Generator().manual_seed(0))
    dropped = (half.emb == 7.0).all(-1).all(-1)
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(half.emb[~dropped], prompt.emb[~dropped])
    # Kept samples get their masked-mean pooled vector, dropped ones the null pooled vector.
    assert torch.allclose(half.pooled[~dropped], prompt.pooled_or_mean()[~dropped])
    assert bool((half.pooled[dropped] == -1.0).all())
    with pytest.raises(ValueError, match="null_prompt.batch, length=L"):
        drop_prompt(prompt, Prompt(null.emb[:, :1], null.mask[:, :1], null.pooled), 0.5)


class GaussianEpsBackbone(torch.nn.Module):
    """The exact epsilon predictor E[eps | x_t] for x_0 ~ N(mu, s^2), as a seam backbone of DDPM."""

    def __init__(self, mu, s, alphas_cumprod):
        super().__init__()
        self.mu, self.s, self.ac = mu, s, alphas_cumprod
        self.calls = 0

    def null_prompt(self, batch, length=None):
        return Prompt()

    def forward(self, x, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None, mask_ratio=0.0, keep_idx=None):
        self.calls += 1
        t = (c_noise * len(self.ac)).round().long()
        a = self.ac[t].to(x.dtype).view(-1, 1, 1)
        return DenoiserOutput((1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s ** 2 + 1 - a))


def test_ddpm_baseline_recovers_gaussian():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(1, T, C, generator=g)
    ddpm = DDPM(torch.nn.Identity(), DDPMConfig())
    ddpm.backbone = GaussianEpsBackbone(mu, 0.5, ddpm.scheduler.alphas_cumprod)
    n = 2000
    x = ddpm.sample(torch.randn(n, T, C, generator=g), generator=g)
    assert ddpm.backbone.calls == 1000
    assert float((x.mean(0) - mu[0]).abs().max()) < 5 * 0.5 / math.sqrt(n)
    assert float(x.std(0).mean()) == pytest.approx(0.5, rel=0.03)
    # The loss of the exact predictor is the irreducible one, well below the loss of predicting 0.
    y = mu + 0.5 * torch.randn(512, T, C, generator=g)
    exact = ddpm.loss(y, generator=torch.Generator().manual_seed(3)).loss
    assert float(exact) < 0.5
