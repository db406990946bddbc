"""The per-step parts without per-parameter Python loops or needless host work: the foreach EMA, AdamW's
implementation choice, the latent loader's persistent workers, the FSDP2 unit choice, and torch.compile
through Composer's compile_config on a real (tiny) diffusion job."""
import os
import shutil

import pytest
import torch

from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
from trainer.models.denoisers import DenoiserConfig, build_denoiser
from trainer.models.denoisers.moe_dit import MoEDiTConfig
from trainer.training.diffusion_model import DiffusionComposerModel
from trainer.training.job import OptimConfig, optimizer_and_schedule
from trainer.training.parallelize import _wrap_fn, fsdp_units


def tiny_model(**kw):
    cfg = DenoiserConfig(prompt_dim=8, moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, patch_mixer_depth=1,
                                                            num_experts=2))
    return DiffusionComposerModel(EDMPrecond(build_denoiser(cfg)), EDMLoss(EDMConfig()), **kw)


def test_foreach_ema_is_the_per_parameter_formula():
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
    want = [0.9 * e + 0.1 * p for e, p in zip(model.ema.parameters(), model.net.parameters())]
    model.update_ema(0.9)
    assert all(torch.allclose(e, w, atol=1e-6) for e, w in zip(model.ema.parameters(), want))


@pytest.mark.parametrize("impl,flags", [("foreach", {"foreach": True}), ("for_loop", {"foreach": False}),
                                        ("fused", {"fused": True})])
def test_adamw_implementation_is_the_configured_one(impl, flags):
    opt = optimizer_and_schedule([torch.nn.Parameter(torch.ones(3))], OptimConfig(impl=impl))[0]
    assert {k: opt.defaults[k] for k in flags} == flags


def test_the_callers_autocast_reaches_the_denoiser():
    """On GPUs Composer's amp_bf16 autocasts around the model's forward; the model must not switch it off
    (with FSDP2's bf16 parameters the matmuls would then mix dtypes). Here the caller's autocast is CPU's."""
    model = tiny_model().train()
    seen = []
    linear = next(m for m in model.net.backbone.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = {"latent": torch.randn(2, 32, 64), "prompt_emb": torch.randn(2, 4, 8),
             "prompt_mask": torch.ones(2, 4, dtype=torch.bool), "prompt_pooled": torch.randn(2, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(batch)
        model.eval_forward(batch)
    assert seen and all(d == torch.bfloat16 for d in seen)


def test_fsdp_units_are_every_block_in_forward_order():
    model = tiny_model()
    units = fsdp_units(model.net)
    bb = model.net.backbone
    assert units == [*bb.patch_mixer, *bb.blocks] and len(units) == 3
    fn = _wrap_fn(units, keep_last=True)
    assert [fn(u) for u in units] == [True, True, {"reshard_after_forward": False}]
    assert not fn(bb.y_embed) and not fn(bb.blocks[0].attn)   # the embeddings stay in the root unit


def test_latent_loader_keeps_its_workers(tmp_path):
    from trainer.data.loaders import LatentDataConfig, build_latent_dataloader
    from trainer.data.synthetic import write_latent_shards

    shards = write_latent_shards(tmp_path / "latents", n_train=16, n_val=4, prompt_dim=8)
    loader = build_latent_dataloader(LatentDataConfig(path=shards["train"], num_workers=1), 4)[0]
    assert loader.persistent_workers and not loader.pin_memory   # no GPU here: nothing to pin for
    assert not build_latent_dataloader(LatentDataConfig(path=shards["train"]), 4)[0].persistent_workers


def compiler() -> str:
    return shutil.which("gcc") or shutil.which("cc") or ""


@pytest.mark.slow
@pytest.mark.skipif(not compiler() and not os.environ.get("CI"),
                    reason="torch.compile (inductor) on CPU needs a C compiler (gcc/cc), none on PATH")
def test_compiled_job_trains(tmp_path):
    """compile=true reaches Composer's compile_config (the model's forward is compiled) and trains."""
    assert compiler(), "CI must have a C compiler for the torch.compile test"
    from trainer.base import config as C
    from trainer.data.synthetic import write_latent_shards
    from trainer.jobs import train_diffusion

    from .test_train_diffusion import PRETRAIN, TINY

    shards = write_latent_shards(tmp_path / "latents", n_train=16, n_val=4, prompt_dim=384)
    torch._dynamo.reset()
    cfg = C.load(train_diffusion.DiffusionTrainConfig, PRETRAIN, [*TINY, f"data.path={shards['train']}", "data.eval_path=", f"out_dir={tmp_path}/out",
                            "max_duration=2ba", "save_interval=1000ba", "compile=true", "prompt_mean.enabled=false"])
    summary = train_diffusion.run(cfg)
    assert summary["batches"] == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0   # dynamo captured the forward
