"""The evaluations' reports: report.json written atomically, and the one-line summaries printed after."""
from __future__ import annotations

import os

from trainer.base.files import write_json_atomic

REPORT = "report.json"


def write_report(out_dir: str, report: dict) -> str:
    path = os.path.join(out_dir, REPORT)
    write_json_atomic(path, report)
    return path


def real_accuracy(figures: dict):
    """The real held-out poems' accuracy with the values weighed alike, as the samples' is (older reports:
    weighed by the values' shares)."""
    balanced = figures.get("real_held_out_balanced_accuracy")
    return balanced if balanced is not None else figures.get("real_held_out_accuracy")


def _adherence_phrase(report: dict, label: str, figures: dict) -> str:
    text = figures.get("text", {})
    parts = [f"text {text['accuracy']:.2f}"] if "text" in figures else []
    if (report.get("decode_meter_readings") or 1) > 1 and "accuracy_greedy" in text:
        parts.append(f"greedy reading {text['accuracy_greedy']:.2f}")
    if "accuracy_free" in text:
        parts.append(f"spelt freely {text['accuracy_free']:.2f}")
    if "conditional_gaussian_accuracy" in figures:
        parts.append(f"label-conditional Gaussian {figures['conditional_gaussian_accuracy']:.2f}")
    real = [x for x in (real_accuracy(figures), real_accuracy(text)) if x is not None]
    if real:
        parts.append("real held-out " + " / ".join(f"{x:.2f}" for x in real))
    return f"{label} {figures['accuracy']:.2f}" + (f" ({', '.join(parts)})" if parts else "")


def generation_summary(r: dict) -> str:
    """The generation report in one line."""
    fr = r["frechet"]
    adherence = ", ".join(_adherence_phrase(r, label, figures) for label, figures in r["adherence"].items()
                          if "accuracy" in figures) or "n/a"
    mauve = r["mauve"] if isinstance(r["mauve"], (float, type(None))) else "n/a"
    lin = (r.get("denoiser_vs_linear") or {}).get("0.8")
    lin_s = f"; denoiser ÷ linear MSE at sigma 0.8 {lin['denoiser'] / max(lin['linear'], 1e-12):.2f}" if lin else ""
    free = r["word_validity"].get("generated_free")
    free_s = f" (lexicon; spelling freely {free:.2f})" if free is not None else ""
    return (f"Fréchet {fr['generated_vs_real']:.3f} (real-vs-real {fr['real_vs_real']:.3f}); "
            f"distinct-2 {r['distinct']['distinct_2']['generated']:.2f} (real {r['distinct']['distinct_2']['real']:.2f}); "
            f"4-gram memorisation {r['memorisation_4gram']['generated']:.2f} (held-out {r['memorisation_4gram']['held_out']:.2f}); "
            f"word validity {r['word_validity']['generated']:.2f}{free_s}; adherence {adherence}; MAUVE {mauve}{lin_s}")


def autoencoder_summary(r: dict, autoencoder_dir: str, split: str) -> str:
    """The reconstruction report in one line, each figure beside its value with shuffled latents."""
    sh = r.get("shuffled", {})
    return (f"autoencoder {autoencoder_dir} on {r['n']} {split} poems: token accuracy "
            f"{r['token_accuracy']:.3f} (shuffled latents {sh.get('token_accuracy', float('nan')):.3f}), "
            f"exact match {r['exact_match']:.3f} ({sh.get('exact_match', float('nan')):.3f}), "
            f"BLEU {r['bleu']:.1f} ({sh.get('bleu', float('nan')):.1f})")
