"""The token-embedding latent space: a causal LM's input embeddings [L, d] as the diffusion latent.

Real parts, tiny sizes: a Llama built from config with a byte-level BPE trained here; the EDM sampler
with the exact Gaussian denoiser for inpainting; and one end-to-end CPU run (causal-LM training with
Composer -> encode job -> diffusion job -> exported pipeline -> generate with a prefix -> evaluate)."""
import json
import os

import numpy as np
import pytest
import torch

from trainer.base.config import UserError
from trainer.models.token_latents import (CONFIG_NAME, WEIGHTS_NAME, TokenEmbeddingLatents, TokenLatentConfig, build_causal_lm,
                                          latent_kind, load_latent_encoder)

from .conftest import run_cli
from .tiny import WORDS

torch.set_num_threads(1)

TEXTS = ["the sea moon\nnight", "love wind, stone river!", "old rain  heart song", "", "dark light\n\nthe"]


def tiny_encoder(L=12, seed=0):
    from trainer.models.tokenizers import train_bpe

    tok = train_bpe([" ".join(WORDS)] * 5, vocab_size=300, min_frequency=1)
    cfg = TokenLatentConfig(num_tokens=L, hidden_size=32, num_heads=2, num_layers=1, intermediate_size=64)
    torch.manual_seed(seed)
    return TokenEmbeddingLatents(cfg, tok, build_causal_lm(cfg, tok))


def test_clean_embeddings_round_trip_to_the_same_tokens_and_texts(tmp_path):
    enc = tiny_encoder()
    z = enc.encode(TEXTS)
    assert z.shape == (len(TEXTS), *enc.latent_shape) == (5, 12, 32)
    ids, mask = enc.token_ids(TEXTS)
    assert torch.equal(enc.nearest_ids(z), ids)                      # every position, padding included
    assert enc.decode(z) == TEXTS                                     # byte-level: exact text, line breaks kept
    # the stored scale makes the embedding table unit-variance
    assert float((enc.table / enc.scale).std()) == pytest.approx(1.0, rel=1e-4)
    # save -> load through the kind dispatch: same latents, same decoding, config names its kind
    enc.save_pretrained(str(tmp_path / "tl"))
    assert json.load(open(tmp_path / "tl" / CONFIG_NAME))["_class_name"] == "TokenEmbeddingLatents"
    again = load_latent_encoder(str(tmp_path / "tl"), "cpu")
    assert isinstance(again, TokenEmbeddingLatents)
    assert torch.equal(again.encode(TEXTS), z) and again.decode(z) == TEXTS
    # LM-head decoding: the tied output layer on each latent = the nearest row by inner product
    ref = (z * enc.scale @ enc.table.T).argmax(-1)
    assert torch.equal(enc.nearest_ids(z, "lm_head"), ref)
    # a small perturbation still decodes to the same tokens (cosine nearest neighbour)
    torch.manual_seed(1)
    assert enc.decode(z + 0.05 * torch.randn_like(z)) == TEXTS


def test_long_texts_keep_the_first_L_tokens_and_bad_latents_are_refused():
    enc = tiny_encoder(L=6)
    long = " ".join(WORDS)
    ids, mask = enc.token_ids([long])
    assert bool(mask.all())                                           # no room for </s>: all L positions real
    out = enc.decode(enc.encode([long]))[0]
    assert long.startswith(out) and 0 < len(out) < len(long)
    assert enc.clip_texts([long, "the sea"]) == [out, "the sea"]      # what a latent can hold
    with pytest.raises(UserError, match=r"latents must have shape \[batch, 6, 32\]"):
        enc.decode(torch.zeros(1, 5, 32))
    z, known = enc.prefix_latents("the sea")
    assert z.shape == (6, 32) and known.tolist()[:3] == [True, True, False]
    with pytest.raises(UserError, match="nothing to continue"):
        enc.prefix_latents(long)


def test_latent_kind_dispatch(tmp_path):
    from trainer.models.autoencoder import LatentAutoencoder

    from .tiny import tiny_autoencoder

    ae = tiny_autoencoder(str(tmp_path / "ae"))
    assert latent_kind(ae) == "bart_perceiver" and isinstance(load_latent_encoder(ae), LatentAutoencoder)
    enc = tiny_encoder()
    hf = str(tmp_path / "hf")                                         # a plain HF causal LM dir (as Qwen's)
    enc.lm.save_pretrained(hf)
    enc.tokenizer.save_pretrained(hf)
    wrapped = load_latent_encoder(hf)
    assert latent_kind(hf) == "hf_causal_lm" and wrapped.latent_shape == (32, 32)
    assert wrapped.decode(wrapped.encode(TEXTS)) == TEXTS
    # a pipeline exported from the plain LM dir holds the wrapped encoder, and says which kind it is
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.pipeline import export_pipeline

    from .tiny import tiny_denoiser

    pipe = export_pipeline(str(tmp_path / "pipe"), hf, tiny_denoiser(str(tmp_path / "den")), PromptEncoderConfig())
    assert json.load(open(os.path.join(pipe, "model_index.json")))["settings"]["latent_kind"] == "token_embeddings"
    inner = TokenEmbeddingLatents.from_pretrained(os.path.join(pipe, "autoencoder"))
    assert torch.equal(inner.encode(TEXTS), wrapped.encode(TEXTS))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UserError, match="not a latent encoder directory"):
        load_latent_encoder(str(tmp_path / "empty"))
    enc.save_pretrained(str(tmp_path / "bad"))
    open(tmp_path / "bad" / WEIGHTS_NAME, "wb").write(b"garbage")
    with pytest.raises(UserError, match=rf"{WEIGHTS_NAME}: cannot read the weights"):
        load_latent_encoder(str(tmp_path / "bad"))


def test_sampler_inpaint_keeps_known_positions_exactly():
    from trainer.diffusion.sampler import SamplerConfig, edm_sampler, sigma_steps

    from .test_sampler import GaussianDenoiser

    B, T, Cd = 64, 6, 4
    net = GaussianDenoiser(torch.zeros(T, Cd), s=1.0)
    cfg = SamplerConfig(num_steps=8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(B, T, Cd, generator=g)
    known = torch.full((T, Cd), 3.0)
    mask = torch.tensor([True, True, False, False, True, False])
    states = []
    out = edm_sampler(net, noise, cfg=cfg, generator=torch.Generator().manual_seed(1), inpaint=(known, mask),
                      callback=lambda i, x, d: states.append((x.clone(), d.clone())))
    plain = edm_sampler(net, noise, cfg=cfg)
    assert torch.equal(out[:, mask], known[mask].expand(B, -1, -1))   # clamped positions: exactly the known values
    # this denoiser treats every element independently, so the free positions are the plain sampler's
    assert torch.allclose(out[:, ~mask], plain[:, ~mask], atol=1e-6)
    assert not torch.allclose(out[:, mask], plain[:, mask])
    # RePaint state: the known positions sit at known + t_next * fresh noise; the shown estimate is known
    t = sigma_steps(cfg)
    x3, d3 = states[3]
    resid = (x3[:, mask] - 3.0) / float(t[4])
    assert abs(float(resid.mean())) < 0.15 and float(resid.std()) == pytest.approx(1.0, abs=0.15)
    assert torch.equal(d3[:, mask], known[mask].double().expand(B, -1, -1))


# ---------------------------------------------------------------- end to end on CPU


@pytest.mark.slow
def test_end_to_end_train_lm_encode_diffuse_generate_with_prefix_evaluate(tmp_path):
    from streaming import StreamingDataset

    from trainer.diffusion.sampler import SamplerConfig
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.pipeline import Pipeline, PipelineConfig, export_pipeline

    from .test_encode_job import write_text_shards

    shards = write_text_shards(tmp_path / "text", n_train=48, n_val=16)
    # 1. the causal LM, trained briefly with Composer so that its embedding table means something
    r = run_cli("train", "yamls/autoencoder/token_embeddings_tiny_cpu.yaml", f"out_dir={tmp_path / 'lm'}",
                f"data.path={shards}", "max_duration=12ba", "batch_size=8", "eval_interval=6ba", "eval_batches=1",
                "model.tokenizer.vocab_size=300", "model.tokenizer.min_frequency=1", "model.num_tokens=12",
                "seq_len=16", "threads=1", "log_interval=1")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "lm" / "train_summary.json"))
    rows = [json.loads(x) for x in open(tmp_path / "lm" / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert summary["batches"] == 12 and losses[-1] < losses[0]         # it learnt something
    enc_dir = summary["latent_encoder_dir"]
    enc = load_latent_encoder(enc_dir)
    assert enc.latent_shape == (12, 64)
    # 2. the encode job writes [L, d] latents with the usual schema and statistics
    lat = tmp_path / "latents"
    r = run_cli("encode", "yamls/encode/token_embeddings.yaml", f"out_dir={lat}", f"autoencoder={enc_dir}",
                f"data.path={shards}", "data.splits=[train, val]", "prompt_encoder.max_length=8", "batch_size=16",
                "num_workers=1", "threads_per_slot=1")
    assert r.returncode == 0, r.stderr[-2000:]
    ds = StreamingDataset(local=str(lat / "train"), shuffle=False, batch_size=1)
    first = ds[0]
    assert first["latent"].shape == (12, 64)
    np.testing.assert_allclose(first["latent"].astype(np.float32), enc.encode([first["text"]])[0].numpy(), atol=2e-3)
    stored = enc.decode(torch.from_numpy(first["latent"].astype(np.float32))[None])[0]   # fp16 in the shard
    assert stored == enc.decode(enc.encode([first["text"]]))[0] and first["text"].startswith(stored) and stored
    stats = json.load(open(lat / "latent_stats.json"))
    assert len(stats["channel_mean"]) == 64 and stats["count_vectors"] == 48 * 12
    # 3. the diffusion job on these latents, a few batches
    r = run_cli("train", "yamls/diffusion/token_embeddings_tiny_cpu.yaml", f"out_dir={tmp_path / 'dit'}",
                f"data.path={lat / 'train'}", f"data.eval_path={lat / 'val'}", "max_duration=4ba", "batch_size=8",
                "eval_interval=4ba", "eval_batches=1", "save_interval=4ba", "threads=1", "tensorboard=false",
                "model.latent_tokens=12", "model.latent_dim=64", "model.moe_dit.dim=32", "model.moe_dit.depth=2",
                "model.moe_dit.head_dim=16", "model.moe_dit.num_experts=2", f"autoencoder={enc_dir}",
                "sample_every=0", "prompt_encoder.max_length=8")
    assert r.returncode == 0, r.stderr[-3000:]
    # with the token encoder as `autoencoder`: samples decoded at the end, and the pipeline exported
    assert (tmp_path / "dit" / "samples.txt").read_text().startswith("batch 4 |")
    assert json.load(open(tmp_path / "dit" / "pipeline" / "model_index.json"))["settings"]["latent_kind"] == "token_embeddings"
    # 4. export and generate with a prefix, showing the steps
    pipe_dir = export_pipeline(str(tmp_path / "pipe"), enc_dir, str(tmp_path / "dit" / "denoiser"),
                               PromptEncoderConfig(max_length=8), PipelineConfig(sampler=SamplerConfig(num_steps=6)))
    pipe = Pipeline.from_pretrained(pipe_dir)
    assert pipe.cfg.latent_kind == "token_embeddings"
    poems = pipe(["sonnet about the sea"], num_samples=3, prefix="the sea moon", seed=3)
    assert len(poems) == 3 and all(p.startswith("the sea moon") for p in poems)
    assert poems == pipe(["sonnet about the sea"], num_samples=3, prefix="the sea moon", seed=3)
    with pytest.raises(UserError, match="--prefix: only with --sampler heun"):
        pipe([""], prefix="the sea", sampler="ddpm")
    # a denoiser trained on whitened latents (data.normalize=whiten) cannot clamp a prefix: each whitened
    # slot mixes every slot of the latent
    from trainer.data.loaders import LatentNormalizer
    from trainer.data.whitening import Whitening

    whitened = Pipeline(pipe.autoencoder, pipe.net, {**pipe.meta, "normalize": "whiten",
                                                     "whitening": Whitening.fit(torch.randn(64, 12, 64))},
                        pipe.prompt_encoder, pipe.cfg)
    with pytest.raises(UserError, match="^--prefix: this pipeline's denoiser was trained on whitened latents"):
        whitened([""], prefix="the sea")
    assert len(whitened([""], seed=1)) == 1                          # without a prefix it generates
    out = tmp_path / "poems.json"
    r = run_cli("generate", pipe_dir, "--prompt", "sonnet about the sea", "--prefix", "the sea moon",
                "--num-samples", "2", "--steps", "6", "--show-steps", "3", "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(x["poem"].startswith("the sea moon") for x in json.load(open(out)))
    steps = [line for line in r.stdout.splitlines() if line.startswith("--- step")]
    assert len(steps) == 6 and os.path.isfile(tmp_path / "poems.html")   # 3 steps x 2 samples
    # every shown intermediate already holds the prefix (clamped), the rest resolves from noise
    blocks = r.stdout.split("--- step")[1:]
    assert all("the sea moon" in b for b in blocks)
    # 5. the generation evaluation on this latent shape
    r = run_cli("evaluate", "yamls/eval/generation.yaml", f"out_dir={tmp_path / 'eval'}", f"pipeline={pipe_dir}",
                f"latent_data={lat}", "held_out_split=val", "n_real=16", "n_prompts=2", "samples_per_prompt=4",
                "pca_dims=4", "mauve=false", "steps=4", "labels=[form]", "n_label_values=2")
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.load(open(tmp_path / "eval" / "report.json"))
    assert rep["frechet"]["pca_dims"] == 4 and len(rep["samples"]) == 8


def test_prefix_on_a_bart_pipeline_is_one_line(tmp_path):
    from trainer.pipeline.pipeline import Pipeline

    from .tiny import tiny_pipeline

    pipe = Pipeline.from_pretrained(tiny_pipeline(str(tmp_path)))
    assert pipe.cfg.latent_kind == "bart_perceiver"
    with pytest.raises(UserError, match="--prefix: needs a token_embeddings pipeline; this one is bart_perceiver"):
        pipe([""], prefix="the sea", steps=2)
