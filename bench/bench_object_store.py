"""Diffusion training streaming its shards from an S3 API vs from a local folder.

One run of this file, side by side: the same `latentverse train` job (the model of
bench_train_diffusion, 1 rank, 1 thread, two epochs of 1,024 synthetic samples in ~340 small shards of
32 KiB) once on a local folder and once on the same shards in a bucket of moto's S3 server on
127.0.0.1 (tests/s3_server.py), read through the node-local cache. samples/s per epoch come from the
job's metrics.jsonl (the first 3 batches of each epoch left out: warm-up, the epoch's first fetches).
The first epoch downloads every shard as streaming reads it; the second reads the filled cache. The
server runs in this process, on the same two cores as the job: a real store's latency and bandwidth
differ (the first epoch's figure is a floor for neither).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from bench.bench_train_diffusion import ROOT, _job

BATCH, EPOCH = 64, 16      # 1,024 samples: 16 batches of 64 per epoch


def _per_epoch(out: str) -> list[float]:
    """samples/s of epoch 1 and epoch 2 (batches 4..16 and 20..32)."""
    rows = {r["batch"]: r["seconds"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))
            if "train/loss" in r}
    rates = []
    for start in (0, EPOCH):
        a, b = start + 3, start + EPOCH
        rates.append((b - a) * BATCH / (rows[b] - rows[a]))
    return rates


def main() -> list[dict]:
    sys.path.insert(0, ROOT)
    from tests.s3_server import S3Server
    from trainer.base import uris
    from trainer.data.synthetic import write_latent_shards

    server = S3Server().start()
    saved = dict(os.environ)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_latent_shards(os.path.join(tmp, "latents"), n_train=BATCH * EPOCH, n_val=8, prompt_dim=384)
            os.environ.update(server.env(), LATENTVERSE_CACHE=os.path.join(tmp, "cache"))
            bucket = f"s3://{server.make_bucket()}"
            uris.upload_tree(os.path.join(tmp, "latents"), f"{bucket}/latents")
            _job(tmp, "local", 1, "none", 2 * EPOCH, BATCH)
            _job(tmp, "remote", 1, "none", 2 * EPOCH, BATCH, extra=[f"data.path={bucket}/latents/train"])
            local, remote = _per_epoch(os.path.join(tmp, "local")), _per_epoch(os.path.join(tmp, "remote"))
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()
    print(f"  samples/s, epoch 1 / epoch 2: local {local[0]:.1f} / {local[1]:.1f}, "
          f"S3 {remote[0]:.1f} / {remote[1]:.1f}")
    rows = [{"benchmark": "diffusion train samples/s streaming from a local S3 server (moto) ÷ from a local folder, "
                          "second epoch (cache filled)", "ratio": remote[1] / local[1], "goal": ">= 0.9"},
            {"benchmark": "the same, first epoch (every shard downloaded as it is read)",
             "ratio": remote[0] / local[0], "goal": "reported"}]
    for r in rows:
        r["command"] = "python -m bench object_store"
        print(f"{r['benchmark']}: {r['ratio']:.3f} (goal {r['goal']})")
    return rows


if __name__ == "__main__":
    main()
