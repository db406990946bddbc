"""The exported pipeline in Hugging Face's shape: a diffusers pipeline folder.

    pipeline_dir/
      model_index.json          diffusers' index: each component's (module, class), and `settings`
                                (sampler, decoding, prompt mode, latent kind: PipelineConfig)
      denoiser/                 DenoiserModel (diffusers ModelMixin + ConfigMixin): config.json +
                                diffusion_pytorch_model.safetensors (the EMA EDMPrecond, latent statistics)
      autoencoder/              the latent encoder (LatentAutoencoder or TokenEmbeddingLatents, diffusers ModelMixin +
                                ConfigMixin, trainer/models/hf_model.py): autoencoder_config.json or
                                token_latents_config.json + diffusion_pytorch_model.safetensors + tokenizer (+ lexicon)
      prompt_encoder/           the prompt encoder's weights and tokenizer (transformers' save_pretrained, or
                                open_clip's local-dir files) and prompt_encoder.json: loads without the package
                                or hub the encoder came from
      README.md                 the model card (trainer/pipeline/model_card.py)

    from trainer.pipeline.pipeline import LatentversePipeline
    pipe = LatentversePipeline.from_pretrained("out/demo/pipeline")    # diffusers' own from_pretrained
    ae = LatentAutoencoder.from_pretrained("out/demo/pipeline/autoencoder")   # each part on its own, too
    poems = pipe(["a sonnet about the sea"], num_samples=2, steps=8)

Why diffusers and not transformers' PreTrainedModel: the denoiser is a diffusion model, and a diffusers
pipeline folder (model_index.json naming each component's class, one sub-folder per component, each
loaded with its class's from_pretrained) is the shape diffusers users know; ModelMixin/ConfigMixin take
a plain nn.Module with its constructor's arguments as config.json, which is what our modules are.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from trainer.base import config as C
from trainer.base.config import UserError
from trainer.data.whitening import Whitening
from trainer.diffusion.edm import EDMPrecond, PromptMean
from trainer.models.denoisers import DenoiserConfig, build_denoiser
# The latent encoders' modules, imported so that diffusers' loader finds the classes model_index.json names.
from trainer.models import autoencoder as _autoencoder, token_latents as _token_latents  # noqa: F401
from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder

MODEL_INDEX = "model_index.json"
PROMPT_ENCODER_JSON = "prompt_encoder.json"


class DenoiserModel(ModelMixin, ConfigMixin):
    """The EMA denoiser (EDMPrecond around a backbone) with what maps its samples back to the
    autoencoder's latents: sigma_data, the latent statistics and the normalisation mode; with normalize
    whiten also the whitening, as buffers `whitening.*` beside the net's in the safetensors file."""
    config_name = "config.json"

    @register_to_config
    def __init__(self, denoiser: dict, sigma_data: float, latent_stats: dict, normalize: str,
                 prompt_mean: bool = False, info: Optional[dict] = None):
        super().__init__()
        dcfg = C.from_dict(DenoiserConfig, denoiser, source="denoiser/config.json")
        pm = PromptMean(dcfg.prompt_dim, (dcfg.latent_tokens, dcfg.latent_dim)) if prompt_mean else None
        self.net = EDMPrecond(build_denoiser(dcfg), sigma_data=sigma_data, prompt_mean=pm)
        if normalize == "whiten":
            n = dcfg.latent_tokens * dcfg.latent_dim
            self.whitening = torch.nn.Module()
            for k, shape in (("mean", (n,)), ("whiten", (n, n)), ("unwhiten", (n, n))):
                self.whitening.register_buffer(k, torch.zeros(shape))

    @classmethod
    def from_net(cls, net: EDMPrecond, meta: dict) -> "DenoiserModel":
        """From a denoiser as `trainer.pipeline.export.load_denoiser` returns it."""
        info = {k: v for k, v in meta.items() if k not in ("denoiser", "sigma_data", "latent_stats", "normalize",
                                                            "prompt_mean", "denoiser_config", "whitening")}
        model = cls(meta["denoiser"], float(net.sigma_data), meta["latent_stats"], meta["normalize"],
                    bool(meta.get("prompt_mean")), info)
        model.net.load_state_dict(net.state_dict())
        if meta["normalize"] == "whiten":
            state = meta["whitening"].state()
            for k, buf in model.whitening.named_buffers():
                buf.copy_(state[k])
        return model.eval()

    def meta(self) -> dict:
        """The dict `Pipeline` reads (as load_denoiser's)."""
        c = self.config
        dcfg = C.from_dict(DenoiserConfig, dict(c.denoiser))
        out = {**(c.info or {}), "denoiser": dict(c.denoiser), "sigma_data": c.sigma_data,
               "latent_stats": dict(c.latent_stats), "normalize": c.normalize, "prompt_mean": c.prompt_mean,
               "denoiser_config": dcfg}
        if c.normalize == "whiten":
            w = self.whitening
            out["whitening"] = Whitening(w.mean.cpu(), w.whiten.cpu(), w.unwhiten.cpu(), (dcfg.latent_tokens, dcfg.latent_dim))
        return out


class PromptEncoderFolder(ModelMixin):
    """The prompt encoder inside the pipeline folder: its Hugging Face weights and tokenizer (minilm,
    causal_lm) or open_clip's local-dir files (open_clip_config.json + open_clip_model.safetensors), and
    prompt_encoder.json (PromptEncoderConfig, `path` left empty: it is the folder itself). A ModelMixin
    only so that diffusers' pipeline loader calls its from_pretrained, which returns the PromptEncoder."""

    @staticmethod
    def save_pretrained(path: str, cfg: PromptEncoderConfig) -> None:
        build_prompt_encoder(cfg).save_pretrained(path)
        # every path of the config points outside the folder: the folder itself replaces them
        inside = dataclasses.replace(cfg, path="", pretrained="", model_config_json="", allow_random_init=False)
        with open(os.path.join(path, PROMPT_ENCODER_JSON), "w") as f:
            json.dump(dataclasses.asdict(inside), f, indent=1)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, **_):  # noqa: ARG003
        file = os.path.join(path, PROMPT_ENCODER_JSON)
        if not os.path.isfile(file):
            raise UserError(f"{file}: missing (not a prompt encoder folder?)")
        with open(file) as f:
            cfg = C.from_dict(PromptEncoderConfig, json.load(f), source=file)
        return build_prompt_encoder(dataclasses.replace(cfg, path=path))


class AutoencoderFolder(ModelMixin):
    """What model_index.json named for the latent encoder in folders exported before the latent
    encoders were diffusers models themselves (now it names LatentAutoencoder or TokenEmbeddingLatents):
    loads such a folder's autoencoder/, whichever kind and format it holds."""

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: Optional[torch.dtype] = None, **_):
        kind = _token_latents.latent_kind(path)
        model = _autoencoder.LatentAutoencoder if kind == "bart_perceiver" else _token_latents.TokenEmbeddingLatents
        return model.from_pretrained(path, torch_dtype=torch_dtype)
