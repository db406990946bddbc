"""Self-conditioning (Chen et al. 2022): the MoE DiT reads its previous clean-latent estimate; the EDM
loss trains it with a no-grad first pass; the sampler feeds each evaluation the previous one's."""
import pytest
import torch

from tests.test_edm import randomize
from trainer.models import masking
from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond, edm_loss_weight
from trainer.diffusion.sampler import SamplerConfig, edm_sampler
from trainer.models.denoisers.interface import Prompt
from trainer.models.denoisers import DenoiserConfig, MoEDiTConfig, build_denoiser

torch.set_num_threads(1)


def sc_net(self_condition=True, sd=0.8):
    cfg = DenoiserConfig(kind="moe_dit", latent_tokens=8, latent_dim=4, prompt_dim=6,
                         moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, patch_mixer_depth=1, num_experts=2,
                                              self_condition=self_condition))
    torch.manual_seed(0)
    return EDMPrecond(randomize(build_denoiser(cfg)), sigma_data=sd)


def data(B=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 8, 4, generator=g),
            Prompt(torch.randn(B, 3, 6, generator=g), torch.ones(B, 3, dtype=torch.bool)))


def test_backbone_reads_the_estimate_and_none_is_zeros():
    net = sc_net().eval()
    x, p = data()
    s = torch.full((4,), 0.7)
    with torch.no_grad():
        a = net(x, s, p).sample
        assert torch.equal(a, net(x, s, p, self_cond=torch.zeros_like(x)).sample)
        assert not torch.allclose(a, net(x, s, p, self_cond=torch.randn_like(x)).sample, atol=1e-4)
        plain = sc_net(self_condition=False).eval()
        assert plain.backbone.x_embed.in_features == 4 and net.backbone.x_embed.in_features == 8
        with pytest.raises(ValueError, match="self_condition"):
            plain.backbone(x, s.log() / 4, *p, self_cond=x)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_loss_feeds_the_no_grad_first_pass_to_the_graded_pass(mask_ratio):
    net = sc_net().train()
    y, p = data()
    g = torch.Generator().manual_seed(3)
    sigma, noise = torch.rand(4, generator=g) + 0.1, torch.randn(y.shape, generator=g)
    keep = masking.random_keep_idx(4, 8, mask_ratio, generator=g) if mask_ratio else None
    got = EDMLoss(EDMConfig(sigma_data=0.8, self_cond_prob=1.0))(net, y, p, mask_ratio, keep, sigma, noise)
    xn = y + noise * sigma.view(-1, 1, 1)
    with torch.no_grad():
        est = net(xn, sigma, p, keep_idx=keep).sample
    out = net(xn, sigma, p, keep_idx=keep, self_cond=est)
    per_tok = edm_loss_weight(sigma, 0.8).view(-1, 1) * ((out.sample - y) ** 2).mean(-1)
    if out.keep is not None:
        k = out.keep.float()
        ref = ((per_tok * k).sum(1) / k.sum(1)).mean()
    else:
        ref = per_tok.mean()
    assert torch.allclose(got.loss, ref, atol=1e-6)
    got.loss.backward()                                   # the graded pass carries the gradient
    assert net.backbone.x_embed.weight.grad.abs().sum() > 0
    # Probability 0: the estimate input is zeros, i.e. the plain single pass.
    none = EDMLoss(EDMConfig(sigma_data=0.8, self_cond_prob=0.0))(net, y, p, mask_ratio, keep, sigma, noise)
    plain = net(xn, sigma, p, keep_idx=keep).sample
    assert not torch.allclose(none.loss, got.loss)
    per_tok0 = edm_loss_weight(sigma, 0.8).view(-1, 1) * ((plain - y) ** 2).mean(-1)
    ref0 = ((per_tok0 * k).sum(1) / k.sum(1)).mean() if keep is not None else per_tok0.mean()
    assert torch.allclose(none.loss, ref0, atol=1e-6)


def test_training_draws_are_the_same_on_every_rank_and_about_half():
    # Each rank builds its own EDMLoss from the same config: the pass count must agree (FSDP).
    ranks = [EDMLoss(EDMConfig(sigma_data=0.8, seed=5)) for _ in range(2)]
    draws = [[float(torch.rand((), generator=r._sc_gen)) < 0.5 for _ in range(200)] for r in ranks]
    assert draws[0] == draws[1] and 70 < sum(draws[0]) < 130


class Recorder(torch.nn.Module):
    """The real net, with every call's self_cond input and output kept."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    @property
    def self_conditioning(self):
        return self.net.self_conditioning

    def null_prompt(self, *a):
        return self.net.null_prompt(*a)

    def forward(self, x, s, p, self_cond=None):
        out = self.net(x, s, p, self_cond=self_cond)
        self.calls.append((None if self_cond is None else self_cond.clone(), out.sample.clone(), x.shape[0]))
        return out


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampler_passes_each_evaluation_the_previous_estimate(guidance):
    rec = Recorder(sc_net().eval())
    _, p = data(B=2)
    with torch.no_grad():
        edm_sampler(rec, torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0)), p,
                    SamplerConfig(num_steps=4, guidance_scale=guidance))
    assert len(rec.calls) == 7 and rec.calls[0][0] is None
    for (_, prev_out, n), (sc, _, _) in zip(rec.calls, rec.calls[1:]):
        if guidance == 1.0:
            expect = prev_out
        else:                                             # the guided estimate, for both halves
            cond, uncond = prev_out.double().chunk(2)
            expect = (uncond + guidance * (cond - uncond)).float().repeat(2, 1, 1)
        assert sc.shape[0] == n and torch.allclose(sc, expect, atol=1e-5)


def test_ddpm_path_of_the_pipeline_feeds_the_previous_estimate():
    from trainer.diffusion.ddpm import DDPM, DDPMConfig
    from trainer.pipeline.pipeline import _EDMAsEpsilon

    rec = Recorder(sc_net().eval())
    ddpm = DDPM(torch.nn.Identity(), DDPMConfig(num_inference_steps=4, guidance_scale=2.0))
    ddpm.backbone = _EDMAsEpsilon(rec, ddpm.scheduler.alphas_cumprod, ddpm.cfg.num_train_timesteps)
    _, p = data(B=2)
    ddpm.sample(torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0)), p)
    assert len(rec.calls) == 4 and rec.calls[0][0] is None
    for (_, prev_out, _), (sc, _, _) in zip(rec.calls, rec.calls[1:]):
        assert torch.allclose(sc, prev_out)


def test_flops_per_sample_count_the_expected_extra_pass():
    from trainer.training.diffusion_model import measure_flops_per_sample

    plain = measure_flops_per_sample(sc_net(self_condition=False), (8, 4), (3, 6), 0.0)
    sc = measure_flops_per_sample(sc_net(), (8, 4), (3, 6), 0.0)
    # forward ~ 1/3 of forward + backward: half the batches add one forward, ~1/6 more
    assert 1.10 * plain < sc < 1.25 * plain
    # ... and the share follows loss.self_cond_prob: none adds nothing, every batch twice the half share
    none = measure_flops_per_sample(sc_net(), (8, 4), (3, 6), 0.0, self_cond_prob=0.0)
    every = measure_flops_per_sample(sc_net(), (8, 4), (3, 6), 0.0, self_cond_prob=1.0)
    assert abs(none - plain) < 0.01 * plain
    assert abs((every - none) - 2 * (sc - none)) < 0.01 * plain
