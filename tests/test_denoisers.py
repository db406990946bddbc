"""Every backbone behind the seam: built from YAML by the factory, forward and backward on CPU."""
import pytest
import torch

from tests.test_edm import randomize
from trainer.base import config as C
from trainer.diffusion.ddpm import DDPM, DDPMConfig
from trainer.diffusion.edm import EDMLoss, EDMPrecond
from trainer.diffusion.sampler import SamplerConfig, edm_sampler
from trainer.models.denoisers.interface import Prompt
from trainer.models.denoisers import KINDS, DenoiserConfig, build_denoiser
from trainer.models.denoisers.view2d import LatentView2D

torch.set_num_threads(1)

TINY = """
latent_tokens: 32
latent_dim: 64
prompt_dim: 24
moe_dit: {dim: 32, depth: 2, head_dim: 16, patch_mixer_depth: 1, num_experts: 4}
sana: {num_layers: 1, num_attention_heads: 2, attention_head_dim: 8, num_cross_attention_heads: 2,
       cross_attention_head_dim: 8, view_2d: [64, 8, 4], view_transpose: true}
unet2d: {block_out_channels: [16, 32], norm_num_groups: 8, attention_head_dim: 8, layers_per_block: 1}
mlp: {widths: [64, 32], emb_dim: 32}
"""


def tiny_cfg(tmp_path, kind, extra=()):
    path = tmp_path / "denoiser.yaml"
    path.write_text(TINY)
    return C.load(DenoiserConfig, str(path), [f"kind={kind}", *extra])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_backbone_forward_backward(tmp_path, kind):
    torch.manual_seed(0)
    m = randomize(build_denoiser(tiny_cfg(tmp_path, kind)), std=0.02).train()
    assert type(m) is KINDS[kind]
    net = EDMPrecond(m, sigma_data=0.5)
    y = torch.randn(2, 32, 64)
    prompt = Prompt(torch.randn(2, 5, 24), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    out = EDMLoss()(net, y, prompt, mask_ratio=0.5 if m.supports_masking else 0.0)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    # Nearly every weight gets a gradient (the null prompt is unused when a prompt is given).
    missing = [n for n, g in grads.items() if (g is None or not g.abs().sum() > 0) and not n.startswith("null_")]
    assert len(missing) <= 0.05 * len(grads), missing
    # The raw backbone follows the seam: [B, T, C] in and out, no prompt = null prompt.
    with torch.no_grad():
        x = torch.randn(2, 32, 64)
        c = torch.randn(2)
        a = m(x, c).sample
        assert a.shape == (2, 32, 64)
        assert torch.allclose(a, m(x, c, *m.null_prompt(2)).sample, atol=1e-5)
        assert not torch.allclose(a, m(x, c, *prompt).sample, atol=1e-5)  # the prompt reaches the output
        assert not torch.allclose(a, m(x, c + 1).sample, atol=1e-5)     # and so does the noise level
    # One guided sampling step runs on every backbone; DDPM training too.
    s = edm_sampler(net.eval(), torch.randn(2, 32, 64), prompt, SamplerConfig(num_steps=2, guidance_scale=2.0))
    assert s.shape == (2, 32, 64) and torch.isfinite(s).all()
    ddpm = DDPM(m, DDPMConfig(num_inference_steps=3, guidance_scale=2.0))
    assert torch.isfinite(ddpm.loss(y, prompt).loss)
    assert torch.isfinite(ddpm.sample(torch.randn(2, 32, 64), prompt)).all()


@pytest.mark.parametrize("kind", ["sana", "unet2d", "mlp"])
def test_masking_refused_where_unsupported(tmp_path, kind):
    m = build_denoiser(tiny_cfg(tmp_path, kind))
    with pytest.raises(ValueError, match="does not support token masking"):
        m(torch.randn(1, 32, 64), torch.zeros(1), mask_ratio=0.75)


def test_wrong_latent_shape_refused(tmp_path):
    m = build_denoiser(tiny_cfg(tmp_path, "mlp"))
    with pytest.raises(ValueError, match=r"expected x of shape \[B, 32, 64\]"):
        m(torch.randn(1, 64, 32), torch.zeros(1))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unconditional_backbones(tmp_path, kind):
    m = build_denoiser(tiny_cfg(tmp_path, kind, ["prompt_dim=0"]))
    assert m.null_prompt(2).is_empty
    assert m(torch.randn(2, 32, 64), torch.zeros(2)).sample.shape == (2, 32, 64)


def test_view2d_layouts():
    x = torch.randn(2, 32, 64)
    v = LatentView2D(32, 64, [32, 16, 4])
    img = v.to_2d(x)
    assert img.shape == (2, 32, 16, 4) and torch.equal(img[:, 5], x[:, 5].reshape(2, 16, 4))  # slot = channel
    assert torch.equal(v.from_2d(img), x)
    vt = LatentView2D(32, 64, [64, 8, 4], transpose=True)
    img = vt.to_2d(x)
    assert img.shape == (2, 64, 8, 4) and torch.equal(img[:, 7], x[:, :, 7].reshape(2, 8, 4))  # latent dim = channel
    assert torch.equal(vt.from_2d(img), x)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(C.ConfigError, match=r"sana\.view_2d \[32, 16, 8\] holds 4096 values but the latent \[32, 64\] holds 2048"):
        tiny_cfg(tmp_path, "sana", ["sana.view_2d=[32,16,8]"])
    with pytest.raises(C.ConfigError, match="kind: expected one of"):
        tiny_cfg(tmp_path, "transformer")
    with pytest.raises(C.ConfigError, match="moe_dit: dim"):
        tiny_cfg(tmp_path, "moe_dit", ["moe_dit.dim=30"])
    with pytest.raises(C.ConfigError, match="moe_dit.depht: unknown key"):
        tiny_cfg(tmp_path, "moe_dit", ["moe_dit.depht=3"])
    # A view that does not fit is only an error for the backbone that uses it.
    assert tiny_cfg(tmp_path, "mlp", ["sana.view_2d=[32,16,8]"]).kind == "mlp"
