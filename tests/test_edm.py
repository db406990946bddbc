"""EDM preconditioning and loss against a float64 reference written from the paper (Karras et al. 2022, Table 1)."""
import math

import pytest
import torch

from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond, PromptMean, edm_coefficients, edm_loss_weight
from trainer.models.denoisers.interface import Prompt
from trainer.models.denoisers import DenoiserConfig, MLPUNetConfig, MoEDiTConfig, build_denoiser

torch.set_num_threads(1)


def paper_coefficients(sigma: float, sd: float):
    """Table 1, 'EDM (ours)' column, in plain float64 arithmetic."""
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / math.sqrt(sd ** 2 + sigma ** 2)
    c_in = 1 / math.sqrt(sigma ** 2 + sd ** 2)
    c_noise = 0.25 * math.log(sigma)
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    return c_skip, c_out, c_in, c_noise, weight


def randomize(module, std=0.05, seed=0):
    """Move every parameter off its (often zero) init so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.mark.parametrize("sd", [0.5, 1.0, 0.37])
def test_coefficients_match_paper(sd):
    sigmas = [0.002, 0.01, 0.3, 0.5, 1.0, 2.7, 80.0]
    got = edm_coefficients(torch.tensor(sigmas, dtype=torch.float64), sd)
    w = edm_loss_weight(torch.tensor(sigmas, dtype=torch.float64), sd)
    for j, s in enumerate(sigmas):
        ref = paper_coefficients(s, sd)
        for g, r in zip([*[c[j] for c in got], w[j]], ref):
            assert float(g) == pytest.approx(r, rel=1e-12, abs=1e-15)
    # Identities from Appendix B.6: unit-variance training target, and lambda = 1 / c_out^2.
    c_skip, c_out, c_in, _ = got
    s = torch.tensor(sigmas, dtype=torch.float64)
    assert torch.allclose(c_in ** 2 * (sd ** 2 + s ** 2), torch.ones_like(s))
    assert torch.allclose(w * c_out ** 2, torch.ones_like(s))
    assert torch.allclose(c_skip ** 2 * s ** 2 + (1 - c_skip) ** 2 * sd ** 2, c_out ** 2)


def tiny_backbone(kind="mlp"):
    cfg = DenoiserConfig(kind=kind, latent_tokens=8, latent_dim=4, prompt_dim=6,
                         mlp=MLPUNetConfig(widths=[32, 16], emb_dim=16),
                         moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, patch_mixer_depth=1, num_experts=2))
    return randomize(build_denoiser(cfg).double())


def test_precond_is_the_paper_formula():
    torch.manual_seed(0)
    F = tiny_backbone()
    net = EDMPrecond(F, sigma_data=0.5)
    x = torch.randn(5, 8, 4, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    prompt = Prompt(torch.randn(5, 3, 6, dtype=torch.float64))
    D = net(x, sigma, prompt).sample
    for b in range(5):
        c_skip, c_out, c_in, c_noise, _ = paper_coefficients(float(sigma[b]), 0.5)
        Fx = F(c_in * x[b:b + 1], torch.tensor([c_noise], dtype=torch.float64), prompt.emb[b:b + 1]).sample
        assert torch.allclose(D[b], (c_skip * x[b] + c_out * Fx[0]), atol=1e-12)
    # A scalar sigma is broadcast over the batch.
    assert torch.allclose(net(x, torch.tensor(1.0, dtype=torch.float64), prompt).sample,
                          net(x, torch.ones(5, dtype=torch.float64), prompt).sample)


def test_loss_matches_reference():
    torch.manual_seed(1)
    net = EDMPrecond(tiny_backbone(), sigma_data=0.5)
    loss_fn = EDMLoss(EDMConfig(sigma_data=0.5))
    y = torch.randn(4, 8, 4, dtype=torch.float64) * 0.5
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=torch.float64)
    noise = torch.randn_like(y)
    out = loss_fn(net, y, sigma=sigma, noise=noise)
    ref = 0.0
    for b in range(4):
        s = float(sigma[b])
        D = net(y[b:b + 1] + s * noise[b:b + 1], sigma[b:b + 1]).sample[0]
        ref += paper_coefficients(s, 0.5)[4] * float(((D.detach() - y[b]) ** 2).mean()) / 4
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)
    assert out.per_sample.shape == (4,) and out.keep is None


def test_masked_loss_averages_over_kept_tokens_only():
    torch.manual_seed(2)
    net = EDMPrecond(tiny_backbone("moe_dit"), sigma_data=0.5)
    y = torch.randn(3, 8, 4, dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64)
    noise = torch.randn_like(y)
    keep_idx = torch.tensor([[0, 3], [1, 7], [2, 5]])
    out = EDMLoss(EDMConfig(sigma_data=0.5))(net, y, sigma=sigma, noise=noise, keep_idx=keep_idx)
    D = net(y + sigma.view(-1, 1, 1) * noise, sigma, keep_idx=keep_idx).sample.detach()
    ref = 0.0
    for b in range(3):
        w = paper_coefficients(float(sigma[b]), 0.5)[4]
        ref += w * float(((D[b, keep_idx[b]] - y[b, keep_idx[b]]) ** 2).mean()) / 3
    assert out.loss.item() == pytest.approx(ref, rel=1e-10)
    assert out.keep.sum(1).tolist() == [2, 2, 2]
    # The unmasked loss is a different number: the masked positions really are left out.
    full = ((D - y) ** 2).mean((1, 2)) * edm_loss_weight(sigma, 0.5)
    assert abs(float(full.mean()) - ref) > 1e-6


def test_sigma_is_log_normal():
    cfg = EDMConfig(P_mean=-1.2, P_std=1.2)
    s = EDMLoss(cfg).sample_sigma(200_000, generator=torch.Generator().manual_seed(0)).double().log()
    assert float(s.mean()) == pytest.approx(-1.2, abs=0.01)
    assert float(s.std()) == pytest.approx(1.2, abs=0.01)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sigma_data"):
        EDMConfig(sigma_data=0)
    with pytest.raises(ValueError, match="P_std"):
        EDMConfig(P_std=-1)


# ---------------------------------------------------------------- the prompt's mean latent

def test_prompt_mean_fit_recovers_a_planted_effect_and_picks_its_ridge_on_held_out_data():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 8 * 4, generator=g, dtype=torch.float64)

    def data(n, effect):
        X = torch.randn(n, 6, generator=g, dtype=torch.float64) + 0.3
        Y = 0.2 + effect * X @ A + torch.randn(n, 8 * 4, generator=g, dtype=torch.float64)
        return X, Y.reshape(n, 8, 4)

    X, Y = data(400, 1.0)
    Xv, Yv = data(200, 1.0)
    pm, info = PromptMean.fit(X, Y, ridges=(1e-3, 1.0, 1e3), val=(Xv, Yv))
    assert info["ridge"] == 1e-3 and info["r2_val"] > 0.8 and info["n_val"] == 200
    assert info["r2_val_by_ridge"][1e3] < 0.5                       # a huge ridge shrinks the effect away
    truth = (0.2 + (Xv - 0.3) @ A + (0.3 * A.sum(0))).reshape(200, 8, 4)   # E[Y | X]
    m = pm.double()(Xv, 200)
    assert m.shape == (200, 8, 4)
    assert float((m - truth).pow(2).mean()) < 0.05 * float(truth.var())
    # No effect at all: the held-out data pick the largest ridge (the mean latent for every prompt).
    X0, Y0 = data(400, 0.0)
    pm0, info0 = PromptMean.fit(X0, Y0, ridges=(1e-3, 1.0, 1e3), val=data(200, 0.0))
    assert info0["ridge"] == 1e3
    assert float(pm0.weight.abs().max()) < 0.05 * float(pm.weight.abs().max())
    # Without held-out data the smallest ridge is used.
    assert PromptMean.fit(X, Y, ridges=(1e-3, 1.0))[1]["ridge"] == 1e-3


def test_precond_with_a_prompt_mean_denoises_the_offset_from_it():
    torch.manual_seed(2)
    F = tiny_backbone()
    X = torch.randn(64, 6, dtype=torch.float64)
    pm, _ = PromptMean.fit(X, torch.randn(64, 8, 4, dtype=torch.float64) + X[:, :1, None] * 3)
    pm = pm.double()
    plain, shifted = EDMPrecond(F, sigma_data=0.5), EDMPrecond(F, sigma_data=0.5, prompt_mean=pm)
    x = torch.randn(5, 8, 4, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    prompt = Prompt(torch.randn(5, 3, 6, dtype=torch.float64), pooled=torch.randn(5, 6, dtype=torch.float64))
    m = pm(prompt.pooled, 5)
    assert float(m.std()) > 0.1
    assert torch.allclose(shifted(x, sigma, prompt).sample, m + plain(x - m, sigma, prompt).sample, atol=1e-12)
    # The unconditional branch (the learned null prompt, or no prompt) denoises around the mean latent.
    null = F.null_prompt(5, 3)
    y0 = pm.latent_center.view(1, 8, 4)
    assert torch.allclose(shifted(x, sigma, null).sample, y0 + plain(x - y0, sigma, null).sample, atol=1e-12)
    assert torch.allclose(shifted(x, sigma).sample, y0 + plain(x - y0, sigma).sample, atol=1e-12)
    # A batch mixing both (classifier-free guidance) gets each row's own mean.
    from trainer.models.denoisers.interface import cat_prompts

    both = cat_prompts(prompt, null)
    D = shifted(torch.cat([x, x]), torch.cat([sigma, sigma]), both).sample
    assert torch.allclose(D[:5], shifted(x, sigma, prompt).sample, atol=1e-12)
    assert torch.allclose(D[5:], shifted(x, sigma, null).sample, atol=1e-12)
