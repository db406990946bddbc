"""Make a token-embedding latent encoder (trainer/models/token_latents.py) from the prep job's text shards.

    latentverse train yamls/token_lm/tiny_cpu.yaml        # task: token_lm

With `model.pretrained_path` (a local Qwen or SmolLM2 directory) the LM's embeddings are used as they
are: nothing is trained, the LM is wrapped with L = model.num_tokens and exported. Without it (offline),
a small Llama is built from config with the run's tokenizer (a byte-level BPE trained on the training
texts, or the bundled GPT-2 vocabulary) and trained briefly as a causal LM with Composer
(HuggingFaceModel) on the same texts, so that its embedding table means something; the autoencoder
job's machinery (text shards, StreamingDataLoader, checkpoints, autoresume, metrics.jsonl) is reused.
The export, out_dir/latent_encoder, is what the encode job's `autoencoder:` key points at.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, Literal

import torch
from composer.metrics.nlp import LanguageCrossEntropy
from composer.models import HuggingFaceModel
from composer.utils import dist

from trainer.base.config import UserError
from trainer.base.log import get_logger
from trainer.data.texts import TextDataConfig, text_dataloader, text_split_dir
from trainer.models.token_latents import (CONFIG_NAME, TokenEmbeddingLatents, TokenLatentConfig, build_causal_lm,
                                          load_causal_lm)
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

    def __post_init__(self):
        super().__post_init__()
        if self.seq_len < self.model.num_tokens:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= model.num_tokens ({self.model.num_tokens})")


CONFIG = TokenLMTrainConfig


class LMCollate:
    """Shard records -> causal-LM batch: the same tokens the latent holds (text + </s>, no <s>)."""

    def __init__(self, tokenizer, seq_len: int, column: str):
        self.tok, self.seq_len, self.column = tokenizer, seq_len, column
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, records: list[dict]) -> dict:
        rows = [(self.tok(r[self.column], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])[:self.seq_len]
                for r in records]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


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
        self.lm = build_causal_lm(dataclasses.replace(cfg.model, max_positions=max(cfg.model.max_positions,
                                                                                  cfg.seq_len)), self.tokenizer)
        model = HuggingFaceModel(self.lm, tokenizer=self.tokenizer, use_logits=True, eval_metrics=[LanguageCrossEntropy()])
        log.info(f"causal LM (Llama from config): {sum(p.numel() for p in self.lm.parameters()) / 1e6:.2f}M parameters, "
                 f"vocab {len(self.tokenizer)}, d={cfg.model.hidden_size}")
        collate = LMCollate(self.tokenizer, cfg.seq_len, cfg.data.text_column)
        return Parts(model, text_dataloader(self.train_local, collate, cfg.data, per_rank, True, cfg.seed),
                     text_dataloader(self.eval_local, collate, cfg.data, per_rank, False, cfg.seed),
                     cfg.eval_batches, params=list(self.lm.parameters()))

    def export(self, trainer, parts: Parts, summary: dict) -> dict:
        if dist.get_global_rank() == 0:
            TokenEmbeddingLatents(self.cfg.model, self.tokenizer, self.lm.cpu()).save_pretrained(self.export_dir)
            log.info(f"exported {self.export_dir} after {summary['batches']} batches")
        ce = summary.get("eval/LanguageCrossEntropy")
        return {} if ce is None else {"eval/perplexity": math.exp(min(ce, 50.0))}


def run(cfg: TokenLMTrainConfig) -> dict:
    return run_training(TokenLMJob(cfg))
