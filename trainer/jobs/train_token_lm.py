"""Make a token-embedding latent encoder (trainer/models/token_latents.py) from the prep job's text shards.

    latentverse train yamls/token_lm/tiny_cpu.yaml        # task: token_lm

With `model.pretrained_path` (a local Qwen or SmolLM2 directory) the LM's embeddings are used as they
are: nothing is trained, the LM is wrapped with L = model.num_tokens and exported. Without it (offline),
a small Llama is built from config with the run's tokenizer (a byte-level BPE trained on the training
texts, or the bundled GPT-2 vocabulary) and trained briefly as a causal LM with Composer
(HuggingFaceModel) on the same texts, so that its embedding table means something; the autoencoder
job's machinery (text shards, StreamingDataLoader, checkpoints, autoresume, metrics.jsonl) is reused.
The export, out_dir/latent_encoder, is what the encode job's `autoencoder:` key points at.

With `prompt_prefix: true` the LM is also the autoregressive baseline of the diffusion model: each
training text is "<prompt> <s> <stanza></s>" with the loss on the stanza only (trainer/models/poem_lm.py),
the prompt the record's own, the one the encode job embeds for the diffusion model; out_dir/poem_lm then
holds the LM that writes a stanza for a prompt (`latentverse evaluate yamls/eval/generation_token_lm.yaml`).
Every run states its compute in train_summary.json: samples_seen, tokens_seen (positions computed,
padding included) and train_flops (trainer/models/poem_lm.py training_flops, summed over the batches).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import ClassVar, Literal, Optional

import torch
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import HuggingFaceModel
from composer.utils import dist

from trainer.base.config import UserError
from trainer.base.log import get_logger
from trainer.data.texts import TextDataConfig, text_dataloader, text_split_dir
from trainer.models.poem_lm import PoemLMSettings, prefixed_row, save_poem_lm, separator_id, training_flops
from trainer.models.token_latents import (CONFIG_NAME, TokenEmbeddingLatents, TokenLatentConfig, build_causal_lm,
                                          load_causal_lm)
from trainer.training.callbacks import ComputeCount
from trainer.training.job import Parts, TrainingConfig, TrainingJob, run_training
from trainer.training.tokenizer_run import run_tokenizer

log = get_logger("train.token_lm")


@dataclasses.dataclass
class TokenLMTrainConfig(TrainingConfig):
    task: Literal["token_lm"] = "token_lm"
    out_dir: str = "out/token_lm"
    run_name: str = "token_lm"
    model: TokenLatentConfig = dataclasses.field(default_factory=TokenLatentConfig)
    data: TextDataConfig = dataclasses.field(default_factory=TextDataConfig)
    seq_len: int = 64                   # tokens per training text (</s> included); >= model.num_tokens
    default_batch_size: ClassVar[int] = 32   # global_train_batch_size unless set
    max_duration: str = "1000ba"
    eval_interval: str = "250ba"
    eval_batches: int = 4
    save_num_checkpoints_to_keep: int = 1
    # Each text as "<prompt> <s> <stanza></s>", the loss on the stanza only: an LM that writes a stanza
    # for a prompt, exported to out_dir/poem_lm beside the latent encoder. Off: plain causal LM on the texts.
    prompt_prefix: bool = False
    max_prompt_tokens: int = 32         # a longer prompt keeps its first tokens

    def __post_init__(self):
        super().__post_init__()
        if self.seq_len < self.model.num_tokens:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= model.num_tokens ({self.model.num_tokens})")
        if self.prompt_prefix and self.model.pretrained_path:
            raise ValueError("prompt_prefix: trains the LM; model.pretrained_path uses one as it is (nothing trained)")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"max_prompt_tokens: must be >= 0, got {self.max_prompt_tokens}")

    @property
    def max_length(self) -> int:
        """The longest training row: the stanza's seq_len, after the prompt and its separator if prefixed."""
        return self.seq_len + (self.max_prompt_tokens + 1 if self.prompt_prefix else 0)


CONFIG = TokenLMTrainConfig


class LMCollate:
    """Shard records -> causal-LM batch: the same tokens the latent holds (text + </s>, no <s>); with
    `max_prompt_tokens` (prompt_prefix) the record's prompt and <s> in front, unlabelled."""

    def __init__(self, tokenizer, seq_len: int, column: str, max_prompt_tokens: Optional[int] = None):
        self.tok, self.seq_len, self.column, self.max_prompt_tokens = tokenizer, seq_len, column, max_prompt_tokens
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def row(self, record: dict) -> tuple[list[int], list[int]]:
        if self.max_prompt_tokens is not None:
            return prefixed_row(self.tok, record["prompt"], record[self.column], self.seq_len, self.max_prompt_tokens)
        ids = (self.tok(record[self.column], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])[:self.seq_len]
        return ids, ids

    def __call__(self, records: list[dict]) -> dict:
        rows = [self.row(r) for r in records]
        T = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (r, lab) in enumerate(rows):
            ids[i, :len(r)], labels[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), torch.tensor(lab), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class CausalLMModel(HuggingFaceModel):
    """Composer's wrapper of the causal LM, with the FLOPs of each training batch (for ComputeCount)."""

    def flops_per_batch(self, batch: dict) -> float:
        return training_flops(self.model.config, *batch["input_ids"].shape)


class TokenLMJob(TrainingJob):
    export_name, export_marker, summary_key = "latent_encoder", CONFIG_NAME, "latent_encoder_dir"

    @property
    def clean_shared_memory(self) -> bool:
        return self.cfg.data.clean_shared_memory

    def check(self) -> None:
        if self.cfg.model.pretrained_path:
            return
        if self.cfg.model.tokenizer.kind == "pretrained":
            raise UserError("model.tokenizer.kind: 'pretrained' needs model.pretrained_path; use bpe or gpt2")
        self.train_local = text_split_dir(self.cfg.data, self.cfg.data.train_split)
        self.eval_local = text_split_dir(self.cfg.data, self.cfg.data.eval_split)

    def without_training(self):
        """A pretrained causal LM's embeddings are used as they are."""
        cfg = self.cfg
        if not cfg.model.pretrained_path:
            return None
        lm, tok = load_causal_lm(cfg.model.pretrained_path)
        enc = TokenEmbeddingLatents(cfg.model, tok, lm)
        enc.save_pretrained(self.export_dir)
        log.info(f"{cfg.model.pretrained_path}: embeddings used as they are; latent {list(enc.latent_shape)} -> "
                 f"{self.export_dir}")
        return {self.summary_key: self.export_dir, "batches": 0}

    def build(self, world: int, per_rank: int) -> Parts:
        cfg = self.cfg
        self.tokenizer = run_tokenizer(cfg.out_dir, cfg.model.tokenizer, self.train_local, cfg.data.text_column)
        if cfg.prompt_prefix:
            separator_id(self.tokenizer)     # a tokenizer without <s> is refused before training
        self.lm = build_causal_lm(dataclasses.replace(cfg.model, max_positions=max(cfg.model.max_positions,
                                                                                  cfg.max_length)), self.tokenizer)
        model = CausalLMModel(self.lm, tokenizer=self.tokenizer, use_logits=True, eval_metrics=[LanguageCrossEntropy()])
        log.info(f"causal LM (Llama from config): {sum(p.numel() for p in self.lm.parameters()) / 1e6:.2f}M parameters, "
                 f"vocab {len(self.tokenizer)}, d={cfg.model.hidden_size}"
                 + (f"; each text after its prompt (<= {cfg.max_prompt_tokens} tokens) and <s>" if cfg.prompt_prefix else ""))
        collate = LMCollate(self.tokenizer, cfg.seq_len, cfg.data.text_column,
                            cfg.max_prompt_tokens if cfg.prompt_prefix else None)
        self.compute = ComputeCount(model)
        return Parts(model, text_dataloader(self.train_local, collate, cfg.data, per_rank, True, cfg.seed),
                     text_dataloader(self.eval_local, collate, cfg.data, per_rank, False, cfg.seed),
                     cfg.eval_batches, params=list(self.lm.parameters()), callbacks=[self.compute])

    def export(self, trainer, parts: Parts, summary: dict) -> dict:
        cfg, ts = self.cfg, trainer.state.timestamp
        # samples and positions over all ranks (Composer's timestamp), FLOPs summed over the ranks
        out = {"samples_seen": int(ts.sample), "tokens_seen": int(ts.token), "train_flops": self.compute.total()}
        if dist.get_global_rank() == 0:
            lm = self.lm.cpu()
            if cfg.prompt_prefix:   # before the latent encoder, whose folder marks the job done
                poem_dir = os.path.join(cfg.out_dir, "poem_lm")
                save_poem_lm(poem_dir, lm, self.tokenizer, PoemLMSettings(
                    max_prompt_tokens=cfg.max_prompt_tokens, seq_len=cfg.seq_len,
                    training={"batches": summary["batches"], "global_train_batch_size": cfg.global_train_batch_size,
                              "run_name": cfg.run_name, **out}))
                out["poem_lm_dir"] = poem_dir
                log.info(f"exported the prompt-prefixed LM to {poem_dir}")
            TokenEmbeddingLatents(cfg.model, self.tokenizer, lm).save_pretrained(self.export_dir)
            log.info(f"exported {self.export_dir} after {summary['batches']} batches ({out['samples_seen']} samples, "
                     f"{out['train_flops']:.3g} training FLOPs)")
        ce = summary.get("eval/LanguageCrossEntropy")
        return out if ce is None else {**out, "eval/perplexity": math.exp(min(ce, 50.0))}


def run(cfg: TokenLMTrainConfig) -> dict:
    return run_training(TokenLMJob(cfg))
