"""Prompt encoders: the bundled MiniLM matches sentence-transformers; open_clip and causal-LM towers
give token states, masks and pooled vectors of the documented shapes; bad configs are one-line errors."""
import json

import pytest
import torch

from trainer.base.config import ConfigError
from trainer.models.text_encoders import PromptEncoderConfig, bundled_minilm_path, build_prompt_encoder

PROMPTS = ["sonnet about the sea", "tanka by Ono no Komachi", ""]


def test_minilm_pooled_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = build_prompt_encoder(PromptEncoderConfig(kind="minilm", max_length=32))
    tokens, mask, pooled = enc(PROMPTS)
    assert tokens.shape == (3, 32, 384) and mask.shape == (3, 32) and pooled.shape == (3, 384)
    ref = SentenceTransformer(bundled_minilm_path(), device="cpu").encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(pooled, ref.float(), atol=1e-5, rtol=1e-4)
    # padding is zeroed and real tokens are not
    assert mask[0].sum() < 32 and tokens[0][~mask[0]].abs().max() == 0
    assert tokens[0][mask[0]].abs().sum() > 0
    assert not tokens.requires_grad


def test_open_clip_needs_weights_or_explicit_random_init():
    with pytest.raises(ConfigError, match="allow_random_init"):
        build_prompt_encoder(PromptEncoderConfig(kind="open_clip", model_name="ViT-B-32"))
    with pytest.raises(ConfigError, match="prompt_encoder.pretrained: no such file"):
        build_prompt_encoder(PromptEncoderConfig(kind="open_clip", pretrained="/nope.bin"))


def test_open_clip_tiny_tower(tmp_path):
    cfg_json = tmp_path / "lv-tiny-clip.json"
    cfg_json.write_text(json.dumps({
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
    }))
    torch.manual_seed(0)
    enc = build_prompt_encoder(PromptEncoderConfig(kind="open_clip", model_name="lv-tiny-clip",
                                                   model_config_json=str(cfg_json), allow_random_init=True,
                                                   max_length=16))
    tokens, mask, pooled = enc(PROMPTS)
    assert tokens.shape == (3, 16, 48) and pooled.shape == (3, 32)
    # real tokens = start + the BPE pieces + end; the empty prompt is start + end only
    expected = [len(enc.tokenizer.encode(p)) + 2 for p in PROMPTS]
    assert mask.sum(1).tolist() == expected and expected[2] == 2
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(3))


def test_causal_lm_from_local_path(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled_minilm_path())
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    enc = build_prompt_encoder(PromptEncoderConfig(kind="causal_lm", path=str(tmp_path / "lm"), max_length=12))
    tokens, mask, pooled = enc(PROMPTS)
    assert tokens.shape == (3, 12, 32) and pooled.shape == (3, 32)
    assert mask[0].sum() > mask[2].sum()
    # Causal: a prompt's states at its own positions do not depend on what else is in the batch.
    alone, _, _ = enc(PROMPTS[:1])
    torch.testing.assert_close(alone[0], tokens[0], atol=1e-5, rtol=1e-4)


def test_causal_lm_missing_path_is_one_line_error():
    with pytest.raises(ConfigError) as e:
        build_prompt_encoder(PromptEncoderConfig(kind="causal_lm", path="/no/such/dir"))
    assert str(e.value).startswith("prompt_encoder.path:") and "\n" not in str(e.value)
