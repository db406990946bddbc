"""An exported pipeline: prompt -> poem, from one directory of safetensors and JSON (no pickles).

The folder is a diffusers pipeline (trainer/pipeline/hf.py: model_index.json, denoiser/ as a diffusers
ModelMixin, autoencoder/, prompt_encoder/ with its weights inside, README.md the model card). Folders of
the earlier format (pipeline.json with format latentverse-pipeline, the prompt encoder by reference,
the denoiser as denoiser_config.json + denoiser.safetensors) are still read.

    pipe = Pipeline.from_pretrained("out/demo/pipeline")
    poems = pipe(["sonnet about the sea"], num_samples=4, steps=18, guidance=5.0, seed=0)
    poems = pipe([""], prefix="The sea at night")   # token_embeddings: continue a text (inpainting)
"""
from __future__ import annotations

import dataclasses
import html
import json
import os
import tempfile
from typing import Literal, Optional

import diffusers
import torch
from torch import nn

from trainer.base.config import UserError
from trainer.data.loaders import LatentNormalizer, to_encoder_latents
from trainer.diffusion.sampler import SamplerConfig, edm_sampler, sigma_steps
from trainer.models.denoisers.interface import DenoiserOutput, Prompt
from trainer.pipeline.export import load_denoiser
from trainer.base.files import replace_dir
from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder
from trainer.base import config as C
from trainer.models.token_latents import latent_kind, load_latent_encoder, TokenEmbeddingLatents
from trainer.models import token_latents
from trainer.models.autoencoder import CONFIG_NAME, LatentAutoencoder, LEGACY_WEIGHTS_NAME, WEIGHTS_NAME
from trainer.models.hf_model import check_weights_file
from trainer.text.prosody import prompt_meter, scansion
from trainer.diffusion.ddpm import DDPM, DDPMConfig
from trainer.pipeline import hf, model_card

FORMAT = "latentverse-pipeline"
PIPELINE_JSON = "pipeline.json"
PROMPT_JSON = "prompt_encoder.json"


@dataclasses.dataclass
class DecodeConfig:
    max_length: Optional[int] = None   # None = the autoencoder's max_tokens
    num_beams: int = 1
    renormalize: bool = True           # put each generated slot back on the sphere the encoder uses
    # Spell only the training corpus's words (trainer/models/lexicon.py): None = when the autoencoder
    # has a lexicon (every export since lexicons are saved), true = insist on it, false = free spelling.
    lexicon: Optional[bool] = None
    # When a poem's prompt names a meter ("stanza in iambic pentameter"), read its latent this many
    # ways, the greedy reading and meter_readings - 1 sampled at reading_temperature, and keep the
    # one that scans best in that meter (trainer.text.prosody.scansion: the CMU dictionary's stresses
    # against the meter's patterns); 1 = the greedy reading only. The BART autoencoder only.
    meter_readings: int = 32
    reading_temperature: float = 0.7

    def __post_init__(self):
        if self.meter_readings < 1:
            raise ValueError(f"decode.meter_readings: must be >= 1, got {self.meter_readings}")
        if not self.reading_temperature > 0:
            raise ValueError(f"decode.reading_temperature: must be > 0, got {self.reading_temperature}")


@dataclasses.dataclass
class PipelineConfig:
    sampler: SamplerConfig = dataclasses.field(default_factory=lambda: SamplerConfig(guidance_scale=3.0))
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    prompt_mode: Literal["tokens", "pooled", "both"] = "both"
    latent_kind: Literal["bart_perceiver", "token_embeddings"] = "bart_perceiver"  # set by export_pipeline
    # token_embeddings: the guidance scale used with a prefix when none is given.
    prefix_guidance: float = 5.0


def export_pipeline(path: str, autoencoder_dir: str, denoiser_dir: str, prompt_encoder: PromptEncoderConfig,
                    cfg: Optional[PipelineConfig] = None, card: Optional[dict] = None) -> str:
    """Assemble a pipeline directory in diffusers' shape (trainer/pipeline/hf.py; written to a temporary
    name, then renamed into place); `card`: what the model card says about data and training."""
    cfg = cfg or PipelineConfig()
    for what, d in (("autoencoder", autoencoder_dir), ("denoiser", denoiser_dir)):
        if not os.path.isdir(d):
            raise UserError(f"{d}: {what} directory does not exist")
    # The kind is a fact of the latent encoder directory, not a choice.
    kind = latent_kind(autoencoder_dir)
    cfg = dataclasses.replace(cfg, latent_kind="bart_perceiver" if kind == "bart_perceiver" else "token_embeddings")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pipeline-", dir=parent)
    # Loaded and saved again: the folder gets diffusers' format whatever the input's (a plain Qwen /
    # SmolLM2 directory is wrapped, so the pipeline holds its scale; an older export is converted).
    latent_encoder = load_latent_encoder(autoencoder_dir)
    latent_encoder.save_pretrained(os.path.join(tmp, "autoencoder"))
    net, meta = load_denoiser(denoiser_dir)
    hf.DenoiserModel.from_net(net, meta).save_pretrained(os.path.join(tmp, "denoiser"))
    hf.PromptEncoderFolder.save_pretrained(os.path.join(tmp, "prompt_encoder"), prompt_encoder)

    index = {"_class_name": LatentversePipeline.__name__, "_diffusers_version": diffusers.__version__,
             "autoencoder": [type(latent_encoder).__module__, type(latent_encoder).__name__],
             "denoiser": [hf.DenoiserModel.__module__, hf.DenoiserModel.__name__],
             "prompt_encoder": [hf.PromptEncoderFolder.__module__, hf.PromptEncoderFolder.__name__],
             "settings": dataclasses.asdict(cfg)}
    with open(os.path.join(tmp, hf.MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=1)
    model_card.write(tmp, card or {})
    replace_dir(tmp, path)
    return path


_NEW_FILES = ("denoiser/config.json", "prompt_encoder/" + hf.PROMPT_ENCODER_JSON)
_NEW_WEIGHTS = ("denoiser/diffusion_pytorch_model.safetensors", "prompt_encoder/model.safetensors")


def _load_hf_folder(path: str, device: str) -> "Pipeline":
    """A diffusers-shaped folder through diffusers' own from_pretrained, each damaged file named in one line."""
    index_file = os.path.join(path, hf.MODEL_INDEX)
    settings = _read_json(index_file).get("settings", {})
    C.from_dict(PipelineConfig, settings, source=index_file)
    ae_class = TokenEmbeddingLatents if settings.get("latent_kind") == "token_embeddings" else LatentAutoencoder
    for rel in (*_NEW_FILES, "autoencoder/" + ae_class.config_name):
        _read_json(os.path.join(path, rel))
    # folders exported before the latent encoders were diffusers models hold safetensors' model.safetensors
    ae_weights = LEGACY_WEIGHTS_NAME if ae_class.is_legacy(os.path.join(path, "autoencoder")) else WEIGHTS_NAME
    for rel in (*_NEW_WEIGHTS, "autoencoder/" + ae_weights):
        check_weights_file(os.path.join(path, rel))
    try:
        pipe = LatentversePipeline.from_pretrained(path)
    except UserError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load the pipeline: {first}") from None
    out = pipe.as_pipeline()
    out.autoencoder, out.net, out.prompt_encoder = (m.to(device) for m in (out.autoencoder, out.net, out.prompt_encoder))
    out.path = path
    return out


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing (not a pipeline directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: corrupt JSON ({e})") from None


def _load_autoencoder(path: str, device: str, kind: str = "bart_perceiver"):
    """The latent encoder of the pipeline's kind, with a damaged file named in a one-line error."""
    if kind == "token_embeddings":
        cfg_file = os.path.join(path, token_latents.CONFIG_NAME)
        if _read_json(cfg_file).get("latent_kind") != kind:  # names a missing or corrupt config
            raise UserError(f"{cfg_file}: latent_kind is not {kind!r}")
        return token_latents.TokenEmbeddingLatents.from_pretrained(path).to(device)
    _read_json(os.path.join(path, CONFIG_NAME))  # names a missing or corrupt config
    try:
        return LatentAutoencoder.from_pretrained(path).to(device)
    except UserError:
        raise
    except Exception as e:  # safetensors / transformers raise many types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        weights = LEGACY_WEIGHTS_NAME if LatentAutoencoder.is_legacy(path) else WEIGHTS_NAME
        raise UserError(f"{os.path.join(path, weights)}: cannot load the autoencoder: {first}") from None


def best_scanning_readings(autoencoder, z: torch.Tensor, texts: list[str], meters: list[str], readings: int,
                   temperature: float = 0.7, seed: int = 0, batch: int = 32, **decode_kwargs) -> list[str]:
    """`texts`, the greedy readings of latents z, with each one whose meter is not "" replaced by the
    reading that scans best in it (trainer.text.prosody.scansion) of `readings`: the greedy one and
    readings - 1 sampled at `temperature` (drawn from their own generator seeded by `seed`);
    ties go to the earlier reading, so the greedy one stays unless another scans better."""
    texts = list(texts)
    rows = [i for i, m in enumerate(meters) if m]
    if readings < 2 or not rows:
        return texts
    g = torch.Generator().manual_seed(seed)
    for lo in range(0, len(rows), batch):
        part = rows[lo:lo + batch]
        sampled = autoencoder.decode(z[part], sample=(temperature, g), repeats=readings - 1, **decode_kwargs)
        for j, i in enumerate(part):
            cands = [texts[i]] + sampled[j * (readings - 1):(j + 1) * (readings - 1)]
            fit = [scansion(t, meters[i]) for t in cands]
            texts[i] = cands[max(range(readings), key=lambda k: (fit[k], -k))]
    return texts


class _EDMAsEpsilon(nn.Module):
    """Lets DDPM's ancestral sampler run an EDM denoiser: x_t = sqrt(a) (y + sigma n) with
    sigma = sqrt((1 - a) / a), so eps = (x_t / sqrt(a) - D(x_t / sqrt(a); sigma)) / sigma.
    A self-conditioning net gets its previous call's estimate (one sampling run per instance)."""

    def __init__(self, net, alphas_cumprod: torch.Tensor, num_train_timesteps: int):
        super().__init__()
        self.net, self.T = net, num_train_timesteps
        self.register_buffer("abar", alphas_cumprod.double(), persistent=False)
        self.prev: Optional[torch.Tensor] = None

    def null_prompt(self, batch, length=None):
        return self.net.null_prompt(batch, length)

    def forward(self, x_t, c_noise, prompt_emb=None, prompt_mask=None, prompt_pooled=None, **_):
        t = (c_noise.double() * self.T).round().long().clamp(0, self.T - 1)
        a = self.abar.to(x_t.device)[t].view(-1, 1, 1)
        sigma = ((1 - a) / a).sqrt()
        x = (x_t.double() / a.sqrt()).to(x_t.dtype)
        extra = {}
        if getattr(self.net, "self_conditioning", False) and self.prev is not None and self.prev.shape == x.shape:
            extra["self_cond"] = self.prev
        D = self.net(x, sigma.view(-1).to(x_t.dtype), Prompt(prompt_emb, prompt_mask, prompt_pooled), **extra).sample
        if getattr(self.net, "self_conditioning", False):
            self.prev = D
        return DenoiserOutput(((x.double() - D.double()) / sigma).to(x_t.dtype))


class Pipeline:
    def __init__(self, autoencoder, net, meta: dict, prompt_encoder, cfg: PipelineConfig, path: str = ""):
        self.autoencoder, self.net, self.meta = autoencoder, net, meta
        self.prompt_encoder, self.cfg, self.path = prompt_encoder, cfg, path
        self.normalizer = LatentNormalizer(meta["latent_stats"], meta["normalize"], meta.get("whitening"))

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> "Pipeline":
        if not os.path.isdir(path):
            raise UserError(f"{path}: pipeline directory does not exist")
        if not os.path.isfile(os.path.join(path, PIPELINE_JSON)):
            return _load_hf_folder(path, device)
        meta = _read_json(os.path.join(path, PIPELINE_JSON))
        if meta.pop("format", None) != FORMAT:
            raise UserError(f"{os.path.join(path, PIPELINE_JSON)}: not a {FORMAT} file")
        meta.pop("version", None)
        cfg = C.from_dict(PipelineConfig, meta, source=os.path.join(path, PIPELINE_JSON))
        pcfg = C.from_dict(PromptEncoderConfig, _read_json(os.path.join(path, PROMPT_JSON)),
                           source=os.path.join(path, PROMPT_JSON))
        ae = _load_autoencoder(os.path.join(path, "autoencoder"), device, cfg.latent_kind)
        net, dmeta = load_denoiser(os.path.join(path, "denoiser"), map_location=device)
        return cls(ae, net, dmeta, build_prompt_encoder(pcfg).to(device), cfg, path)

    @classmethod
    def decoder_only(cls, autoencoder_dir: str, latent_stats: dict, device: str = "cpu") -> "Pipeline":
        """A latent encoder's folder as a pipeline without a denoiser: `decode` and `to_latents` read
        latents of its own space (no normalisation) as an exported pipeline does (lexicon, renormalised
        slots); sampling needs a denoiser. For evaluating a model that makes no latents (a token LM)."""
        kind = "bart_perceiver" if latent_kind(autoencoder_dir) == "bart_perceiver" else "token_embeddings"
        return cls(load_latent_encoder(autoencoder_dir, device), None, {"latent_stats": latent_stats, "normalize": "none"},
                   None, PipelineConfig(latent_kind=kind), autoencoder_dir)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> Prompt:
        tokens, mask, pooled = self.prompt_encoder(prompts)
        mode = self.cfg.prompt_mode
        return Prompt(tokens if mode != "pooled" else None, mask if mode != "pooled" else None,
                      pooled if mode != "tokens" else None)

    def to_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space -> the autoencoder's latent space (inverse normalisation, optional renorm)."""
        return to_encoder_latents(x, self.normalizer, self.cfg.latent_kind, self.cfg.decode.renormalize)

    def uses_lexicon(self, lexicon: Optional[bool] = None) -> bool:
        """Whether decode spells from the lexicon: `lexicon` if given, else decode.lexicon."""
        want = self.cfg.decode.lexicon if lexicon is None else lexicon
        if want is None:
            return getattr(self.autoencoder, "lexicon", None) is not None
        if want and not hasattr(self.autoencoder, "lexicon"):
            raise UserError(f"decode.lexicon: {self.cfg.latent_kind} latents decode by nearest token; "
                            "only the BART autoencoder spells from a lexicon")
        return bool(want)

    def decode(self, x: torch.Tensor, lexicon: Optional[bool] = None, prompts: Optional[list[str]] = None,
               meter_readings: Optional[int] = None, seed: int = 0) -> list[str]:
        """Diffusion-space latents -> poems; `lexicon` overrides decode.lexicon for this call.
        `prompts` (one per latent): where one names a meter, its latent is read `meter_readings`
        (default decode.meter_readings) ways and the reading that scans best in it is kept; the
        sampled readings are seeded by `seed`."""
        d = self.cfg.decode
        kw = {"lexicon": True} if self.uses_lexicon(lexicon) else {}
        texts = self.autoencoder.decode(self.to_latents(x), max_length=d.max_length, num_beams=d.num_beams, **kw)
        if prompts is None:
            return texts
        return self.read_for_meter(x, texts, prompts, lexicon, meter_readings, seed)

    def meter_readings(self, override: Optional[int] = None) -> int:
        """How many readings of a latent decode weighs for a prompt naming a meter: `override` if
        given, else decode.meter_readings; 1 for token-embedding latents (they decode by nearest token)."""
        if self.cfg.latent_kind != "bart_perceiver":
            return 1
        return self.cfg.decode.meter_readings if override is None else override

    def read_for_meter(self, x: torch.Tensor, texts: list[str], prompts: list[str], lexicon: Optional[bool] = None,
                       meter_readings: Optional[int] = None, seed: int = 0) -> list[str]:
        """`texts`, the (greedy) readings of latents x made for `prompts`, with the best-scanning of
        `meter_readings` readings (see `decode`) for each prompt that names a meter."""
        if len(prompts) != len(texts):
            raise ValueError(f"decode: {len(prompts)} prompts for {len(texts)} latents")
        n = self.meter_readings(meter_readings)
        if n < 2:
            return list(texts)
        d = self.cfg.decode
        kw = {"lexicon": True} if self.uses_lexicon(lexicon) else {}
        return best_scanning_readings(self.autoencoder, self.to_latents(x), texts, [prompt_meter(p) for p in prompts], n,
                              d.reading_temperature, seed, max_length=d.max_length, **kw)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], num_samples: int = 1, steps: Optional[int] = None,
                       guidance: Optional[float] = None, seed: int = 0, sampler: str = "heun",
                       show_steps: int = 0, prefix: Optional[str] = None,
                       churn: Optional[float] = None) -> tuple[torch.Tensor, list[dict]]:
        """Diffusion-space samples [len(prompts) * num_samples, T, C] (prompt-major), and the
        trace of `show_steps` intermediate denoised estimates (each {"step", "sigma", "x0"}).
        `steps`, `guidance`, `churn` (the Heun sampler's S_churn) override the pipeline's sampler.
        `prefix` (token_embeddings only): every sample continues this text; its token embeddings are
        clamped into the first positions at every step (inpainting)."""
        inpaint = None
        if prefix is not None:
            if self.cfg.latent_kind != "token_embeddings":
                raise UserError(f"--prefix: needs a token_embeddings pipeline; this one is {self.cfg.latent_kind}")
            if sampler != "heun":
                raise UserError("--prefix: only with --sampler heun")
            if self.normalizer.mode == "whiten":   # inpainting clamps slots; whitening mixes every slot into each
                raise UserError("--prefix: this pipeline's denoiser was trained on whitened latents (data.normalize="
                                "whiten), whose slots each mix all of the latent's slots: it cannot clamp a prefix")
            z, known = self.autoencoder.prefix_latents(prefix)             # [T, C], [T]
            inpaint = (self.normalizer(z).to(self.device), known.to(self.device))
            guidance = self.cfg.prefix_guidance if guidance is None else guidance
        scfg = dataclasses.replace(self.cfg.sampler, **{k: v for k, v in
                                                        (("num_steps", steps), ("guidance_scale", guidance),
                                                         ("S_churn", churn)) if v is not None})
        if churn is not None and sampler != "heun":
            raise UserError("--churn: only with --sampler heun")
        prompt = self.encode_prompts(list(prompts)).repeat(num_samples)
        B = len(prompts) * num_samples
        T, Cdim = self.net.backbone.latent_shape
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(B, T, Cdim, generator=g).to(self.device)
        prompt = Prompt(*(None if t is None else t.to(self.device) for t in prompt))
        trace: list[dict] = []
        if sampler == "heun":
            marks = set(torch.linspace(0, scfg.num_steps - 1, show_steps).round().long().tolist()) if show_steps else set()
            sig = sigma_steps(scfg)

            def cb(i, x, denoised):
                if i in marks:
                    trace.append({"step": i + 1, "sigma": float(sig[i]), "x0": denoised.float().cpu()})

            x = edm_sampler(self.net, noise, prompt, scfg, generator=g, callback=cb if show_steps else None,
                            inpaint=inpaint)
        elif sampler == "ddpm":
            n = steps or 1000
            ddpm = DDPM(nn.Identity(), DDPMConfig(num_inference_steps=n, guidance_scale=scfg.guidance_scale))
            ddpm.backbone = _EDMAsEpsilon(self.net, ddpm.scheduler.alphas_cumprod, ddpm.cfg.num_train_timesteps)
            x = ddpm.sample(noise, prompt, generator=None)
        else:
            raise UserError(f"sampler: expected heun or ddpm, got {sampler!r}")
        return x, trace

    def __call__(self, prompts: list[str] | str, num_samples: int = 1, steps: Optional[int] = None,
                 guidance: Optional[float] = None, seed: int = 0, sampler: str = "heun",
                 prefix: Optional[str] = None) -> list[str]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        x, _ = self.sample_latents(prompts, num_samples, steps, guidance, seed, sampler, prefix=prefix)
        return self.decode(x, prompts=[p for p in prompts for _ in range(num_samples)], seed=seed)


def show_steps_html(prompts: list[str], num_samples: int, trace: list[dict], finals: list[str]) -> str:
    """An HTML page: one table per sample, one row per shown step, text from noise to poem."""
    out = ["<!doctype html><meta charset=utf-8><title>latentverse: sampling steps</title>",
           "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px 10px;border-bottom:1px solid #ddd}"
           "pre{margin:0;font-family:Georgia,serif}</style>"]
    for b, final in enumerate(finals):
        out.append(f"<h3>{html.escape(prompts[b // num_samples]) or '(no prompt)'} — sample {b % num_samples}</h3>")
        out.append("<table><tr><th>step</th><th>sigma</th><th>decoded</th></tr>")
        for t in trace:
            out.append(f"<tr><td>{t['step']}</td><td>{t['sigma']:.3f}</td><td><pre>{html.escape(t['texts'][b])}</pre></td></tr>")
        out.append(f"<tr><td>final</td><td>0</td><td><pre>{html.escape(final)}</pre></td></tr></table>")
    return "\n".join(out)


class LatentversePipeline(diffusers.DiffusionPipeline):
    """prompt -> poem; `as_pipeline()` is the full `trainer.pipeline.pipeline.Pipeline` (samplers,
    meter readings, prefixes) over the same components."""

    def __init__(self, denoiser: hf.DenoiserModel, autoencoder: nn.Module, prompt_encoder: nn.Module,
                 settings: Optional[dict] = None):
        super().__init__()
        self.register_modules(denoiser=denoiser, autoencoder=autoencoder, prompt_encoder=prompt_encoder)
        self.register_to_config(settings=settings or {})

    def as_pipeline(self):
        cfg = C.from_dict(PipelineConfig, dict(self.config.settings), source=hf.MODEL_INDEX)
        return Pipeline(self.autoencoder.eval(), self.denoiser.net.eval().requires_grad_(False), self.denoiser.meta(),
                        self.prompt_encoder, cfg, "")

    def __call__(self, prompts, num_samples: int = 1, steps: Optional[int] = None, guidance: Optional[float] = None,
                 seed: int = 0, **kwargs) -> list[str]:
        return self.as_pipeline()(prompts, num_samples=num_samples, steps=steps, guidance=guidance, seed=seed, **kwargs)
