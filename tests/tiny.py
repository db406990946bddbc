"""Tiny real parts shared by tests: an autoencoder, a denoiser, latent stats, and an autoencoder that
reconstructs its tiny corpus (trained once, cached by its recipe's hash)."""
import hashlib
import json
import os
import tempfile

import torch

WORDS = "the sea moon night love wind stone river light dark song heart old rain".split()


def fit(ae, texts: list[str], steps: int, lr: float = 3e-3) -> list[float]:
    """A few AdamW steps of an autoencoder's reconstruction loss on the texts (one batch); the losses."""
    opt = torch.optim.AdamW([p for p in ae.parameters() if p.requires_grad], lr=lr)
    batch = ae.tokenize(texts)
    ae.train()
    losses = []
    for _ in range(steps):
        loss = ae(**batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def tiny_autoencoder(path: str, seed: int = 0, lexicon: bool = False) -> str:
    """`lexicon`: save WORDS as its lexicon (as the training job saves the corpus's words), after a few
    training steps on lines of WORDS so that the decoder spells something (badly)."""
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.lexicon import Lexicon
    from trainer.models.tokenizers import train_bpe

    tok = train_bpe([" ".join(WORDS)] * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(seed)
    ae = LatentAutoencoder(AutoencoderConfig(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2,
                                             ffn_dim=64, perceiver_depth=1, perceiver_heads=2,
                                             perceiver_dim_head=16, reconstruction_depth=1, max_tokens=24), tok)
    if lexicon:
        fit(ae, [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))], 10)
        ae.eval()
        ae.lexicon = Lexicon(WORDS)
    ae.save_pretrained(path)
    return path


# A tiny corpus the reconstructing autoencoder learns by heart: decoded latents are real poems, so
# tests that compare poems compare texts, not empty strings.
POEMS = [
    "the sea is old and grey\nthe wind sings all day",
    "a moon above the stone\nthe night walks home alone",
    "love is a river of light\nit runs through the dark night",
    "the rain falls on my heart\nand the old song will start",
    "a bird upon the hill\nthe morning air is still",
    "green leaves in the spring\nthe children dance and sing",
    "the fire burns so low\nouter snow begins to glow",
    "a ship sails far away\nbeyond the golden bay",
]
RECIPE = {"model": dict(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=64,
                        perceiver_depth=1, perceiver_heads=2, perceiver_dim_head=16, reconstruction_depth=1,
                        max_tokens=24),
          "vocab_size": 400, "steps": 300, "lr": 3e-3, "seed": 0, "poems": POEMS}
# The code the trained weights depend on: a change there trains afresh.
_SOURCES = ("trainer/models/autoencoder.py", "trainer/models/perceiver.py", "trainer/models/tokenizers.py")


def token_accuracy(ae, texts: list[str]) -> float:
    """The share of the texts' tokens that greedy decoding of their own latents gives back, position by position."""
    want = ae.tokenize(texts)["input_ids"]
    got = ae.tokenize(ae.decode(ae.encode(texts)))["input_ids"]
    n = min(want.shape[1], got.shape[1])
    real = want[:, :n] != ae.tokenizer.pad_token_id
    return float(((want[:, :n] == got[:, :n]) & real).sum() / (want != ae.tokenizer.pad_token_id).sum())


def reconstructing_autoencoder(cache: str) -> str:
    """The folder of an autoencoder that reconstructs POEMS, trained under `cache` by RECIPE (about 15 s on
    one core) unless a folder of the same recipe, code and library versions is there already."""
    import transformers

    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.tokenizers import train_bpe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256(json.dumps([RECIPE, torch.__version__, transformers.__version__], sort_keys=True).encode())
    for f in _SOURCES:
        h.update(open(os.path.join(root, f), "rb").read())
    path = os.path.join(cache, "reconstructing-ae-" + h.hexdigest()[:16])
    if not os.path.isdir(path):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the same sums in the same order on any machine, and no thrashing under load
        torch.manual_seed(RECIPE["seed"])
        tok = train_bpe(POEMS * 3, vocab_size=RECIPE["vocab_size"], min_frequency=1)
        ae = LatentAutoencoder(AutoencoderConfig(**RECIPE["model"]), tok)
        fit(ae, POEMS, RECIPE["steps"], RECIPE["lr"])
        torch.set_num_threads(threads)
        os.makedirs(cache, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".ae-", dir=cache)
        ae.save_pretrained(os.path.join(tmp, "ae"))
        try:
            os.rename(os.path.join(tmp, "ae"), path)      # atomic; another session may have won the race
        except OSError:
            pass
        os.rmdir(tmp) if not os.listdir(tmp) else None
    ae = LatentAutoencoder.from_pretrained(path).eval()
    acc = token_accuracy(ae, POEMS[:4])
    assert acc >= 0.9, f"{path}: the tiny autoencoder reconstructs only {acc:.0%} of its poems' tokens"
    return path


def tiny_stats(sigma_data: float = 0.9) -> dict:
    return {"channel_mean": [0.01] * 64, "channel_std": [1.0] * 64, "mean": 0.01, "std": 1.0,
            "sigma_data": sigma_data}


def tiny_denoiser(path: str, prompt_dim: int = 384, seed: int = 0) -> str:
    from trainer.diffusion.edm import EDMPrecond
    from trainer.pipeline.export import save_denoiser
    from trainer.models.denoisers import DenoiserConfig, MoEDiTConfig, build_denoiser

    torch.manual_seed(seed)
    cfg = DenoiserConfig(prompt_dim=prompt_dim, moe_dit=MoEDiTConfig(dim=32, depth=2, head_dim=16, num_experts=2))
    net = EDMPrecond(build_denoiser(cfg), 0.9)
    with torch.no_grad():  # DiT zero-inits its output and adaLN layers: wake them so the prompt matters
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_denoiser(path, net, cfg, tiny_stats(0.9), "center")
    return path


def tiny_pipeline(root: str, lexicon: bool = False, autoencoder: str = "", max_length: int | None = 12) -> str:
    """`autoencoder`: this autoencoder folder (e.g. reconstructing_autoencoder's) instead of an untrained
    one; `max_length`: decode.max_length (None: whole poems)."""
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.pipeline import PipelineConfig, export_pipeline

    ae = autoencoder or tiny_autoencoder(os.path.join(root, "ae"), lexicon=lexicon)
    den = tiny_denoiser(os.path.join(root, "den"))
    cfg = PipelineConfig()
    cfg.decode.max_length = max_length
    return export_pipeline(os.path.join(root, "pipeline"), ae, den, PromptEncoderConfig(max_length=12), cfg)
