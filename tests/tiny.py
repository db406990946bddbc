"""Tiny real parts shared by tests: an autoencoder, a denoiser, latent stats."""
import os

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


def tiny_pipeline(root: str, lexicon: bool = False) -> str:
    from trainer.models.text_encoders import PromptEncoderConfig
    from trainer.pipeline.pipeline import PipelineConfig, export_pipeline

    ae = tiny_autoencoder(os.path.join(root, "ae"), lexicon=lexicon)
    den = tiny_denoiser(os.path.join(root, "den"))
    cfg = PipelineConfig()
    cfg.decode.max_length = 12
    return export_pipeline(os.path.join(root, "pipeline"), ae, den, PromptEncoderConfig(max_length=12), cfg)
