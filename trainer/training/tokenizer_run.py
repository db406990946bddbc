"""The run's tokenizer, shared by the text-model jobs (autoencoder, token LM): made once by rank 0
(a byte-level BPE learnt from the training split, or a fixed vocabulary) into out_dir/tokenizer, and
reused as it is on resume."""
from __future__ import annotations

import os
from typing import Optional

from composer.utils import dist

from trainer.base.log import get_logger
from trainer.data.mds import read_texts
from trainer.models.tokenizers import TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer

log = get_logger("train.tokenizer")


def run_tokenizer(out_dir: str, cfg: TokenizerConfig, train_local: str, text_column: str,
                  pretrained_path: Optional[str] = None):
    path = os.path.join(out_dir, "tokenizer")
    if dist.get_global_rank() == 0 and not os.path.isdir(path):
        texts = None
        if cfg.kind == "bpe":
            texts = read_texts(train_local, text_column, cfg.train_texts)
            log.info(f"training a byte-level BPE of {cfg.vocab_size} tokens on {len(texts)} texts")
        save_tokenizer(build_tokenizer(cfg, texts, pretrained_path), path)
    dist.barrier()
    return load_tokenizer(path)
