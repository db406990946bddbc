"""How well an autoencoder reproduces held-out poems from their latents.

Greedy (or beam) decoding from the latent, never teacher forcing: token accuracy (position by position
against the tokenised, max_tokens-cut reference), exact-match rate and corpus BLEU (sacrebleu).
The latent-shuffle check decodes each poem from ANOTHER poem's latent (latents rolled by one within
the batch): a working autoencoder collapses there; a decoder that ignores the latent does not.
"""
from __future__ import annotations

from typing import Optional

import torch

from trainer.base.config import UserError
from trainer.models.autoencoder import LatentAutoencoder

FIGURES = ("token_accuracy", "exact_match", "bleu")


@torch.no_grad()
def evaluate_autoencoder(autoencoder_dir, texts: list[str], batch_size: int = 64, num_beams: int = 1,
                         max_length: Optional[int] = None, shuffle_check: bool = True, examples: int = 3) -> dict:
    """Reconstruction figures of `autoencoder_dir` (a path or a LatentAutoencoder) on `texts`.

    Returns {'n', 'token_accuracy', 'exact_match', 'bleu', 'shuffled': {same three}, 'examples': [...]}.
    Token accuracy counts the reference tokens (with <s> and </s>) reproduced at their position.
    """
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError("evaluate_autoencoder: no non-empty texts to evaluate")
    model = autoencoder_dir if isinstance(autoencoder_dir, LatentAutoencoder) \
        else LatentAutoencoder.from_pretrained(autoencoder_dir)
    model.eval()
    refs, hyps, hyps_shuffled = reconstruct(model, texts, batch_size, num_beams, max_length, shuffle_check)
    scores = _scores(model, refs, hyps)
    out = {"n": len(texts), "num_beams": num_beams, **{k: scores[k] for k in FIGURES},
           "examples": [{"reference": r, "reconstruction": h} for r, h in zip(scores["_refs"], scores["_hyps"])][:examples]}
    if hyps_shuffled:
        # Compare against the refs of the same rows (which were decoded from someone else's latent).
        shuffled = _scores(model, refs[:len(hyps_shuffled)], hyps_shuffled)
        out["shuffled"] = {k: shuffled[k] for k in FIGURES}
    return out


def reconstruct(model: LatentAutoencoder, texts: list[str], batch_size: int, num_beams: int,
                max_length: Optional[int], shuffle_check: bool) -> tuple[list, list, list]:
    """Token ids of the references, of their reconstructions, and (shuffle_check) of the reconstructions
    from the latent of the poem before in the batch (batches of one have none)."""
    from tqdm import tqdm

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
    return refs, hyps, hyps_shuffled


def _scores(model, ref_ids: list[list[int]], hyp_ids: list[list[int]]) -> dict:
    import sacrebleu

    tok = model.tokenizer
    correct = total = 0
    for r, h in zip(ref_ids, hyp_ids):
        correct += sum(a == b for a, b in zip(r, h))
        total += len(r)
    refs = tok.batch_decode(ref_ids, skip_special_tokens=True)
    hyps = tok.batch_decode(hyp_ids, skip_special_tokens=True)
    exact_text = sum(a == b for a, b in zip(refs, hyps))
    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return {"token_accuracy": correct / max(total, 1), "exact_match": exact_text / max(len(refs), 1),
            "bleu": bleu, "_hyps": hyps, "_refs": refs}


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
