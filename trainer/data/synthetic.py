"""Synthetic latent shards for benchmarks and tests: written directly with streaming's MDSWriter in the
encode job's schema (trainer/base/schema.py latent_columns), plus a latent_stats.json computed as the
encode job does (from the stored fp16 values)."""
import json
import os

import numpy as np

from trainer.base.schema import LABELS, LATENT_STATS, latent_columns
from trainer.data.mds import HASHES


def write_latent_shards(root, n_train=64, n_val=16, tokens=32, dim=64, prompt_len=8, prompt_dim=16, seed=0,
                        prompt_effect=0.0, size_limit=1 << 15, compression=None):
    """size_limit (bytes per shard) and compression are MDSWriter's; the default small shards exercise
    several shards and the shuffle. prompt_effect > 0 adds a planted linear effect of the pooled prompt to each latent:
    latent += pooled @ out["effect"] ([prompt_dim, tokens * dim]), the same in both splits."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    effect = (np.random.default_rng(seed + 1000).normal(size=(prompt_dim, tokens * dim))
              * prompt_effect / np.sqrt(prompt_dim))
    cols = latent_columns((tokens, dim), (prompt_len, prompt_dim), prompt_dim)
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        path = os.path.join(str(root), split)
        lat = []
        with MDSWriter(out=path, columns=cols, size_limit=size_limit, compression=compression, hashes=HASHES) as w:
            for i in range(n):
                z = rng.normal(size=(tokens, dim)).astype(np.float16) * np.float16(0.5) + np.float16(0.1)
                k = int(rng.integers(1, prompt_len + 1))
                emb = np.zeros((prompt_len, prompt_dim), np.float16)
                emb[:k] = rng.normal(size=(k, prompt_dim)).astype(np.float16)
                pooled = emb[:k].astype(np.float32).mean(0).astype(np.float16)
                if prompt_effect:
                    z = (z + (pooled.astype(np.float64) @ effect).reshape(tokens, dim)).astype(np.float16)
                w.write({"id": f"{split}-{i}", "text": f"poem {i}", "prompt": f"prompt {i}", "source": "jsonl",
                         **{k_: "" for k_ in LABELS}, "latent": z, "prompt_emb": emb, "prompt_len": k,
                         "prompt_pooled": pooled})
                lat.append(z.astype(np.float64))
        x = np.stack(lat).reshape(-1, dim)
        mean_c, std_c = x.mean(0), x.std(0)
        stats = {"count_vectors": int(x.shape[0]), "channel_mean": mean_c.tolist(), "channel_std": std_c.tolist(),
                 "mean": float(x.mean()), "std": float(x.std()), "sigma_data": float(np.sqrt((std_c ** 2).mean()))}
        with open(os.path.join(path, LATENT_STATS), "w") as f:
            json.dump(stats, f)
        out[split] = path
    out["effect"] = effect
    return out
