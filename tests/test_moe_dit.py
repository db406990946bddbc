"""Expert-choice routing, masking and the null prompt of the MoE DiT."""
import pytest
import torch

from tests.test_edm import randomize
from trainer.models import masking
from trainer.diffusion.guidance import drop_prompt
from trainer.models.denoisers.interface import Prompt
from trainer.models.denoisers import DenoiserConfig, MoEDiTConfig, build_denoiser
from trainer.models.denoisers.moe_dit import ExpertChoiceFFN, FeedForward

torch.set_num_threads(1)


def tiny_dit(mixer=1, depth=4, prompt_dim=12, **kw):
    cfg = DenoiserConfig(kind="moe_dit", latent_tokens=16, latent_dim=8, prompt_dim=prompt_dim,
                         moe_dit=MoEDiTConfig(dim=32, depth=depth, head_dim=16, patch_mixer_depth=mixer,
                                              num_experts=4, expert_capacity=2.0, **kw))
    torch.manual_seed(0)
    return randomize(build_denoiser(cfg)).eval()


def inputs(B=3, T=16, C=8, L=5, D=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, C, generator=g), torch.randn(B, generator=g),
            Prompt(torch.randn(B, L, D, generator=g), torch.arange(L).expand(B, L) < torch.tensor([[2], [5], [3]])[:B]))


@pytest.mark.parametrize("E,cap,T", [(4, 2.0, 16), (8, 1.0, 32), (3, 1.5, 10), (8, 2.0, 8)])
def test_every_expert_takes_exactly_k_distinct_tokens(E, cap, T):
    ffn = ExpertChoiceFFN(16, 24, E, cap, bias=True)
    x = torch.randn(5, T, 16)
    gates, idx = ffn.route(x)
    k = max(1, int(cap * T / E))
    assert idx.shape == (5, E, k) and gates.shape == (5, E, k)
    for b in range(5):
        for e in range(E):
            assert len(set(idx[b, e].tolist())) == k          # k distinct tokens of this sample
    # Each expert's picks are its highest-probability tokens.
    probs = ffn.gate(x).softmax(-1).transpose(1, 2)           # [B, E, T]
    kth = probs.topk(k, dim=-1).values[..., -1:]
    assert bool((gates >= kth - 1e-7).all())


def test_moe_forward_equals_per_expert_loop():
    torch.manual_seed(0)
    ffn = randomize(ExpertChoiceFFN(16, 24, 4, 2.0, bias=True))
    x = torch.randn(3, 12, 16)
    gates, idx = ffn.route(x)
    ref = torch.zeros_like(x)
    w1, b1, w2, b2 = ffn.experts()
    for b in range(3):
        for e in range(4):
            for j, t in enumerate(idx[b, e].tolist()):
                h = torch.nn.functional.gelu(x[b, t] @ w1[e] + b1[e, 0]) @ w2[e] + b2[e, 0]
                ref[b, t] += gates[b, e, j] * h
    assert torch.allclose(ffn(x), ref, atol=1e-5)


def test_one_expert_full_capacity_is_the_dense_ffn():
    torch.manual_seed(0)
    dense = randomize(FeedForward(16, 40, bias=True))
    moe = ExpertChoiceFFN(16, 40, num_experts=1, capacity=1.0, bias=True)
    with torch.no_grad():
        for dst, src in zip(moe.experts(), (dense.fc1.weight.T, dense.fc1.bias, dense.fc2.weight.T, dense.fc2.bias)):
            dst.copy_(src.reshape(dst.shape))
    x = torch.randn(4, 32, 16)
    assert torch.allclose(moe(x), dense(x), atol=1e-5)
    # Below full capacity some tokens are skipped: then it is not the dense FFN.
    moe.capacity = 0.5
    assert not torch.allclose(moe(x), dense(x), atol=1e-3)


def test_moe_in_every_second_block_and_width_scaling():
    m = tiny_dit(depth=6, mlp_ratio=[1.0, 4.0], qkv_ratio=[0.5, 1.0])
    kinds = [type(b.mlp).__name__ for b in m.blocks]
    assert kinds == ["FeedForward", "ExpertChoiceFFN"] * 3
    assert all(type(b.mlp).__name__ == "FeedForward" for b in m.patch_mixer)
    widths = [b.mlp.fc1.out_features if hasattr(b.mlp, "fc1") else b.mlp.w1.shape[-1] for b in m.blocks]
    assert widths == sorted(widths) and widths[0] == 32 and widths[-1] == 128
    qkv = [b.attn.qkv.out_features // 3 for b in m.blocks]
    assert qkv[0] == 16 and qkv[-1] == 32


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.75, 0.9])
def test_masking_keeps_round_t_times_one_minus_r(r):
    T = 32
    idx = masking.random_keep_idx(64, T, r, generator=torch.Generator().manual_seed(0))
    K = round(T * (1 - r))
    assert idx.shape == (64, K)
    keep = masking.keep_mask(idx, T)
    assert keep.sum(1).tolist() == [K] * 64
    if 0 < r:
        assert len({tuple(row.tolist()) for row in idx}) > 1   # per-sample, not one mask for the batch


def test_model_masking_output_and_keep():
    m = tiny_dit()
    x, c, p = inputs()
    out = m(x, c, *p, mask_ratio=0.75)
    assert out.sample.shape == x.shape and out.keep.shape == (3, 16)
    assert out.keep.sum(1).tolist() == [4, 4, 4]
    assert m(x, c, *p).keep is None


def test_masked_positions_do_not_leak_into_kept_ones():
    m = tiny_dit(mixer=0)
    x, c, p = inputs()
    keep_idx = masking.random_keep_idx(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    keep = masking.keep_mask(keep_idx, 16)
    out = m(x, c, *p, keep_idx=keep_idx)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 10)
    out2 = m(x2, c, *p, keep_idx=keep_idx)
    assert torch.allclose(out.sample[keep], out2.sample[keep], atol=1e-6)
    # Changing a kept token does change kept outputs (the check above is not vacuous).
    x3 = x.clone()
    x3[0, keep_idx[0, 0]] += 1.0
    assert not torch.allclose(m(x3, c, *p, keep_idx=keep_idx).sample[0][keep[0]], out.sample[0][keep[0]])
    # A masked position's output is the mask token's: identical across masked positions of a sample.
    for b in range(3):
        masked = out.sample[b][~keep[b]]
        assert torch.allclose(masked, masked[:1].expand_as(masked), atol=1e-6)


def test_patch_mixer_sees_all_tokens_before_masking():
    # By design: with a patch mixer the kept tokens carry context from the whole (noisy) latent,
    # while masked positions still output only the mask-token path.
    m = tiny_dit(mixer=2)
    x, c, p = inputs()
    keep_idx = masking.random_keep_idx(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    keep = masking.keep_mask(keep_idx, 16)
    out = m(x, c, *p, keep_idx=keep_idx)
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 10)
    out2 = m(x2, c, *p, keep_idx=keep_idx)
    assert not torch.allclose(out.sample[keep], out2.sample[keep], atol=1e-4)
    for b in range(3):
        masked = out2.sample[b][~keep[b]]
        assert torch.allclose(masked, masked[:1].expand_as(masked), atol=1e-6)


def test_prompt_padding_is_ignored_and_prompt_matters():
    m = tiny_dit()
    x, c, p = inputs()
    out = m(x, c, *p).sample
    emb2 = torch.where(p.mask.unsqueeze(-1), p.emb, torch.randn_like(p.emb) * 5)
    assert torch.allclose(out, m(x, c, emb2, p.mask).sample, atol=1e-5)
    assert not torch.allclose(out, m(x, c, p.emb * 2, p.mask).sample, atol=1e-4)
    # Empty prompt row (no real token) does not produce NaN.
    empty = torch.zeros_like(p.mask)
    assert torch.isfinite(m(x, c, p.emb, empty).sample).all()


def test_prompt_padding_to_any_length_leaves_the_output_unchanged_and_needs_no_host_read():
    m = tiny_dit()
    x, c, p = inputs(L=5)                               # real lengths 2, 5, 3
    pad = 11
    emb = torch.cat([p.emb, torch.randn(3, pad, 12) * 7], dim=1)
    mask = torch.cat([p.mask, torch.zeros(3, pad, dtype=torch.bool)], dim=1)
    ref = m(x, c, p.emb, p.mask).sample                 # the batch trimmed to its longest prompt
    assert torch.allclose(m(x, c, emb, mask).sample, ref, atol=1e-5)
    # The forward reads no tensor on the host (a GPU step would wait for it): on the meta device, where any
    # such read raises, the training forward (masking, MoE routing, prompt mask) runs through.
    with torch.device("meta"):
        mm = build_denoiser(DenoiserConfig(kind="moe_dit", latent_tokens=16, latent_dim=8, prompt_dim=12,
                                           moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, patch_mixer_depth=1,
                                                                num_experts=4, expert_capacity=2.0))).train()
        out = mm(torch.randn(3, 16, 8), torch.randn(3), torch.randn(3, 16, 12), torch.arange(16).expand(3, 16) < 4,
                 mask_ratio=0.5)
    assert out.sample.shape == (3, 16, 8) and out.sample.is_meta


def test_null_prompt_is_learned_and_used_for_cfg_dropout():
    m = tiny_dit().train()
    x, c, p = inputs()
    null = m.null_prompt(3, length=5)
    assert null.emb.shape == (3, 5, 12) and null.mask[:, 0].all() and not null.mask[:, 1:].any()
    # No prompt == the null prompt.
    assert torch.allclose(m(x, c).sample, m(x, c, *m.null_prompt(3)).sample, atol=1e-6)
    dropped = drop_prompt(p, null, 1.0)
    loss = m(x, c, *dropped).sample.square().mean()
    loss.backward()
    assert m.null_emb.grad is not None and m.null_emb.grad.abs().sum() > 0
    assert m.null_pooled.grad.abs().sum() > 0


def test_unconditional_model():
    m = tiny_dit(prompt_dim=0)
    x, c, _ = inputs()
    out = m(x, c, mask_ratio=0.5)
    assert out.sample.shape == x.shape and m.null_prompt(3).is_empty


def test_learns_a_prompt_conditional_distribution_with_masked_training():
    """End to end: masked EDM training with CFG dropout, then Heun sampling, recovers each prompt's data."""
    from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
    from trainer.diffusion.sampler import edm_sampler

    torch.manual_seed(0)
    cfg = DenoiserConfig(latent_tokens=8, latent_dim=4, prompt_dim=8,
                         moe_dit=MoEDiTConfig(dim=64, depth=2, head_dim=32, patch_mixer_depth=1, num_experts=4))
    m = build_denoiser(cfg)
    net = EDMPrecond(m, sigma_data=0.5)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    mus = torch.full((2, 8, 4), 0.5)
    mus[1, 4:] = -0.5                                 # the two prompts differ on the last 4 slots
    embs = torch.randn(2, 3, 8)
    loss_fn = EDMLoss(EDMConfig(sigma_data=0.5))
    first = None
    for _ in range(200):
        lab = torch.randint(0, 2, (32,))
        y = mus[lab] + 0.05 * torch.randn(32, 8, 4)
        p = drop_prompt(Prompt(embs[lab]), m.null_prompt(32, 3), 0.1)
        loss = loss_fn(net, y, p, mask_ratio=0.5).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first
    net.eval()
    for i in range(2):
        s = edm_sampler(net, torch.randn(32, 8, 4), Prompt(embs[i:i + 1].expand(32, -1, -1)))
        assert float((s.mean(0) - mus[i]).abs().max()) < 0.2
        assert float(s.std(0).mean()) < 0.2


def test_lighter_patch_mixer_width_and_ffn_ratio():
    # micro_diffusion's mixer: its own (narrower) width, mapped in and out, and a small FFN ratio.
    m = tiny_dit(mixer=2, patch_mixer_dim=16, patch_mixer_mlp_ratio=1.0)
    for b in m.patch_mixer:
        assert b.attn.qkv.in_features == 16 and b.mlp.fc1.out_features == 16
        assert b.adaLN[-1].in_features == 32 and b.cross_attn.kv.in_features == 32   # c and y stay at dim
    assert m.mixer_in[-1].out_features == 16 and m.mixer_out[-1].out_features == 32
    x, c, p = inputs()
    keep_idx = masking.random_keep_idx(3, 16, 0.75, generator=torch.Generator().manual_seed(0))
    keep = masking.keep_mask(keep_idx, 16)
    out = m.train()(x, c, *p, keep_idx=keep_idx)
    out.sample.square().mean().backward()
    assert all(p_.grad is not None for p_ in m.mixer_in.parameters())
    # The kept tokens still see the dropped ones through the narrower mixer.
    x2 = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 10)
    with torch.no_grad():
        assert not torch.allclose(m(x, c, *p, keep_idx=keep_idx).sample[keep],
                                  m(x2, c, *p, keep_idx=keep_idx).sample[keep], atol=1e-4)
    with pytest.raises(ValueError, match="patch_mixer_dim"):
        MoEDiTConfig(dim=32, head_dim=16, patch_mixer_dim=24)
    # Same width: no maps; the FFN ratio alone sets the mixer's FFN width.
    m4 = tiny_dit(mixer=1, patch_mixer_mlp_ratio=4.0)
    assert m4.mixer_in is None and m4.patch_mixer[0].mlp.fc1.out_features == 128


def test_denoiser_saved_before_mixer_ratio_existed_still_loads(tmp_path):
    # Exported denoisers from before `patch_mixer_mlp_ratio` had a 4*dim mixer FFN and no such key.
    import json

    from tests.tiny import tiny_denoiser, tiny_stats
    from trainer.pipeline.export import DENOISER_CONFIG, load_denoiser

    d = tmp_path / "den"
    cfg_file = d / DENOISER_CONFIG
    tiny_denoiser(str(d))                                   # saved with the key (mixer ratio 1.0)
    net, _ = load_denoiser(str(d))
    assert net.backbone.patch_mixer[0].mlp.fc1.out_features == 32
    # Rebuild it as the old code did (ratio 4) and drop the key from its config.
    from trainer.diffusion.edm import EDMPrecond
    from trainer.pipeline.export import save_denoiser
    from trainer.models.denoisers import DenoiserConfig, build_denoiser

    old = DenoiserConfig(prompt_dim=384, moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, num_experts=2,
                                                               patch_mixer_mlp_ratio=4.0))
    save_denoiser(str(d), EDMPrecond(build_denoiser(old), 0.9), old, tiny_stats(0.9), "center")
    meta = json.loads(cfg_file.read_text())
    del meta["denoiser"]["moe_dit"]["patch_mixer_mlp_ratio"]
    cfg_file.write_text(json.dumps(meta))
    net, meta = load_denoiser(str(d))
    assert net.backbone.patch_mixer[0].mlp.fc1.out_features == 128
    assert meta["denoiser_config"].moe_dit.patch_mixer_mlp_ratio == 4.0


def test_experts_are_stored_flat_and_old_layout_loads():
    """FSDP2 splits dim 0: E*dim rows divide over 32 ranks where E = 8 experts would pad 24 of them."""
    ffn = ExpertChoiceFFN(16, 24, 8, 2.0, bias=True)
    assert ffn.w1.shape == (8 * 16, 24) and ffn.w2.shape == (8 * 24, 16) and ffn.b1.shape == (8 * 24,)
    old = {k: v.clone() for k, v in randomize(ExpertChoiceFFN(16, 24, 8, 2.0, bias=True)).state_dict().items()}
    old_layout = {"gate.weight": old["gate.weight"], "w1": old["w1"].view(8, 16, 24), "w2": old["w2"].view(8, 24, 16),
                  "b1": old["b1"].view(8, 1, 24), "b2": old["b2"].view(8, 1, 16)}
    ffn.load_state_dict(old_layout)
    assert all(torch.equal(ffn.state_dict()[k], v) for k, v in old.items())


def test_two_slots_per_token_groups_consecutive_slots_masks_them_together_and_saves(tmp_path):
    from trainer.diffusion.edm import EDMLoss, EDMPrecond
    from trainer.pipeline.export import load_denoiser, save_denoiser

    m = tiny_dit(mixer=0, slots_per_token=2)
    assert m.mask_tokens == 8 and m.x_embed.in_features == 16 and m.final.linear.out_features == 16
    x, c, p = inputs()
    out = m(x, c, *p, mask_ratio=0.75)
    assert out.sample.shape == x.shape and out.keep.shape == (3, 16)
    assert torch.equal(out.keep[:, 0::2], out.keep[:, 1::2]) and out.keep.sum(1).tolist() == [4, 4, 4]
    # the token of slots 2j, 2j+1: kept outputs do not depend on dropped slots, and do depend on both of
    # their own token's slots
    keep_idx = masking.random_keep_idx(3, 8, 0.75, generator=torch.Generator().manual_seed(0))
    keep = masking.keep_mask(keep_idx, 8).repeat_interleave(2, dim=1)
    ref = m(x, c, *p, keep_idx=keep_idx).sample
    noisy = torch.where(keep.unsqueeze(-1), x, torch.randn_like(x) * 10)
    assert torch.allclose(m(noisy, c, *p, keep_idx=keep_idx).sample[keep], ref[keep], atol=1e-6)
    j = int(keep_idx[0, 0])
    for slot in (2 * j, 2 * j + 1):
        x2 = x.clone()
        x2[0, slot] += 1.0
        changed = (m(x2, c, *p, keep_idx=keep_idx).sample[0] - ref[0]).abs().sum(-1) > 1e-6
        assert changed[2 * j] and changed[2 * j + 1]
    # the EDM loss draws its own kept tokens for a self-conditioning net: tokens, not slots
    sc = build_denoiser(DenoiserConfig(kind="moe_dit", latent_tokens=16, latent_dim=8, prompt_dim=12,
                                       moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, num_experts=2,
                                                            slots_per_token=2, self_condition=True)))
    net = EDMPrecond(sc)
    out = EDMLoss()(net.eval(), x, p, mask_ratio=0.5)
    assert torch.isfinite(out.loss) and out.keep.sum(1).tolist() == [8, 8, 8]
    # saved and loaded with its grouping
    cfg = DenoiserConfig(kind="moe_dit", latent_tokens=16, latent_dim=8, prompt_dim=12,
                         moe_dit=MoEDiTConfig(dim=32, depth=4, head_dim=16, patch_mixer_depth=0, num_experts=4,
                                              slots_per_token=2))
    save_denoiser(str(tmp_path / "d"), EDMPrecond(m), cfg, {"sigma_data": 0.5}, "center")
    loaded, _ = load_denoiser(str(tmp_path / "d"))
    assert torch.allclose(loaded.backbone(x, c, *p).sample, m(x, c, *p).sample, atol=1e-6)
    with pytest.raises(ValueError, match="slots_per_token: 3 does not divide"):
        tiny_dit(slots_per_token=3)
