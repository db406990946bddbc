"""The second latent space: a causal LM's input token embeddings, [L, d] per poem.

    text -> tokenizer -> first L tokens (+ </s>, padded with </s>) -> embedding table / scale
    latent [L, d] -> nearest embedding row by cosine (or the LM head's argmax) -> tokens -> text

As diffusion language models over a causal LM's embeddings do: the diffusion model denoises a sequence of
token embeddings, and a generated sequence is read back token by token. No encoder network, no
compression: the latent is as long as the text it holds (L tokens), and a prompt's own tokens can be
clamped into the first positions while sampling (trainer/diffusion/sampler.py `inpaint`).

The LM is either a local Hugging Face causal LM (`pretrained_path`: Qwen, SmolLM2; only its input
embeddings and head are used) or, offline, a small Llama built from the sizes below, whose embedding
table only means something after `latentverse train` task `token_lm` (trainer/jobs/train_token_lm.py) has
trained it as a causal LM on the text shards. `scale` (the std of the embedding table's entries) makes
the latents unit-variance; it is stored with the weights. Plain PyTorch + transformers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from trainer.models.tokenizers import TokenizerConfig
from trainer.base.config import UserError
from trainer.models.hf_model import TextLatentModel
# diffusers' pipeline loader finds a component's base class by name in the component's own module
from diffusers import ModelMixin  # noqa: F401
from trainer.models.autoencoder import CONFIG_NAME as AE_CONFIG, LatentAutoencoder

LATENT_KIND = "token_embeddings"
CONFIG_NAME = "token_latents_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"   # diffusers' file name
LEGACY_WEIGHTS_NAME = "model.safetensors"              # folders saved before the diffusers format


@dataclasses.dataclass
class TokenLatentConfig:
    # A local Hugging Face causal LM dir (Qwen, SmolLM2); None builds a Llama from the sizes below.
    pretrained_path: Optional[str] = None
    num_tokens: int = 32                 # L: latent positions = the first L tokens of the poem
    decode: Literal["cosine", "lm_head"] = "cosine"  # lm_head: argmax of the LM's output layer on each latent
    # The tokenizer of a from-config LM (bpe: trained on the training texts; gpt2: the bundled vocabulary).
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    # Llama built from config (ignored with pretrained_path): hidden_size is the latent width d.
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 128

    def __post_init__(self):
        if self.pretrained_path is not None and not os.path.isdir(self.pretrained_path):
            raise ValueError(f"pretrained_path: not a directory: {self.pretrained_path!r}")
        if not 2 <= self.num_tokens <= 4096:
            raise ValueError(f"num_tokens must be in 2..4096, got {self.num_tokens}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


def build_causal_lm(cfg: TokenLatentConfig, tokenizer):
    """A small Llama sized for the tokenizer, random init (nothing downloaded); tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    lc = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_positions,
                     tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(lc)


def load_causal_lm(path: str):
    """(model, tokenizer) of a local Hugging Face causal LM; one-line UserError when it is not one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError...)
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: cannot load a causal LM: {msg}") from None
    tok.clean_up_tokenization_spaces = False  # exact round trips
    return lm, tok


class TokenEmbeddingLatents(TextLatentModel):
    """encode(texts) -> [B, L, d]; decode(latents) -> texts; same API as LatentAutoencoder. A diffusers
    model (trainer/models/hf_model.py): token_latents_config.json holds cfg and lm_config, the weights
    file the LM and `scale`; `TokenEmbeddingLatents.from_pretrained(dir)` is diffusers' own loader."""

    latent_kind = LATENT_KIND
    config_name = CONFIG_NAME
    what = "a token-LM latent encoder"
    ignore_for_config = ["tokenizer", "lm", "scale"]

    def __init__(self, cfg: TokenLatentConfig | dict, tokenizer=None, lm=None, scale: Optional[float] = None,
                 lm_config: Optional[dict] = None):
        """`lm`: the causal LM; None builds it from `lm_config` (as diffusers does from the saved config,
        the weights file then filling it). `tokenizer`: None only then (from_pretrained attaches it)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        super().__init__()
        if isinstance(cfg, dict):
            cfg = _config_from_dict(cfg)
        if lm is None:
            if lm_config is None:
                raise ValueError("TokenEmbeddingLatents: give the LM or its lm_config")
            lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**lm_config), dtype=torch.float32)
        self.cfg, self.tokenizer, self.lm = cfg, None, lm.eval().requires_grad_(False)
        self.pad_id = None
        self.register_buffer("scale", torch.tensor(float(scale) if scale is not None else self.table_std()))
        self.register_to_config(cfg=dataclasses.asdict(dataclasses.replace(cfg, pretrained_path=None)),
                                lm_config=_plain_lm_config(lm.config))
        if tokenizer is not None:
            self.attach_tokenizer(tokenizer)

    def attach_tokenizer(self, tokenizer) -> None:
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no end-of-text token (eos), needed to mark where a poem ends")
        if len(tokenizer) > self.table.shape[0]:
            raise UserError(f"tokenizer has {len(tokenizer)} tokens but the LM's embedding table only "
                            f"{self.table.shape[0]}")
        self.tokenizer = tokenizer
        # Pad with </s>, not the pad token: an LM's pad row is often all zeros (nn.Embedding padding_idx),
        # which has no direction to decode by cosine; and many LMs (Qwen, SmolLM2) have no pad token.
        self.pad_id = tokenizer.eos_token_id

    @classmethod
    def read_tokenizer(cls, path: str):
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise UserError(f"{path}: cannot load the tokenizer: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        tok.clean_up_tokenization_spaces = False
        return tok

    @property
    def table(self) -> torch.Tensor:
        return self.lm.get_input_embeddings().weight          # [V, d]

    def table_std(self) -> float:
        """The std of the embedding table's entries: latent = embedding / this has unit variance."""
        return float(self.table.detach().float().std())

    @property
    def latent_shape(self) -> tuple[int, int]:
        return (self.cfg.num_tokens, self.table.shape[1])

    @property
    def device(self) -> torch.device:
        return self.table.device

    # ---- tokens <-> latents

    def token_ids(self, texts: list[str], eos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids [B, L] padded with </s>, real-token mask [B, L]); </s> closes a text that fits."""
        L = self.cfg.num_tokens
        ids = torch.full((len(texts), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(texts), L, dtype=torch.bool)
        for i, t in enumerate(texts):
            toks = self.tokenizer(t, add_special_tokens=False)["input_ids"]
            toks = (toks + [self.tokenizer.eos_token_id] if eos else toks)[:L]
            ids[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            mask[i, :len(toks)] = True
        return ids, mask

    def clip_texts(self, texts: list[str]) -> list[str]:
        """The texts as a latent can hold them: cut to the num_tokens positions."""
        ids, _ = self.token_ids(list(texts))
        return self.ids_to_texts(ids)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, L] -> latents [B, L, d] (embeddings / scale)."""
        return self.lm.get_input_embeddings()(ids.to(self.device)).float() / self.scale

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """Poems -> latents [B, L, d]."""
        return self.encode_ids(self.token_ids(list(texts))[0])

    @torch.no_grad()
    def prefix_latents(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt to continue -> (its latents [L, d], known mask [L]); no </s>, so the poem goes on."""
        ids, mask = self.token_ids([prefix], eos=False)
        if not mask.any():
            raise UserError(f"--prefix {prefix!r}: has no tokens")
        if mask.all():
            raise UserError(f"--prefix {prefix!r}: fills all {self.cfg.num_tokens} latent positions; nothing to continue")
        return self.encode_ids(ids)[0], mask[0].to(self.device)

    @torch.no_grad()
    def nearest_ids(self, latents: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
        """Latents [B, L, d] -> token ids [B, L]: the nearest embedding row by cosine, or the head's argmax."""
        z = latents.to(self.device, torch.float32)
        if (mode or self.cfg.decode) == "lm_head":
            # The output layer applied to each position's embedding; with tied embeddings (SmolLM2,
            # Qwen2.5-0.5B, the from-config Llama) this is the nearest row by inner product.
            return self.lm.get_output_embeddings()(z * self.scale).argmax(-1)
        table = F.normalize(self.table.float(), dim=-1)        # [V, d]
        return (F.normalize(z, dim=-1) @ table.T).argmax(-1)   # [B, L, V] -> [B, L]

    def ids_to_texts(self, ids: torch.Tensor) -> list[str]:
        """Token ids [B, L] -> texts, each cut at its first </s> (or pad)."""
        stop = {self.tokenizer.eos_token_id, self.pad_id}
        out = []
        for row in ids.tolist():
            keep = []
            for t in row:
                if t in stop:
                    break
                keep.append(t)
            out.append(self.tokenizer.decode(keep, skip_special_tokens=True))
        return out

    def check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 3 or tuple(z.shape[1:]) != self.latent_shape:
            raise UserError(f"latents must have shape [batch, {self.latent_shape[0]}, {self.latent_shape[1]}], "
                            f"got {list(z.shape)}")

    def decode(self, latents: torch.Tensor, max_length: Optional[int] = None, num_beams: int = 1,
               mode: Optional[str] = None, **_) -> list[str]:
        """Latents [B, L, d] -> poems. `max_length` keeps only the first tokens; beams have no meaning here."""
        if not isinstance(latents, torch.Tensor):
            latents = torch.as_tensor(latents)
        self.check_latents(latents)
        ids = self.nearest_ids(latents, mode)
        return self.ids_to_texts(ids[:, :max_length] if max_length else ids)

    # ---- save / load (save_pretrained, from_pretrained: trainer/models/hf_model.py)

    @classmethod
    def _from_legacy(cls, path: str, map_location: str = "cpu", torch_dtype=None) -> "TokenEmbeddingLatents":
        """A folder of the format before diffusers': token_latents_config.json {latent_kind,
        token_latents, lm, scale} + model.safetensors (safetensors' save_model)."""
        from safetensors.torch import load_model

        cfg_file = os.path.join(path, CONFIG_NAME)
        try:
            with open(cfg_file) as f:
                meta = json.load(f)
            model = cls(meta["token_latents"], cls.read_tokenizer(path), scale=meta["scale"],
                        lm_config=_plain_lm_config(meta["lm"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{cfg_file}: corrupt token-latent config ({type(e).__name__}: {e})") from None
        try:
            load_model(model, os.path.join(path, LEGACY_WEIGHTS_NAME), device=map_location)
        except Exception as e:  # safetensors raises its own error types for truncated or garbled files
            raise UserError(f"{os.path.join(path, LEGACY_WEIGHTS_NAME)}: cannot load the weights: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
        return (model if torch_dtype is None else model.to(torch_dtype)).eval()

    @classmethod
    def from_causal_lm(cls, path: str, num_tokens: int = 32, decode: str = "cosine") -> "TokenEmbeddingLatents":
        """Wrap a local Hugging Face causal LM directory (Qwen, SmolLM2) as it is."""
        lm, tok = load_causal_lm(path)
        return cls(TokenLatentConfig(pretrained_path=path, num_tokens=num_tokens, decode=decode), tok, lm)


def _config_from_dict(d: dict) -> TokenLatentConfig:
    """A TokenLatentConfig from a saved dict; pretrained_path None (every weight is in the weights file;
    the original folder may be gone)."""
    d = dict(d)
    d["tokenizer"] = TokenizerConfig(**d.get("tokenizer", {}))
    d["pretrained_path"] = None
    return TokenLatentConfig(**d)


def _plain_lm_config(c) -> dict:
    d = c if isinstance(c, dict) else c.to_dict()
    return {k: v for k, v in d.items() if k != "transformers_version"}


def latent_kind(path: str) -> str:
    """The kind of latent encoder saved in a directory: token_embeddings, bart_perceiver or hf_causal_lm."""
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        try:
            with open(os.path.join(path, CONFIG_NAME)) as f:
                return json.load(f).get("latent_kind", LATENT_KIND)
        except json.JSONDecodeError as e:
            raise UserError(f"{os.path.join(path, CONFIG_NAME)}: corrupt JSON ({e})") from None
    if os.path.isfile(os.path.join(path, AE_CONFIG)):
        return "bart_perceiver"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf_causal_lm"
    if not os.path.isdir(path):
        raise UserError(f"{path}: latent encoder directory does not exist")
    raise UserError(f"{path}: not a latent encoder directory (no {AE_CONFIG}, {CONFIG_NAME} or config.json)")


def load_latent_encoder(path: str, device: str = "cpu"):
    """Either latent space from its directory: the BART-Perceiver autoencoder, our token-embedding
    export, or a plain Hugging Face causal LM directory (wrapped with L = 32, table-std scale)."""
    kind = latent_kind(path)
    if kind == "bart_perceiver":
        enc = LatentAutoencoder.from_pretrained(path)
    elif kind == LATENT_KIND:
        enc = TokenEmbeddingLatents.from_pretrained(path)
    elif kind == "hf_causal_lm":
        enc = TokenEmbeddingLatents.from_causal_lm(path)
    else:
        raise UserError(f"{os.path.join(path, CONFIG_NAME)}: latent_kind: unknown kind {kind!r}")
    return enc.to(device).eval()
