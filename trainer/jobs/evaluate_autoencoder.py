"""How well an exported autoencoder reproduces held-out poems from their latents.

Greedy (or beam) decoding from the latent, never teacher forcing: token accuracy (position by position
against the tokenised, max_tokens-cut reference), exact-match rate and corpus BLEU (sacrebleu).
The latent-shuffle check decodes each poem from ANOTHER poem's latent (latents rolled by one within
the batch): a working autoencoder collapses there; a decoder that ignores the latent does not.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Literal, Optional

import torch

from trainer.base.config import ExistingPath, UserError
from trainer.base.log import get_logger

log = get_logger("eval.autoencoder")


def _scores(model, ref_ids: list[list[int]], hyp_ids: list[list[int]]) -> dict:
    import sacrebleu

    tok = model.tokenizer
    correct = total = exact = 0
    for r, h in zip(ref_ids, hyp_ids):
        correct += sum(a == b for a, b in zip(r, h))
        total += len(r)
        exact += int(r == h[:len(r)] and len(h) <= len(r) + 1)  # an eos or pad after the reference is fine
    refs = tok.batch_decode(ref_ids, skip_special_tokens=True)
    hyps = tok.batch_decode(hyp_ids, skip_special_tokens=True)
    exact_text = sum(a == b for a, b in zip(refs, hyps))
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return {"token_accuracy": correct / max(total, 1), "exact_match": exact_text / max(len(refs), 1),
            "bleu": bleu, "_hyps": hyps, "_refs": refs, "_exact_ids": exact / max(len(refs), 1)}


@torch.no_grad()
def evaluate_autoencoder(autoencoder_dir, texts: list[str], batch_size: int = 64, num_beams: int = 1,
                         max_length: Optional[int] = None, shuffle_check: bool = True, examples: int = 3) -> dict:
    """Reconstruction figures of `autoencoder_dir` (a path or a LatentAutoencoder) on `texts`.

    Returns {'n', 'token_accuracy', 'exact_match', 'bleu', 'shuffled': {same three}, 'examples': [...]}.
    Token accuracy counts the reference tokens (with <s> and </s>) reproduced at their position.
    """
    from tqdm import tqdm

    from trainer.models.autoencoder import LatentAutoencoder

    model = autoencoder_dir if isinstance(autoencoder_dir, LatentAutoencoder) \
        else LatentAutoencoder.from_pretrained(autoencoder_dir)
    model.eval()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("evaluate_autoencoder: no non-empty texts to evaluate")
    refs, hyps, hyps_shuffled = [], [], []
    for i in tqdm(range(0, len(texts), batch_size), desc="autoencoder eval", unit="batch"):
        chunk = texts[i:i + batch_size]
        enc = {k: v.to(model.device) for k, v in model.tokenize(chunk).items()}
        z = model.encode_ids(**enc)
        ids = enc["input_ids"]
        refs += [row[m.bool()].tolist() for row, m in zip(ids, enc["attention_mask"])]
        n = max_length or ids.shape[1]
        gen = model.generate_ids(z, max_length=n, num_beams=num_beams)
        hyps += [_strip(row.tolist(), model.tokenizer) for row in gen]
        if shuffle_check and len(chunk) > 1:
            gen = model.generate_ids(z.roll(1, dims=0), max_length=n, num_beams=num_beams)
            hyps_shuffled += [_strip(row.tolist(), model.tokenizer) for row in gen]
    s = _scores(model, refs, hyps)
    out = {"n": len(texts), "num_beams": num_beams,
           **{k: s[k] for k in ("token_accuracy", "exact_match", "bleu")},
           "examples": [{"reference": r, "reconstruction": h} for r, h in zip(s["_refs"], s["_hyps"])][:examples]}
    if hyps_shuffled:
        # Compare against the refs of the same rows (which were decoded from someone else's latent).
        sh = _scores(model, refs[:len(hyps_shuffled)], hyps_shuffled)
        out["shuffled"] = {k: sh[k] for k in ("token_accuracy", "exact_match", "bleu")}
    return out


def _strip(ids: list[int], tok) -> list[int]:
    """Generated ids up to and including the first </s>; pads dropped."""
    out = []
    for t in ids:
        if t == tok.pad_token_id:
            continue
        out.append(t)
        if t == tok.eos_token_id:
            break
    return out


# ---------------------------------------------------------------- training curve


# ---------------------------------------------------------------- job-style entry (for `latentverse evaluate`)

@dataclasses.dataclass
class EvalAutoencoderConfig:
    task: Literal["autoencoder"] = "autoencoder"
    autoencoder_dir: ExistingPath = "out/demo/autoencoder/autoencoder"
    data_path: ExistingPath = "out/demo/text_shards"  # text shards: <data_path>/<split>/index.json
    split: str = "test"
    text_column: str = "text"
    n_samples: int = 500
    batch_size: int = 64
    num_beams: int = 1
    out_dir: str = "out/demo/eval_autoencoder"


def run(cfg: EvalAutoencoderConfig) -> dict:
    """Evaluate on the first n_samples of a split; write report.json (+ the training-curve PNG if found)."""
    from trainer.data.mds import read_texts
    from trainer.training.callbacks import plot_training_curve

    local = os.path.join(cfg.data_path, cfg.split)
    if not os.path.isfile(os.path.join(local, "index.json")):
        raise UserError(f"data_path: {local}/index.json not found")
    texts = read_texts(local, cfg.text_column, cfg.n_samples)
    report = evaluate_autoencoder(cfg.autoencoder_dir, texts, cfg.batch_size, cfg.num_beams)
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = os.path.join(os.path.dirname(os.path.abspath(cfg.autoencoder_dir)), "metrics.jsonl")
    if os.path.isfile(metrics):
        report["training_curve"] = plot_training_curve(metrics, os.path.join(cfg.out_dir, "training_curve.png"))
    tmp = os.path.join(cfg.out_dir, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, os.path.join(cfg.out_dir, "report.json"))
    sh = report.get("shuffled", {})
    print(f"autoencoder {cfg.autoencoder_dir} on {report['n']} {cfg.split} poems: token accuracy "
          f"{report['token_accuracy']:.3f} (shuffled latents {sh.get('token_accuracy', float('nan')):.3f}), "
          f"exact match {report['exact_match']:.3f} ({sh.get('exact_match', float('nan')):.3f}), "
          f"BLEU {report['bleu']:.1f} ({sh.get('bleu', float('nan')):.1f})")
    return report


CONFIG = EvalAutoencoderConfig


def main(argv=None) -> int:
    """python -m trainer.jobs.evaluate_autoencoder [CONFIG.yaml] [key=value ...] (until `latentverse evaluate` routes here)."""
    import sys

    from trainer.base import config as C

    args = list(sys.argv[1:] if argv is None else argv)
    path = args.pop(0) if args and "=" not in args[0] else None
    try:
        run(C.load(EvalAutoencoderConfig, path, args))
    except UserError as e:
        print(str(e), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
