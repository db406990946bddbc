"""Saving and loading a trained denoiser: safetensors weights + a JSON config, never pickles.

    save_denoiser(dir, net, denoiser_cfg, latent_stats, normalize)   # net: the EMA EDMPrecond
    net, meta = load_denoiser(dir)

The directory holds everything needed to rebuild the network and to map its samples back to the
autoencoder's latent space: the DenoiserConfig, sigma_data, and the latent statistics with the
normalisation mode the training used (trainer/data/loaders.py LatentNormalizer); with normalize whiten
also the whitening (whitening.safetensors, trainer/data/whitening.py; meta["whitening"] when loaded).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from trainer.base.config import UserError
from trainer.base.files import replace_dir
from trainer.base import config as C
from trainer.data.whitening import WHITENING_FILE, Whitening
from trainer.diffusion.edm import EDMPrecond, PromptMean
from trainer.models.denoisers import build_denoiser, DenoiserConfig

DENOISER_CONFIG = "denoiser_config.json"
DENOISER_WEIGHTS = "denoiser.safetensors"


def save_denoiser(path: str, net, denoiser_cfg, latent_stats: dict, normalize: str, extra: dict | None = None,
                  whitening: Whitening | None = None) -> None:
    from safetensors.torch import save_file

    if (normalize == "whiten") != (whitening is not None):
        raise ValueError(f"save_denoiser: normalize {normalize!r} with{'out' if whitening is None else ''} a whitening")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".denoiser-", dir=parent)
    meta = {"denoiser": dataclasses.asdict(denoiser_cfg), "sigma_data": float(net.sigma_data),
            "normalize": normalize, "latent_stats": latent_stats, **(extra or {})}
    with open(os.path.join(tmp, DENOISER_CONFIG), "w") as f:
        json.dump(meta, f, indent=1)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    save_file(state, os.path.join(tmp, DENOISER_WEIGHTS))
    if whitening is not None:
        whitening.save(os.path.join(tmp, WHITENING_FILE))
    replace_dir(tmp, path)


def load_denoiser(path: str, map_location: str = "cpu"):
    """(EDMPrecond in eval mode, meta dict). A missing or corrupt file is a one-line error naming it."""
    from safetensors.torch import load_file
    cfg_file, weights = os.path.join(path, DENOISER_CONFIG), os.path.join(path, DENOISER_WEIGHTS)
    for f in (cfg_file, weights):
        if not os.path.isfile(f):
            raise UserError(f"{f}: missing (not a denoiser directory?)")
    try:
        with open(cfg_file) as f:
            meta = json.load(f)
        moe = meta["denoiser"].get("moe_dit")
        if isinstance(moe, dict) and "patch_mixer_mlp_ratio" not in moe:
            moe["patch_mixer_mlp_ratio"] = 4.0  # saved before the key existed, when the mixer FFN was 4*dim
        dcfg = C.from_dict(DenoiserConfig, meta["denoiser"], source=cfg_file)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: corrupt denoiser config ({type(e).__name__}: {e})") from None
    pm = PromptMean(dcfg.prompt_dim, (dcfg.latent_tokens, dcfg.latent_dim)) if meta.get("prompt_mean") else None
    net = EDMPrecond(build_denoiser(dcfg), sigma_data=meta["sigma_data"], prompt_mean=pm)
    try:
        state = load_file(weights, device=map_location)
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise UserError(f"{weights}: corrupt weights file ({e})") from None
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{weights}: does not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    meta["denoiser_config"] = dcfg
    if meta.get("normalize") == "whiten":
        meta["whitening"] = Whitening.load(os.path.join(path, WHITENING_FILE))
    return net.eval().requires_grad_(False), meta
