"""Export -> load -> generate: identical samples for a seed, the CLI with --show-steps, the DDPM
sampler on an EDM denoiser, and one-line errors for missing or corrupt pipeline files."""
import json
import os

import pytest
import torch

from trainer.base.config import UserError
from trainer.pipeline.pipeline import Pipeline

from .conftest import run_cli
from .tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tiny_pipeline(str(tmp_path_factory.mktemp("pipe")))


def test_export_then_load_gives_identical_samples(reconstructing_ae, tmp_path):
    """The pipeline assembled in memory from the autoencoder and denoiser folders the jobs write, before
    any export, and the exported folder loaded back sample the same latents and the same poems for a
    seed; the poems are the corpus's (the autoencoder reconstructs it) and another seed gives others."""
    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder
    from trainer.pipeline.export import load_denoiser
    from trainer.pipeline.pipeline import PipelineConfig, export_pipeline

    from .tiny import POEMS, tiny_denoiser

    den = tiny_denoiser(str(tmp_path / "den"))
    pcfg = PromptEncoderConfig(max_length=12)
    before = Pipeline(LatentAutoencoder.from_pretrained(reconstructing_ae).eval(), *load_denoiser(den),
                      build_prompt_encoder(pcfg), PipelineConfig())
    after = Pipeline.from_pretrained(export_pipeline(str(tmp_path / "pipe"), reconstructing_ae, den, pcfg))
    prompts = ["sonnet about the sea", ""]
    xa, _ = before.sample_latents(prompts, num_samples=2, steps=4, guidance=3.0, seed=7)
    xb, _ = after.sample_latents(prompts, num_samples=2, steps=4, guidance=3.0, seed=7)
    assert xa.shape == (4, 32, 64)
    torch.testing.assert_close(xa, xb, rtol=0, atol=0)
    # Other seeds, other samples: the latents of 6 seeds differ pairwise (continuous noise: by construction).
    seeds = range(7, 13)
    xs = [after.sample_latents(prompts, num_samples=2, steps=4, guidance=3.0, seed=seed)[0] for seed in seeds]
    assert torch.equal(xs[0], xa) and not any(torch.equal(a, b) for i, a in enumerate(xs) for b in xs[i + 1:])
    poems = {seed: before(prompts, num_samples=3, steps=4, seed=seed) for seed in seeds}
    assert all(p in POEMS for ps in poems.values() for p in ps), poems  # real poems, not "" or junk
    assert poems[7] == after(prompts, num_samples=3, steps=4, seed=7)
    assert poems[7] == Pipeline.from_pretrained(str(tmp_path / "pipe"))(prompts, num_samples=3, steps=4, seed=7)
    # The poems need not differ seed by seed: this denoiser reads most latents as a few poems (measured on
    # seeds 0-5: 1 pair of the 15 gave the same 6 poems, 5 distinct lists); the 6 seeds' are not all alike.
    assert len({tuple(ps) for ps in poems.values()}) >= 2, poems
    # the decoded latents sit on the encoder's sphere (norm sqrt(64) per slot)
    z = after.to_latents(xa)
    torch.testing.assert_close(z.norm(dim=-1), torch.full(z.shape[:2], 8.0), rtol=1e-4, atol=1e-4)


def test_decode_num_beams_reaches_the_decoder(reconstructing_ae, tmp_path):
    """decode.num_beams is beam search in the autoencoder's decoder: the pipeline's decode equals the
    autoencoder's beam decode, and on latents between two poems of the corpus, where the greedy reading
    can go astray, beams find a reading the decoder scores higher (and never a lower one)."""
    from .tiny import POEMS

    p = Pipeline.from_pretrained(tiny_pipeline(str(tmp_path), autoencoder=reconstructing_ae, max_length=None))
    ae = p.autoencoder
    z = ae.encode(POEMS)
    # along the way from each poem's latent to each other's, the reading switches from one poem to the
    # other somewhere; near there the greedy reading's first words can lead it astray
    mixed = torch.stack([torch.nn.functional.normalize(a * z[i] + (1 - a) * z[j], dim=-1) * 8
                         for i in range(len(POEMS)) for j in range(i + 1, len(POEMS))
                         for a in torch.linspace(0.2, 0.8, 25)])
    x = p.normalizer(mixed)                       # diffusion space, as sampled latents are
    greedy = p.decode(x)
    p.cfg.decode.num_beams = 4
    beams = p.decode(x)
    assert beams == ae.decode(p.to_latents(x), max_length=p.cfg.decode.max_length, num_beams=4)

    def loglik(texts):                            # the decoder's mean log-likelihood of each text given its latent
        labels = ae.tokenize(texts)["input_ids"]
        labels = labels.masked_fill(labels == ae.tokenizer.pad_token_id, -100)
        with torch.no_grad():
            lp = torch.log_softmax(ae.decoder_logits(mixed, labels).float(), -1)
        tok = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (labels != -100)
        return tok.sum(1) / (labels != -100).sum(1)

    differ = [k for k in range(len(beams)) if beams[k] != greedy[k]]
    assert differ, "beams read every latent as greedy decoding does"
    gain = loglik(beams) - loglik(greedy)
    assert (gain[differ] > 0).all() and (gain >= -1e-5).all(), (gain, [(greedy[k], beams[k]) for k in differ])


def test_decode_spells_from_the_autoencoders_lexicon_unless_told_not_to(pipe_dir, tmp_path):
    from .tiny import WORDS, tiny_pipeline

    from trainer.text.words import words

    p = Pipeline.from_pretrained(tiny_pipeline(str(tmp_path), lexicon=True))
    x, _ = p.sample_latents(["sonnet about the sea", ""], num_samples=3, steps=3, seed=1)
    assert p.uses_lexicon() and p.autoencoder.lexicon.words == set(WORDS)
    poems = p.decode(x)
    assert all(words(t) and set(words(t)) <= set(WORDS) for t in poems), poems
    free = p.autoencoder.decode(p.to_latents(x), max_length=p.cfg.decode.max_length)
    assert poems != free and p.decode(x, lexicon=False) == free
    p.cfg.decode.lexicon = False
    assert p.decode(x) == free and not p.uses_lexicon()
    r = run_cli("generate", tmp_path / "pipeline", "--prompt", "tanka", "--steps", "3", "--lexicon", "off")
    assert r.returncode == 0, r.stderr[-3000:]
    # A pipeline whose autoencoder has no lexicon decodes freely, and refuses decode.lexicon=true in one line.
    q = Pipeline.from_pretrained(pipe_dir)
    assert not q.uses_lexicon() and q.autoencoder.lexicon is None
    with pytest.raises(UserError, match="^decode.lexicon: this autoencoder has no lexicon"):
        q.decode(x, lexicon=True)


def test_guidance_changes_samples_and_ddpm_runs(pipe_dir):
    p = Pipeline.from_pretrained(pipe_dir)
    x1, _ = p.sample_latents(["tanka"], steps=3, guidance=1.0, seed=0)
    x5, _ = p.sample_latents(["tanka"], steps=3, guidance=5.0, seed=0)
    assert not torch.allclose(x1, x5)
    xd, _ = p.sample_latents(["tanka"], steps=20, guidance=2.0, seed=0, sampler="ddpm")
    assert xd.shape == (1, 32, 64) and torch.isfinite(xd).all()


def test_churn_adds_fresh_noise_reproducibly_and_bad_values_are_refused(pipe_dir):
    from trainer.jobs.generate import generate

    p = Pipeline.from_pretrained(pipe_dir)
    assert p.cfg.sampler.S_churn == 0
    x0, _ = p.sample_latents(["tanka"], num_samples=2, steps=4, seed=3)
    xc, _ = p.sample_latents(["tanka"], num_samples=2, steps=4, seed=3, churn=40.0)
    xc2, _ = p.sample_latents(["tanka"], num_samples=2, steps=4, seed=3, churn=40.0)
    assert not torch.allclose(x0, xc) and torch.equal(xc, xc2)
    # the pipeline's own S_churn is the default; churn=0 overrides it back to the deterministic sampler
    p.cfg.sampler.S_churn = 40.0
    assert torch.equal(p.sample_latents(["tanka"], num_samples=2, steps=4, seed=3)[0], xc)
    assert torch.equal(p.sample_latents(["tanka"], num_samples=2, steps=4, seed=3, churn=0.0)[0], x0)
    with pytest.raises(UserError, match="^--churn: only with --sampler heun"):
        p.sample_latents(["tanka"], steps=4, churn=1.0, sampler="ddpm")
    with pytest.raises(UserError, match="^--churn: must be >= 0, got -1"):
        generate(pipe_dir, ["tanka"], churn=-1.0)
    with pytest.raises(UserError, match="^--steps: must be >= 1, got 0"):
        generate(pipe_dir, ["tanka"], steps=0)


def test_cli_generate_with_show_steps(pipe_dir, tmp_path):
    out = tmp_path / "poems.json"
    r = run_cli("generate", pipe_dir, "--prompt", "sonnet about the sea", "--num-samples", "2", "--steps", "5",
                "--guidance", "2", "--seed", "0", "--show-steps", "3", "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("--- step") == 6            # 3 points x 2 samples
    results = json.loads(out.read_text())
    assert [x["sample"] for x in results] == [0, 1] and all(x["prompt"] == "sonnet about the sea" for x in results)
    page = (tmp_path / "poems.html").read_text()
    assert page.count("<table>") == 2 and "final" in page


@pytest.mark.parametrize("victim", ["model_index.json", "prompt_encoder/prompt_encoder.json",
                                    "prompt_encoder/model.safetensors", "denoiser/diffusion_pytorch_model.safetensors",
                                    "denoiser/config.json", "autoencoder/autoencoder_config.json"])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_file_is_one_line_naming_it(pipe_dir, tmp_path, victim, damage):
    import shutil

    d = tmp_path / "p"
    shutil.copytree(pipe_dir, d)
    f = d / victim
    if damage == "missing":
        os.remove(f)
    else:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError) as e:
        Pipeline.from_pretrained(str(d))
    msg = str(e.value)
    assert "\n" not in msg and victim.split("/")[-1] in msg


def test_cli_missing_pipeline_dir(tmp_path):
    r = run_cli("generate", tmp_path / "nope", "--prompt", "x")
    assert r.returncode == 2 and r.stderr.strip() == f"{tmp_path / 'nope'}: pipeline directory does not exist"


def test_meter_readings_keep_the_best_scanning_reading(tmp_path):
    """A prompt that names a meter gets, of several readings of its latent, the one that scans best in it
    (seeded, leaving the caller's random state alone); other prompts keep the greedy reading."""
    from trainer.jobs.generate import generate
    from trainer.text.prosody import scansion

    from .tiny import tiny_pipeline

    d = tiny_pipeline(str(tmp_path), lexicon=True)
    p = Pipeline.from_pretrained(d)
    assert p.cfg.decode.meter_readings == 32
    prompts = ["stanza in Iambic Tetrameter", "sonnet about the sea"]
    x, _ = p.sample_latents(prompts, num_samples=6, steps=3, seed=2)
    rows = [q for q in prompts for _ in range(6)]
    greedy = p.decode(x)
    assert p.decode(x, prompts=rows, meter_readings=1) == greedy
    state = torch.get_rng_state()
    picked = p.decode(x, prompts=rows, meter_readings=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert picked == p.decode(x, prompts=rows, meter_readings=8, seed=5)
    assert picked[6:] == greedy[6:]                      # no meter named: the greedy reading
    fit = [(scansion(a, "iambic tetrameter"), scansion(b, "iambic tetrameter")) for a, b in zip(picked[:6], greedy[:6])]
    assert all(a >= b for a, b in fit) and sum(a for a, _ in fit) > sum(b for _, b in fit), (fit, picked, greedy)
    out = generate(d, prompts[:1], num_samples=2, steps=3, seed=2, meter_readings=4)
    assert [r["meter"] for r in out["results"]] == ["iambic tetrameter"] * 2
    assert all(r["scansion"] == round(scansion(r["poem"], "iambic tetrameter"), 3) for r in out["results"])
    with pytest.raises(UserError, match="^--meter-readings: must be >= 1, got 0"):
        generate(d, prompts, meter_readings=0)
    index = json.loads((tmp_path / "pipeline" / "model_index.json").read_text())
    index["settings"]["decode"]["meter_readings"] = 0
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="decode.meter_readings: must be >= 1, got 0") as e:
        Pipeline.from_pretrained(d)
    assert "model_index.json" in str(e.value) and "\n" not in str(e.value)
