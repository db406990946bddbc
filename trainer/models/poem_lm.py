"""The autoregressive baseline: a causal LM that writes a stanza for a prompt.

    training text   <prompt tokens> <s> <stanza tokens> </s>     loss on the stanza and its </s> only
    generation      <prompt tokens> <s>  -> sampled tokens until </s> (temperature, top-p, seeded)

The prompt is the record's `prompt` column, the one the encode job embeds for the diffusion model, so
both models are conditioned on the same text. The separator is the tokenizer's <s> (bos), which no
training text holds; an empty prompt leaves <s> alone in front, as a plain LM's start. The LM is the
token-LM job's small Llama (trainer/models/token_latents.py build_causal_lm) trained with
`prompt_prefix: true` (trainer/jobs/train_token_lm.py); its export, out_dir/poem_lm, is a plain Hugging
Face causal-LM folder plus poem_lm.json. Plain PyTorch + transformers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import torch

from trainer.base.config import UserError
from trainer.base.files import write_json_atomic

POEM_LM_JSON = "poem_lm.json"
IGNORE = -100                         # label of a position the loss skips (Hugging Face's ignore_index)


def separator_id(tokenizer) -> int:
    """The token between prompt and stanza: <s>, which the training texts never hold."""
    sep = tokenizer.bos_token_id
    if sep is None or sep == tokenizer.eos_token_id:
        raise UserError("prompt_prefix: the tokenizer needs a start token (<s>) distinct from its end token "
                        "to separate the prompt from the stanza")
    return sep


def prompt_ids(tokenizer, prompt: str, max_prompt_tokens: int) -> list[int]:
    """A prompt's first max_prompt_tokens tokens and the separator: what a stanza is written after."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"][:max_prompt_tokens] + [separator_id(tokenizer)]


def prefixed_row(tokenizer, prompt: str, text: str, seq_len: int, max_prompt_tokens: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one training text: prompt + separator + stanza + </s>, the stanza part cut to
    seq_len tokens (</s> included, as without a prefix); labels IGNORE on the prompt and the separator."""
    head = prompt_ids(tokenizer, prompt, max_prompt_tokens)
    body = (tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:seq_len]
    return head + body, [IGNORE] * len(head) + body


def training_flops(lm_config, batch: int, length: int) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) of a Llama-shaped causal LM
    on a [batch, length] batch, as torch's FlopCounterMode counts them with eager attention: per token 2 x
    the weights of q, k, v, o, the MLP's three matrices and the LM head, and per layer the T x T scores
    and their mix with the values (4 x T x hidden per token). Embedding lookups cost nothing."""
    c = lm_config
    d, f, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    weights = layers * (2 * d * d + 2 * d * kv + 3 * d * f) + d * vocab
    tokens = batch * length
    forward = 2 * tokens * weights + 4 * layers * tokens * length * d
    return 3.0 * forward


def check_sampling(temperature: Optional[float], top_p: Optional[float], max_new_tokens: Optional[int]) -> None:
    """ValueError naming the setting that cannot sample (None: the LM's own, fine)."""
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")


@dataclasses.dataclass
class PoemLMSettings:
    """poem_lm.json: how the LM was trained (what its prompts look like, its budget) and how it samples."""
    max_prompt_tokens: int = 32
    seq_len: int = 64                  # stanza tokens it was trained on (</s> included): max_new_tokens' default
    temperature: float = 1.0
    top_p: float = 0.95
    training: dict = dataclasses.field(default_factory=dict)   # batches, samples_seen, tokens_seen, train_flops


def save_poem_lm(path: str, lm, tokenizer, settings: PoemLMSettings) -> str:
    """A Hugging Face causal-LM folder (config.json, model.safetensors, tokenizer files) + poem_lm.json,
    the last written last: its presence means the folder is complete."""
    os.makedirs(path, exist_ok=True)
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    write_json_atomic(os.path.join(path, POEM_LM_JSON), dataclasses.asdict(settings))
    return path


class PoemLM:
    """A trained prompt-prefixed causal LM: `lm(prompts, num_samples, ...)` -> stanzas, prompt-major."""

    def __init__(self, lm, tokenizer, settings: PoemLMSettings):
        self.lm, self.tokenizer, self.settings = lm.eval(), tokenizer, settings
        separator_id(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu") -> "PoemLM":
        from trainer.models.token_latents import load_causal_lm

        meta = os.path.join(path, POEM_LM_JSON)
        if not os.path.isfile(meta):
            raise UserError(f"{path}: not a poem LM ({POEM_LM_JSON} missing): train one with "
                            "`latentverse train ... task=token_lm prompt_prefix=true`; it is written to out_dir/poem_lm")
        try:
            with open(meta) as f:
                settings = PoemLMSettings(**json.load(f))
        except (json.JSONDecodeError, TypeError) as e:
            raise UserError(f"{meta}: corrupt ({type(e).__name__}: {e})") from None
        lm, tok = load_causal_lm(path)
        return cls(lm.to(device), tok, settings)

    @torch.no_grad()
    def __call__(self, prompts: list[str], num_samples: int = 1, temperature: Optional[float] = None,
                 top_p: Optional[float] = None, max_new_tokens: Optional[int] = None, seed: int = 0) -> list[str]:
        """`num_samples` stanzas for each prompt (prompt-major), each sampled token by token until </s> or
        max_new_tokens (default: the stanza length it was trained on); None takes poem_lm.json's setting.
        The same seed gives the same stanzas, and the global random state is left as it was."""
        s = self.settings
        check_sampling(temperature, top_p, max_new_tokens)
        temperature = s.temperature if temperature is None else temperature
        top_p = s.top_p if top_p is None else top_p
        max_new = s.seq_len if max_new_tokens is None else max_new_tokens
        eos = self.tokenizer.eos_token_id
        device = next(self.lm.parameters()).device
        out = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for prompt in prompts:    # one prompt at a time: its samples share the prefix, nothing to pad
                head = torch.tensor([prompt_ids(self.tokenizer, prompt, s.max_prompt_tokens)] * num_samples,
                                    device=device)
                ids = self.lm.generate(head, attention_mask=torch.ones_like(head), do_sample=True,
                                       temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=max_new,
                                       eos_token_id=eos, pad_token_id=eos)
                for row in ids[:, head.shape[1]:].tolist():
                    row = row[:row.index(eos)] if eos in row else row
                    out.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return out
