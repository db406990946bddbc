"""BART-Perceiver latent autoencoder: a poem of up to `max_tokens` tokens <-> a fixed latent [32, 64].

    text -> tokenizer -> BART encoder -> Perceiver resampler -> latent z [num_latents, dim_latent]
    z -> reconstruction network -> [num_latents, d_model] -> BART decoder (cross-attends) -> text

Lovelace et al., "Latent Diffusion for Language Generation" (2023): the pretrained BART is frozen and
only the Perceiver parts learn. Without a pretrained path a small BART is built from its config and the
whole thing trains end to end. PyTorch + transformers, a diffusers ModelMixin for saving and loading
(trainer/models/hf_model.py); Composer lives in trainer/training/autoencoder_model.py.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from trainer.models.perceiver import PerceiverResampler, ReconstructionNetwork
from trainer.base.config import UserError
from trainer.models.hf_model import TextLatentModel
# diffusers' pipeline loader finds a component's base class by name in the component's own module
from diffusers import ModelMixin  # noqa: F401
from trainer.models.lexicon import Lexicon, LexiconLogitsProcessor
from trainer.models.tokenizers import load_tokenizer

CONFIG_NAME = "autoencoder_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"   # diffusers' file name
LEGACY_WEIGHTS_NAME = "model.safetensors"              # folders saved before the diffusers format


@dataclasses.dataclass
class AutoencoderConfig:
    # A local BART checkpoint dir (e.g. a downloaded facebook/bart-base); None builds BART from the sizes below.
    pretrained_path: Optional[str] = None
    freeze_bart: bool = True            # only with pretrained_path: train the Perceiver parts only (as the paper)
    max_tokens: int = 64                # longest poem in tokens, <s> and </s> included; longer ones are cut
    num_latents: int = 32               # latent slots
    dim_latent: int = 64                # dims per slot
    # BART built from config (ignored when pretrained_path is set).
    d_model: int = 128
    encoder_layers: int = 2
    decoder_layers: int = 2
    attention_heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.0
    # Perceiver resampler (compression) and reconstruction network.
    perceiver_depth: int = 2
    perceiver_heads: int = 4
    perceiver_dim_head: int = 32
    reconstruction_depth: int = 2
    ff_mult: int = 4
    # Training only: each decoder input token is replaced by <mask> with this probability, so the
    # decoder cannot predict from its own prefix alone and has to read the latent.
    decoder_token_dropout: float = 0.0
    # Optional schedule that replaces decoder_token_dropout while training: linear from _start to _end
    # over _anneal_steps optimizer steps, then _end. A start of 1.0 masks every decoder input, so early
    # on the decoder must reconstruct from the latent (and positions) alone instead of its own prefix.
    decoder_token_dropout_start: Optional[float] = None
    decoder_token_dropout_end: Optional[float] = None
    decoder_token_dropout_anneal_steps: int = 0
    # Bag-of-words auxiliary loss weight (0 = off): a linear head on the mean decoder memory predicts
    # the poem's tokens (softmax over the vocabulary, averaged over target tokens), which pushes content
    # into the latent before the decoder learns to babble from its prefix.
    bow_loss_weight: float = 0.0
    # Training only: Gaussian noise of std sigma ~ U(0, latent_noise) per poem (in units of the
    # latent's per-coordinate std, 1 on the encoder's sphere) is added to the latent the decoder reads,
    # and each slot put back on the sphere. The encoder learns to keep poems apart by more than that
    # margin, so a latent the diffusion model gets slightly wrong still decodes to words.
    latent_noise: float = 0.0

    def __post_init__(self):
        if self.latent_noise < 0:
            raise ValueError(f"latent_noise must be >= 0, got {self.latent_noise}")
        if self.pretrained_path is not None and not os.path.exists(self.pretrained_path):
            raise ValueError(f"pretrained_path: path does not exist: {self.pretrained_path!r}")
        if not 4 <= self.max_tokens <= 512:
            raise ValueError(f"max_tokens must be in 4..512, got {self.max_tokens}")
        if not 0.0 <= self.decoder_token_dropout < 1.0:
            raise ValueError(f"decoder_token_dropout must be in [0, 1), got {self.decoder_token_dropout}")
        sched = (self.decoder_token_dropout_start, self.decoder_token_dropout_end)
        if (sched[0] is None) != (sched[1] is None):
            raise ValueError("decoder_token_dropout_start and decoder_token_dropout_end must be set together")
        for name, v in zip(("decoder_token_dropout_start", "decoder_token_dropout_end"), sched):
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.decoder_token_dropout_anneal_steps < 0:
            raise ValueError(f"decoder_token_dropout_anneal_steps must be >= 0, got {self.decoder_token_dropout_anneal_steps}")
        if self.bow_loss_weight < 0:
            raise ValueError(f"bow_loss_weight must be >= 0, got {self.bow_loss_weight}")

    def token_dropout_at(self, step: int) -> float:
        """Decoder-input mask probability at optimizer step `step` (training)."""
        if self.decoder_token_dropout_start is None:
            return self.decoder_token_dropout
        a, b, n = self.decoder_token_dropout_start, self.decoder_token_dropout_end, self.decoder_token_dropout_anneal_steps
        if n == 0 or step >= n:
            return b
        return a + (b - a) * max(step, 0) / n


def _build_bart(cfg: AutoencoderConfig, tokenizer, bart_config: Optional[dict] = None):
    from transformers import BartConfig, BartForConditionalGeneration

    if bart_config is not None:  # from_pretrained of our own dir: exact config, weights come from safetensors
        return BartForConditionalGeneration(BartConfig(**bart_config))
    if tokenizer is None:
        raise ValueError("LatentAutoencoder: a tokenizer is needed to build BART without a saved bart_config")
    if cfg.pretrained_path:
        try:
            return BartForConditionalGeneration.from_pretrained(cfg.pretrained_path)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"model.pretrained_path: {cfg.pretrained_path}: cannot load a BART checkpoint: {msg}") from None
    bc = BartConfig(
        vocab_size=len(tokenizer), d_model=cfg.d_model, encoder_layers=cfg.encoder_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.attention_heads,
        decoder_attention_heads=cfg.attention_heads, encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        dropout=cfg.dropout, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=max(cfg.max_tokens + 2, 64),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=None)
    return BartForConditionalGeneration(bc)


class _GumbelMax:
    """A logits processor for greedy search that makes it sample: scores / temperature + Gumbel noise
    (drawn with `generator`), whose argmax is a draw from softmax(scores / temperature); a token
    ruled out (-inf) stays out."""

    def __init__(self, temperature: float, generator: torch.Generator):
        self.temperature, self.generator = temperature, generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        g = torch.rand(scores.shape, generator=self.generator).clamp_(min=1e-12).log_().neg_().log_()  # -Gumbel
        return scores / self.temperature - g.to(scores.device, scores.dtype)


class LatentAutoencoder(TextLatentModel):
    """A diffusers model (trainer/models/hf_model.py): `save_pretrained` writes autoencoder_config.json
    (the constructor's arguments: cfg, bart_config, frozen), diffusion_pytorch_model.safetensors, the
    tokenizer and the lexicon; `LatentAutoencoder.from_pretrained(dir)` is diffusers' own loader."""

    config_name = CONFIG_NAME
    what = "an autoencoder"

    def __init__(self, cfg: AutoencoderConfig | dict, tokenizer=None, bart_config: Optional[dict] = None,
                 frozen: Optional[bool] = None):
        """`tokenizer`: None only when diffusers builds the model from its config (from_pretrained
        attaches the saved one). `bart_config`, `frozen`: as saved (the BART then comes from its config
        and the weights file, not from cfg.pretrained_path)."""
        super().__init__()
        if isinstance(cfg, dict):
            cfg = _config_from_dict(cfg)
        self.cfg, self.tokenizer = cfg, None
        # The training corpus's words (trainer.models.lexicon), saved with the export; decode(lexicon=True)
        # spells only these.
        self.lexicon = None
        self.bart = _build_bart(cfg, tokenizer, bart_config)
        bc = self.bart.config
        d_model = bc.d_model
        self.frozen = bool(cfg.pretrained_path) and cfg.freeze_bart if frozen is None else bool(frozen)
        if self.frozen:
            self.bart.requires_grad_(False)
        self.perceiver = PerceiverResampler(d_model, cfg.dim_latent, cfg.num_latents, cfg.perceiver_depth,
                                            cfg.perceiver_heads, cfg.perceiver_dim_head, cfg.max_tokens, cfg.ff_mult)
        self.reconstruction = ReconstructionNetwork(cfg.dim_latent, d_model, cfg.num_latents,
                                                    cfg.reconstruction_depth, cfg.perceiver_heads, cfg.ff_mult)
        # Bag-of-words head: mean memory [B, d_model] -> vocabulary logits [B, V] (only with bow_loss_weight).
        self.bow_head = nn.Linear(d_model, bc.vocab_size) if cfg.bow_loss_weight > 0 else None
        # Optimizer step the token-dropout schedule reads; set by the trainer each batch (not a weight).
        self.train_step = 0
        # BART convention: the decoder starts from </s> and first predicts <s>.
        self.decoder_start_id = bc.decoder_start_token_id
        # The config diffusers writes: the weights file holds every BART weight, so a load needs no
        # pretrained_path (which may not exist on the loading machine).
        self.register_to_config(cfg=dataclasses.asdict(dataclasses.replace(cfg, pretrained_path=None)),
                                bart_config=_plain_bart_config(bc), frozen=self.frozen)
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer)

    def attach_tokenizer(self, tokenizer) -> None:
        if self.bart.config.vocab_size < len(tokenizer):
            raise UserError(f"tokenizer has {len(tokenizer)} tokens but the BART checkpoint only "
                            f"{self.bart.config.vocab_size}")
        self.tokenizer = tokenizer
        if self.decoder_start_id is None:
            self.decoder_start_id = tokenizer.eos_token_id

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.cfg.num_latents, self.cfg.dim_latent)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.bart.eval()  # a frozen BART keeps its dropout off
        return self

    # ---- tensors in, tensors out (training) ----

    def tokenize(self, texts: list[str]) -> dict:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_tokens, padding=True,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> latent z [B, num_latents, dim_latent]."""
        if input_ids.shape[1] > self.cfg.max_tokens:
            raise UserError(f"input has {input_ids.shape[1]} tokens, more than max_tokens={self.cfg.max_tokens}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            h = self.bart.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.perceiver(h, attention_mask)  # [B, T, d_model] -> [B, N, dim_latent]

    def check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 3 or tuple(z.shape[1:]) != self.latent_shape:
            raise UserError(f"latents must have shape [batch, {self.latent_shape[0]}, {self.latent_shape[1]}], "
                            f"got {list(z.shape)}")

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        """Latent [B, N, dim_latent] -> decoder memory [B, N, d_model]."""
        self.check_latents(z)
        return self.reconstruction(z)

    def decoder_logits(self, z: torch.Tensor, labels: torch.Tensor, token_dropout: float = 0.0,
                       memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] for reproducing `labels` [B, T] (pad = -100) from z."""
        if memory is None:
            memory = self.reconstruct(z)
        ids = labels.masked_fill(labels == -100, self.tokenizer.pad_token_id)
        dec_in = torch.cat([ids.new_full((ids.shape[0], 1), self.decoder_start_id), ids[:, :-1]], dim=1)
        dec_mask = torch.cat([torch.ones_like(ids[:, :1]), (labels[:, :-1] != -100).long()], dim=1)
        if token_dropout > 0:
            drop = torch.rand(dec_in.shape, device=dec_in.device) < token_dropout
            drop[:, 0] = False  # keep the start token
            dec_in = dec_in.masked_fill(drop & (dec_mask > 0), self.tokenizer.mask_token_id)
        out = self.bart(encoder_outputs=(memory,), decoder_input_ids=dec_in, decoder_attention_mask=dec_mask,
                        use_cache=False)
        return out.logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """The reconstruction loss: encode, then decode the same tokens teacher-forced."""
        z = self.encode_ids(input_ids, attention_mask)
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        p = self.cfg.token_dropout_at(self.train_step) if self.training else 0.0
        memory = self.reconstruct(self.noised(z) if self.training else z)  # [B, N, d_model]
        logits = self.decoder_logits(z, labels, p, memory=memory)
        rec = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        out = {"loss": rec, "reconstruction_loss": rec, "logits": logits, "labels": labels, "latents": z}
        if self.bow_head is not None:
            out["bow_loss"] = bow = self.bow_loss(memory, labels)
            out["loss"] = rec + self.cfg.bow_loss_weight * bow
        return out

    def set_latent_prior(self, mean: torch.Tensor, factor: torch.Tensor, mix: float) -> None:
        """Decoder adaptation (training only): each poem's latent is pulled toward a draw from the
        Gaussian N(mean, factor factor^T) fitted to the encoder's latents,
            z' = mean + sqrt(1 - a) (z - mean) + sqrt(a) g,   a ~ U(0, mix) per poem,
        which keeps the latents' covariance. A diffusion model early in training samples much like that
        Gaussian (its denoiser is close to the linear one), so a decoder trained on z' turns its samples
        into words where one trained on clean latents spells junk. Not saved with the weights."""
        if not 0.0 < mix <= 1.0:
            raise ValueError(f"prior mix must be in (0, 1], got {mix}")
        # Buffers, so they move with the model once; non-persistent: not in the saved weights.
        self.register_buffer("prior_mean", mean.reshape(-1).float().to(self.device), persistent=False)
        self.register_buffer("prior_factor", factor.float().to(self.device), persistent=False)
        self.prior_mix = float(mix)

    def noised(self, z: torch.Tensor) -> torch.Tensor:
        """z plus N(0, sigma^2) with sigma ~ U(0, latent_noise) per poem, slots back on the sphere; and
        pulled toward the latent prior when one is set (set_latent_prior)."""
        if getattr(self, "prior_factor", None) is not None:
            mean, factor = self.prior_mean, self.prior_factor
            a = torch.rand(z.shape[0], 1, device=z.device, dtype=z.dtype) * self.prior_mix
            g = torch.randn(z.shape[0], factor.shape[1], device=z.device, dtype=z.dtype) @ factor.T
            z = (mean + (1 - a).sqrt() * (z.reshape(len(z), -1) - mean) + a.sqrt() * g).reshape(z.shape)
            if self.perceiver.l2_normalize:
                z = F.normalize(z, dim=-1) * math.sqrt(z.shape[-1])
        if self.cfg.latent_noise <= 0:
            return z
        sigma = torch.rand(z.shape[0], 1, 1, device=z.device, dtype=z.dtype) * self.cfg.latent_noise
        zn = z + sigma * torch.randn_like(z)
        if self.perceiver.l2_normalize:
            zn = F.normalize(zn, dim=-1) * math.sqrt(z.shape[-1])
        return zn

    def bow_loss(self, memory: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the poem's tokens under one order-free distribution read off the memory."""
        logp = F.log_softmax(self.bow_head(memory.mean(dim=1)).float(), dim=-1)  # [B, V]
        keep = labels != -100
        tok_logp = logp.gather(1, labels.clamp_min(0))  # [B, T]
        return -(tok_logp * keep).sum() / keep.sum().clamp_min(1)

    # ---- texts in, texts out (inference) ----

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def clip_texts(self, texts: list[str]) -> list[str]:
        """The texts as a latent can hold them: cut to the max_tokens the encoder reads."""
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.cfg.max_tokens)["input_ids"]
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Poems -> latents [B, num_latents, dim_latent]."""
        enc = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self.encode_ids(**enc)

    @torch.no_grad()
    def generate_ids(self, latents: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
                     lexicon: bool = False, sample: Optional[tuple[float, torch.Generator]] = None,
                     repeats: int = 1, **generate_kwargs) -> torch.Tensor:
        """Latents -> token ids [B, <=max_length] (greedy with num_beams=1), start token stripped.
        `lexicon`: spell only the words of the autoencoder's lexicon (see trainer.models.lexicon).
        `sample` = (temperature, generator): sample each token instead, from the (lexicon's) softmax of
        the logits / temperature, drawn with that generator (the Gumbel-max trick: the argmax of
        logits / temperature plus Gumbel noise is such a draw, and faster here than transformers'
        multinomial over a thousand rows). `repeats`: decode each latent that many times in a row
        (its decoder memory computed once), as the sampled readings are."""
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.modeling_outputs import BaseModelOutput

        latents = latents.to(self.device, dtype=next(self.reconstruction.parameters()).dtype)
        memory = self.reconstruct(latents).repeat_interleave(repeats, dim=0)
        tok = self.tokenizer
        gen = GenerationConfig(max_length=(max_length or self.cfg.max_tokens) + 1, num_beams=num_beams,
                               decoder_start_token_id=self.decoder_start_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False,
                               **generate_kwargs)
        processors = LogitsProcessorList()
        if lexicon:
            processors.append(self.lexicon_processor(gen.max_length))
        if sample is not None:
            processors.append(_GumbelMax(*sample))
        out = self.bart.generate(encoder_outputs=BaseModelOutput(last_hidden_state=memory),
                                 attention_mask=torch.ones(memory.shape[:2], dtype=torch.long, device=self.device),
                                 generation_config=gen, logits_processor=processors)
        return out[:, 1:]  # drop the decoder start token

    def lexicon_processor(self, max_length: int):
        if self.lexicon is None:
            raise UserError("decode.lexicon: this autoencoder has no lexicon (exports before lexicons were "
                            "saved have none); set decode.lexicon=false")
        proc = getattr(self, "_lexicon_processor", None)  # kept: token pieces and masks are worked out once
        if proc is None or proc.lexicon is not self.lexicon or proc.max_length != max_length:
            proc = self._lexicon_processor = LexiconLogitsProcessor(self.lexicon, self.tokenizer, 1, max_length)
        return proc

    def decode(self, latents: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
               lexicon: bool = False, sample: Optional[tuple[float, torch.Generator]] = None,
               repeats: int = 1, **generate_kwargs) -> list[str]:
        """Latents [B, num_latents, dim_latent] -> poems (`sample`, `repeats`: see generate_ids)."""
        if not isinstance(latents, torch.Tensor):
            latents = torch.as_tensor(latents)
        self.check_latents(latents)
        ids = self.generate_ids(latents, max_length, num_beams, lexicon, sample, repeats, **generate_kwargs)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [self.lexicon.close(t) for t in texts] if lexicon else texts

    # ---- save / load (save_pretrained, from_pretrained: trainer/models/hf_model.py) ----

    def _save_extra(self, path: str) -> None:
        if self.lexicon is not None:
            self.lexicon.save(path)

    def _load_extra(self, path: str) -> None:
        self.lexicon = Lexicon.load(path)

    @classmethod
    def _from_legacy(cls, path: str, map_location: str = "cpu", torch_dtype=None) -> "LatentAutoencoder":
        """A folder of the format before diffusers': autoencoder_config.json {autoencoder, bart,
        latent_shape} + model.safetensors (safetensors' save_model)."""
        from safetensors.torch import load_model
        cfg_file = os.path.join(path, CONFIG_NAME)
        try:
            with open(cfg_file) as f:
                meta = json.load(f)
            model = cls(meta["autoencoder"], load_tokenizer(path), bart_config=_plain_bart_config(meta["bart"]),
                        frozen=bool(meta["autoencoder"].get("pretrained_path")) and meta["autoencoder"].get("freeze_bart", True))
        except (KeyError, TypeError) as e:
            raise UserError(f"{cfg_file}: corrupt autoencoder config ({type(e).__name__}: {e})") from None
        load_model(model, os.path.join(path, LEGACY_WEIGHTS_NAME), device=map_location)
        model.lexicon = Lexicon.load(path)
        return (model if torch_dtype is None else model.to(torch_dtype)).eval()


def _config_from_dict(d: dict) -> AutoencoderConfig:
    """An AutoencoderConfig from a saved dict: keys this version does not know are left out, and
    pretrained_path is None (the weights file holds every weight; the original path may be gone)."""
    fields = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    return AutoencoderConfig(**{k: v for k, v in d.items() if k in fields and k != "pretrained_path"})


def _plain_bart_config(bc) -> dict:
    """BART's config as plain JSON to rebuild it from (no version or architecture entries)."""
    d = bc if isinstance(bc, dict) else bc.to_dict()
    return {k: v for k, v in d.items() if k not in ("transformers_version", "architectures")}
