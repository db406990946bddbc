"""Encode job throughput, on synthetic poems (every prompt distinct, so the job's per-prompt cache does not
help it) with the tiny CPU autoencoder's sizes (random weights: speed does not depend on them) and the
bundled MiniLM prompt encoder, one thread per slot:

- the bare forwards on the same batches, in this process: the latent encoder alone and the prompt
  encoder alone, each timed on its own;
- the job with 1 slot and with 2 slots, each run the same way: `latentverse encode` as a fresh
  process (python -m launch.cli), its wall time from the command's start to its exit (interpreter
  start, imports, model loading, reading, encoding, writing, merging, stats). A slot stands for a rank
  with its own core; with 2 slots the command spawns one process per slot.
- the 1-slot job's own timer (its `seconds` in _done.json: model loading, reading, encoding, writing,
  merging and stats, without the interpreter start and imports) against the two bare forwards.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

N = 2000
BATCH = 128
CMD = "python -m bench encode"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    t_ae = t_pe = 0.0
    with torch.inference_mode():
        ae.encode([r["text"] for r in rows[:BATCH]]), penc([r["prompt"] for r in rows[:BATCH]])  # warm-up
        for s in range(0, N, BATCH):  # the two forwards alternate batch by batch, each timed on its own
            b = rows[s:s + BATCH]
            t = time.perf_counter()
            ae.encode([r["text"] for r in b])
            t_ae += time.perf_counter() - t
            t = time.perf_counter()
            penc([r["prompt"] for r in b])
            t_pe += time.perf_counter() - t

    def job(slots: int) -> tuple[float, float]:
        """(wall seconds of the command, the job's own seconds) of `latentverse encode` with `slots` slots."""
        out = f"{tmp}/out{slots}"
        cmd = [sys.executable, "-m", "launch.cli", "encode", f"out_dir={out}", f"autoencoder={tmp}/ae",
               f"data.path={tmp}/text", "data.splits=[train]", f"batch_size={BATCH}", f"num_workers={slots}",
               "threads_per_slot=1"]
        t = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1"))
        wall = time.perf_counter() - t
        if r.returncode != 0:
            raise RuntimeError(f"encode with {slots} slot(s) failed: {r.stderr[-2000:]}")
        return wall, json.load(open(os.path.join(out, "_done.json")))["seconds"]

    (one, one_own), (two, _) = job(1), job(2)
    print(f"bare forwards, {N} samples: latent encoder {N / t_ae:.1f} samples/s, prompt encoder {N / t_pe:.1f}, "
          f"both {N / (t_ae + t_pe):.1f}; `latentverse encode` 1 slot {one:.1f} s (its own timer {one_own:.1f} s), "
          f"2 slots {two:.1f} s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return [
        {"benchmark": f"encode job, 1 slot (its own timer: model loading to stats) ÷ the bare latent-encoder + "
                      f"prompt-encoder forwards on the same batches (samples/s, 1 thread, {N} samples)",
         "ratio": (t_ae + t_pe) / one_own, "goal": ">= 0.8", "command": CMD},
        {"benchmark": "bare forwards on the same batches: latent encoder alone ÷ latent + prompt encoder "
                      "(samples/s; the share the prompt encoder leaves)",
         "ratio": (t_ae + t_pe) / t_ae, "goal": "reported", "command": CMD},
        {"benchmark": f"`latentverse encode`, 2 slots ÷ 1 slot (samples/s; each a fresh process, wall time from "
                      f"start to exit; 1 thread per slot, {N} samples)",
         "ratio": one / two, "goal": ">= 1.7", "command": CMD},
    ]


if __name__ == "__main__":
    for r in main():
        print(r)
