"""Encode job throughput: the whole job (read shards, encode, write MDS, merge, stats) against the bare
encoder forward on the same batches (every prompt distinct, so the job's per-prompt cache does not
help it); and 2 slots against 1 slot, one thread each (a slot stands for a rank with its own core),
whole-job wall time including process start and model loading. Real parts: the tiny CPU autoencoder's sizes (random weights: speed does
not depend on them) and the bundled MiniLM prompt encoder, on synthetic poems."""
import os
import tempfile
import time

import numpy as np
import torch

N = 8000
BATCH = 128
CMD = "python -m bench encode"


def _shards(root: str) -> str:
    from streaming import MDSWriter

    from trainer.base.schema import LABELS, TEXT_COLUMNS

    words = "the sea moon night love wind stone river light dark song heart old rain sky".split()
    rng = np.random.default_rng(0)
    with MDSWriter(out=os.path.join(root, "train"), columns=TEXT_COLUMNS, compression="zstd") as w:
        for i in range(N):
            text = "\n".join(" ".join(rng.choice(words, size=6)) for _ in range(4))
            # distinct prompts, so the job's per-prompt cache gives it no edge over the bare forward
            w.write({"id": f"b-{i}", "text": text, "prompt": f"stanza {i} about the {words[i % len(words)]}",
                     "source": "bench", **{k: "" for k in LABELS}, "n_tokens": 24})
    return root


def main() -> list[dict]:
    from streaming import StreamingDataset

    from data_prep import encode_job
    from trainer.base import config as C
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.text_encoders import build_prompt_encoder
    from trainer.models.tokenizers import train_bpe

    tmp = tempfile.mkdtemp(prefix="bench-encode-")
    _shards(os.path.join(tmp, "text"))
    src = StreamingDataset(local=os.path.join(tmp, "text", "train"), shuffle=False, batch_size=1)
    rows = [src[i] for i in range(N)]
    tok = train_bpe([r["text"] for r in rows[:500]], vocab_size=500, min_frequency=1)
    ae = LatentAutoencoder(AutoencoderConfig(), tok)   # the tiny CPU sizes are the defaults
    ae.save_pretrained(os.path.join(tmp, "ae"))

    torch.set_num_threads(1)
    ae = LatentAutoencoder.from_pretrained(os.path.join(tmp, "ae")).eval()
    penc = build_prompt_encoder()
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, N, BATCH):
            b = rows[s:s + BATCH]
            ae.encode([r["text"] for r in b])
            penc([r["prompt"] for r in b])
    bare = N / (time.perf_counter() - t)

    def job(slots: int) -> float:
        cfg = C.load(encode_job.EncodeConfig, None, [
            f"out_dir={tmp}/out{slots}", f"autoencoder={tmp}/ae", f"data.path={tmp}/text", "data.splits=[train]",
            f"batch_size={BATCH}", f"num_workers={slots}", "threads_per_slot=1"])
        t = time.perf_counter()
        encode_job.run(cfg)
        return N / (time.perf_counter() - t)

    one = job(1)
    two = job(2)
    print(f"bare encoder forward {bare:.1f} samples/s; encode job 1 slot {one:.1f}; 2 slots {two:.1f} samples/s")
    return [
        {"benchmark": "encode job ÷ bare encoder forward (1 thread)", "ratio": one / bare, "goal": ">= 0.8",
         "command": CMD},
        {"benchmark": "encode job 2 slots ÷ 1 slot (1 thread each)", "ratio": two / one, "goal": ">= 1.7",
         "command": CMD},
    ]


if __name__ == "__main__":
    for r in main():
        print(r)
