"""The autoregressive baseline (trainer/models/poem_lm.py, train_token_lm's prompt_prefix): the prompt is
in the batch and only the stanza is learnt; the FLOPs the job counts are the ones torch counts; a tiny
LM trained 60 batches writes each prompt's style. Its evaluation: test_eval_generation.py."""
import json
import os

import numpy as np
import pytest
import torch

from trainer.base import config as C

from .conftest import run_cli

SEA = "wave salt tide shore foam gull".split()
HILL = "stone moss pine crag fern hawk".split()
PROMPTS = {"song of the sea": SEA, "song of the hills": HILL}


def write_styled_shards(root, n_train=64, n_val=8) -> str:
    """Text shards whose stanzas take their words from the prompt's own word list (two lines of four)."""
    from streaming import MDSWriter

    from trainer.base.schema import LABELS, TEXT_COLUMNS

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        with MDSWriter(out=os.path.join(root, split), columns=TEXT_COLUMNS, size_limit=1 << 14) as w:
            for i in range(n):
                prompt = list(PROMPTS)[i % 2]
                text = "\n".join(" ".join(rng.choice(PROMPTS[prompt], size=4)) for _ in range(2))
                w.write({"id": f"{split}-{i}", "text": text, "prompt": prompt, "source": "jsonl",
                         **{k: "" for k in LABELS}, "n_tokens": 8})
    return str(root)


TINY_LM = ["model.tokenizer.vocab_size=300", "model.tokenizer.min_frequency=1", "model.num_tokens=12",
           "model.hidden_size=64", "model.intermediate_size=128", "seq_len=16", "threads=1",
           "data.clean_shared_memory=false"]


def test_prompt_prefix_is_in_the_batch_and_the_loss_is_on_the_stanza_only(tmp_path):
    from trainer.jobs.train_token_lm import LMCollate, TokenLMJob, TokenLMTrainConfig
    from trainer.models.poem_lm import IGNORE

    shards = write_styled_shards(tmp_path / "text", n_train=16, n_val=4)
    cfg = C.load(TokenLMTrainConfig, "yamls/autoencoder/token_embeddings_tiny_cpu.yaml",
                 [f"out_dir={tmp_path / 'lm'}", f"data.path={shards}", "prompt_prefix=true", "max_prompt_tokens=3",
                  *TINY_LM])
    job = TokenLMJob(cfg)
    job.check()
    parts = job.build(1, 4)                       # the job's own tokenizer, collate and streaming loader
    batch = next(iter(parts.train_dataloader))
    tok = job.tokenizer
    sep, eos = tok.bos_token_id, tok.eos_token_id
    assert sep != eos and batch["input_ids"].shape[0] == 4
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"].tolist()):
        n = sum(mask)
        head = ids.index(sep) + 1
        prompt, stanza = ids[:head - 1], tok.decode(ids[head:n - 1])
        # the prompt, cut to max_prompt_tokens=3 tokens, then the stanza and </s>
        assert prompt in [tok(p, add_special_tokens=False)["input_ids"][:3] for p in PROMPTS] and ids[n - 1] == eos
        words = set(stanza.split())
        assert words <= set(SEA) or words <= set(HILL)
        # the loss: every stanza token and its </s>, nothing of the prompt, the separator or the padding
        assert labels[:head] == [IGNORE] * head and labels[head:n] == ids[head:n] and set(labels[n:]) <= {IGNORE}
    # the prompt decides the style: the full prompt, before the cut, names the stanza's word list
    rec = {"prompt": "song of the hills", "text": "moss pine\nfern hawk"}
    ids, labels = LMCollate(tok, 16, "text", max_prompt_tokens=24).row(rec)
    assert tok.decode(ids[:ids.index(sep)]) == "song of the hills"
    # off (the default): the texts alone, every token learnt, as before prompt_prefix existed
    plain_ids, plain_labels = LMCollate(tok, 16, "text").row(rec)
    assert plain_ids == plain_labels == tok(rec["text"], add_special_tokens=False)["input_ids"] + [eos]
    assert ids[ids.index(sep) + 1:] == plain_ids
    # the positions: the prompt and separator after the stanza's seq_len tokens
    assert job.lm.config.max_position_embeddings >= cfg.seq_len + cfg.max_prompt_tokens + 1


def test_training_flops_are_what_torch_counts():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.models.poem_lm import training_flops

    for kv_heads in (4, 2):
        c = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=kv_heads, max_position_embeddings=64, tie_word_embeddings=True)
        c._attn_implementation = "eager"          # torch's counter sees eager attention's matmuls
        lm = LlamaForCausalLM(c)
        ids = torch.randint(0, 300, (3, 17))
        counter = FlopCounterMode(display=False)
        with counter:
            lm(input_ids=ids, labels=ids).loss.backward()
        assert training_flops(c, 3, 17) == counter.get_total_flops()


def test_a_tiny_lm_trained_with_prompt_prefix_writes_each_prompts_style(tmp_path):
    from trainer.models.poem_lm import PoemLM

    shards = write_styled_shards(tmp_path / "text")
    out = tmp_path / "lm"
    r = run_cli("train", "yamls/autoencoder/token_embeddings_tiny_cpu.yaml", f"out_dir={out}", f"data.path={shards}",
                "prompt_prefix=true", "max_duration=60ba", "batch_size=16", "eval_interval=60ba", "eval_batches=1",
                "log_interval=10", "optim.lr=0.01", "optim.warmup=5ba", "max_minutes=null", *TINY_LM)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "train_summary.json"))
    # the budget is batches; the compute it bought is stated: samples, positions and FLOPs
    assert summary["batches"] == 60 and summary["samples_seen"] == 60 * 16
    lm = PoemLM.from_pretrained(summary["poem_lm_dir"])
    c = lm.lm.config
    # positions computed, padding included: each row its prompt, <s> and <= seq_len stanza tokens
    tokens, longest = summary["tokens_seen"], 16 + lm.settings.max_prompt_tokens + 1
    assert 60 * 16 * 10 <= tokens <= 60 * 16 * longest
    # FLOPs summed over batches of lengths T_b: between the mean length's and the longest one's per position
    per_token = [training_flops_per_token(c, T) for T in (tokens // 960, longest)]
    assert per_token[0] * tokens <= summary["train_flops"] <= per_token[1] * tokens
    assert json.load(open(os.path.join(summary["poem_lm_dir"], "poem_lm.json")))["training"]["train_flops"] == summary["train_flops"]
    assert os.path.isfile(out / "latent_encoder" / "token_latents_config.json")   # the latent encoder as before

    poems = {p: lm([p], num_samples=8, seed=1) for p in PROMPTS}
    assert poems["song of the sea"] == lm(["song of the sea"], num_samples=8, seed=1)        # seeded
    assert poems["song of the sea"] != lm(["song of the sea"], num_samples=8, seed=2)

    def share(texts, words):
        got = [w for t in texts for w in t.split()]
        return sum(w in words for w in got) / max(len(got), 1)

    # each prompt's samples take their words from that prompt's list, as its training stanzas do
    assert share(poems["song of the sea"], SEA) > 0.8 and share(poems["song of the hills"], HILL) > 0.8, poems
    assert share(poems["song of the sea"], HILL) < 0.2 and share(poems["song of the hills"], SEA) < 0.2, poems
    assert all(0 < len(t.split()) <= 16 for ts in poems.values() for t in ts)


def training_flops_per_token(config, length: float) -> float:
    from trainer.models.poem_lm import training_flops

    return training_flops(config, 1, int(length)) / int(length)


@pytest.mark.parametrize("override,message", [("prompt_prefix=true model.pretrained_path=.", "prompt_prefix: trains the LM"),
                                              ("max_prompt_tokens=-1", "max_prompt_tokens: must be >= 0")])
def test_bad_prompt_prefix_settings_are_one_line(tmp_path, override, message):
    r = run_cli("train", "yamls/autoencoder/token_embeddings_tiny_cpu.yaml", f"out_dir={tmp_path / 'lm'}", *override.split())
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and message in r.stderr, r.stderr
