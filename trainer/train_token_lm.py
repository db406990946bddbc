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
import json
import math
import os
import time
from typing import Literal, Optional

from trainer.config import UserError
from trainer.log import get_logger
from trainer.models.token_latents import TokenLatentConfig
from trainer.train_autoencoder import DataConfig, OptimConfig, read_texts

log = get_logger("train.token_lm")


@dataclasses.dataclass
class TokenLMTrainConfig:
    task: Literal["token_lm"] = "token_lm"
    out_dir: str = "out/token_lm"
    run_name: str = "token_lm"
    model: TokenLatentConfig = dataclasses.field(default_factory=TokenLatentConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    seq_len: int = 64                   # tokens per training text (</s> included); >= model.num_tokens
    batch_size: int = 32                # global; split over the ranks
    max_duration: str = "1000ba"
    max_minutes: Optional[float] = None
    eval_interval: str = "250ba"
    eval_batches: int = 4
    save_interval: str = "500ba"
    save_num_checkpoints_to_keep: int = 1
    autoresume: bool = True
    precision: Literal["auto", "fp32", "amp_bf16", "amp_fp16"] = "auto"
    log_interval: int = 20
    threads: Optional[int] = None
    seed: int = 17

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.seq_len < self.model.num_tokens:
            raise ValueError(f"seq_len ({self.seq_len}) must be >= model.num_tokens ({self.model.num_tokens})")


CONFIG = TokenLMTrainConfig


class LMCollate:
    """Shard records -> causal-LM batch: the same tokens the latent holds (text + </s>, no <s>)."""

    def __init__(self, tokenizer, seq_len: int, column: str):
        self.tok, self.seq_len, self.column = tokenizer, seq_len, column
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, records: list[dict]) -> dict:
        import torch

        rows = [(self.tok(r[self.column], add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id])[:self.seq_len]
                for r in records]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _tokenizer(cfg: TokenLMTrainConfig, train_local: str):
    """The run's tokenizer, made once (rank 0) and reused on resume: out_dir/tokenizer."""
    from composer.utils import dist

    from trainer.models.tokenizers import build_tokenizer, load_tokenizer, save_tokenizer

    path = os.path.join(cfg.out_dir, "tokenizer")
    if cfg.model.tokenizer.kind == "pretrained":
        raise UserError("model.tokenizer.kind: 'pretrained' needs model.pretrained_path; use bpe or gpt2")
    if dist.get_global_rank() == 0 and not os.path.isdir(path):
        texts = None
        if cfg.model.tokenizer.kind == "bpe":
            texts = read_texts(train_local, cfg.data.text_column, cfg.model.tokenizer.train_texts)
            log.info(f"training a byte-level BPE of {cfg.model.tokenizer.vocab_size} tokens on {len(texts)} texts")
        save_tokenizer(build_tokenizer(cfg.model.tokenizer, texts), path)
    dist.barrier()
    return load_tokenizer(path)


def _dataloader(local: str, tokenizer, cfg: TokenLMTrainConfig, batch_size: int, train: bool):
    from streaming import StreamingDataLoader, StreamingDataset

    ds = StreamingDataset(local=local, batch_size=batch_size, shuffle=train, shuffle_seed=cfg.seed)
    return StreamingDataLoader(ds, batch_size=batch_size, collate_fn=LMCollate(tokenizer, cfg.seq_len,
                               cfg.data.text_column), num_workers=cfg.data.num_workers, drop_last=train)


def run(cfg: TokenLMTrainConfig) -> dict:
    import torch
    from trainer.data import clean_stale_shared_memory

    from trainer.models.token_latents import CONFIG_NAME, TokenEmbeddingLatents, build_causal_lm, load_causal_lm
    from trainer.train_autoencoder import build_trainer, split_dir

    export = os.path.join(cfg.out_dir, "latent_encoder")
    if os.path.isfile(os.path.join(export, CONFIG_NAME)):
        log.info(f"{export} exists: already made, skipping (delete it to make it again)")
        return {"latent_encoder_dir": export, "skipped": True}
    if cfg.model.pretrained_path:
        lm, tok = load_causal_lm(cfg.model.pretrained_path)
        enc = TokenEmbeddingLatents(cfg.model, tok, lm)
        enc.save_pretrained(export)
        log.info(f"{cfg.model.pretrained_path}: embeddings used as they are; latent {list(enc.latent_shape)} -> {export}")
        return {"latent_encoder_dir": export, "batches": 0}

    train_local, eval_local = split_dir(cfg, cfg.data.train_split), split_dir(cfg, cfg.data.eval_split)
    clean_stale_shared_memory()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)

    from composer.metrics.nlp import LanguageCrossEntropy
    from composer.models import HuggingFaceModel
    from composer.utils import dist, get_device, reproducibility

    device = get_device(None)
    dist.initialize_dist(device)
    reproducibility.seed_all(cfg.seed)
    tokenizer = _tokenizer(cfg, train_local)
    lm = build_causal_lm(dataclasses.replace(cfg.model, max_positions=max(cfg.model.max_positions, cfg.seq_len)),
                         tokenizer)
    model = HuggingFaceModel(lm, tokenizer=tokenizer, use_logits=True, eval_metrics=[LanguageCrossEntropy()])
    log.info(f"causal LM (Llama from config): {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M parameters, "
             f"vocab {len(tokenizer)}, d={cfg.model.hidden_size}")
    world = dist.get_world_size()
    if cfg.batch_size % world:
        raise UserError(f"batch_size: {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    trainer = build_trainer(cfg, model, list(lm.parameters()), _dataloader(train_local, tokenizer, cfg, per_rank, True),
                            _dataloader(eval_local, tokenizer, cfg, per_rank, False), cfg.eval_batches, device)
    t0 = time.time()
    trainer.fit()
    seconds = time.time() - t0
    trainer.eval()  # final held-out loss
    final = {f"{lbl}/{k}": float(m.compute()) for lbl, ms in trainer.state.eval_metrics.items() for k, m in ms.items()}
    batches = int(trainer.state.timestamp.batch)
    summary = {"latent_encoder_dir": export, "batches": batches, "fit_seconds": round(seconds, 1), **final}
    ce = final.get("eval/LanguageCrossEntropy")
    if ce is not None:
        summary["eval/perplexity"] = math.exp(min(ce, 50.0))
    if dist.get_global_rank() == 0:
        TokenEmbeddingLatents(cfg.model, tokenizer, lm.cpu()).save_pretrained(export)
        with open(os.path.join(cfg.out_dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log.info(f"exported {export} after {batches} batches ({seconds:.0f} s): {json.dumps(final)}")
    trainer.close()
    dist.barrier()
    return summary
