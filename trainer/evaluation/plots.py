"""The generation report's panel: one PNG of six plots, each drawn from the report by its own function."""
from __future__ import annotations

import os

import numpy as np

from trainer.evaluation.report import real_accuracy


def plot_panel(r: dict, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 7))
    draw_denoiser_vs_linear(ax[0, 2], r)
    draw_gaussian_baseline(ax[1, 2], r)
    draw_frechet(ax[0, 0], r)
    draw_distinct(ax[0, 1], r)
    draw_memorisation_and_validity(ax[1, 0], r)
    draw_adherence(ax[1, 1], r)
    fig.tight_layout()
    tmp = png + ".tmp.png"      # a reader never sees half a panel
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def draw_denoiser_vs_linear(ax, r: dict) -> None:
    lin = r.get("denoiser_vs_linear") or {}
    if lin:
        sig = [float(k) for k in lin]
        for key, style in (("noisy", "k:"), ("linear", "s--"), ("denoiser", "o-")):
            ax.plot(sig, [v[key] for v in lin.values()], style, label=key)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sigma")
        ax.legend()
    ax.set_title("denoiser MSE vs the best linear one")


def draw_gaussian_baseline(ax, r: dict) -> None:
    """Word validity and MAUVE of the samples beside those of draws from the latents' Gaussian."""
    wv = r["word_validity"]
    if "gaussian_draws" in wv:
        bars = [("samples", wv["generated"], r["mauve"]),
                ("Gaussian draws", wv["gaussian_draws"], r.get("mauve_gaussian_draws"))]
        if "generated_free" in wv:
            bars.insert(1, ("samples, free spelling", wv["generated_free"], r.get("mauve_free")))
        xs, w = np.arange(2), 0.8 / len(bars)
        for j, (name, valid, mv) in enumerate(bars):
            ax.bar(xs + (j - (len(bars) - 1) / 2) * w, [valid, mv if isinstance(mv, float) else 0.0], w, label=name)
        ax.set_xticks(xs, ["word validity", "MAUVE"])
        ax.set_ylim(0, 1.3)   # room above the bars for the legend
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.set_title("samples vs draws from the latents' Gaussian" + (" (lexicon)" if r.get("decode_lexicon") else ""))


def draw_frechet(ax, r: dict) -> None:
    fr = r["frechet"]
    ax.bar(["generated vs real", "real vs real"], [fr["generated_vs_real"], fr["real_vs_real"]],
           color=["tab:blue", "tab:gray"])
    ax.set_title(f"Fréchet distance (PCA-{fr['pca_dims']} latents)")


def draw_distinct(ax, r: dict) -> None:
    ns = [1, 2, 3, 4]
    ax.plot(ns, [r["distinct"][f"distinct_{n}"]["generated"] for n in ns], "o-", label="generated")
    ax.plot(ns, [r["distinct"][f"distinct_{n}"]["real"] for n in ns], "s--", label="held-out")
    ax.set_xticks(ns)
    ax.set_ylim(0, 1.05)
    ax.set_title("distinct-n")
    ax.legend()


def draw_memorisation_and_validity(ax, r: dict) -> None:
    generated = [r["memorisation_4gram"]["generated"], r["word_validity"]["generated"]]
    held_out = [r["memorisation_4gram"]["held_out"], r["word_validity"]["held_out"]]
    xs = np.arange(2)
    ax.bar(xs - 0.2, generated, 0.4, label="generated")
    ax.bar(xs + 0.2, held_out, 0.4, label="held-out", color="tab:gray")
    ax.set_xticks(xs, ["4-gram memorisation", "word validity"])
    ax.set_ylim(0, 1.05)
    ax.legend()


def _adherence_bars(r: dict) -> list[tuple]:
    """(legend, the figure of a label's adherence, colour) for each bar of a label's group."""
    bars = [("generated (latent classifier)", lambda v: v["accuracy"], "tab:blue"),
            ("real held-out (latent, values alike)", lambda v: real_accuracy(v) or 0, "tab:gray"),
            ("label-conditional Gaussian (latent)", lambda v: v.get("conditional_gaussian_accuracy") or 0, "tab:purple"),
            ("generated (text classifier)", lambda v: v.get("text", {}).get("accuracy") or 0, "tab:green"),
            ("real held-out (text, values alike)", lambda v: real_accuracy(v.get("text", {})) or 0, "silver")]
    if (r.get("decode_meter_readings") or 1) > 1:   # the samples' text before they were read for the meter
        bars.insert(4, ("generated (text, greedy reading)", lambda v: v.get("text", {}).get("accuracy_greedy") or 0,
                        "yellowgreen"))
    return bars


def draw_adherence(ax, r: dict) -> None:
    adh = {k: v for k, v in r["adherence"].items() if "accuracy" in v}
    if adh:
        xs = np.arange(len(adh))
        bars = _adherence_bars(r)
        w = 0.8 / len(bars)
        for b, (name, figure, colour) in enumerate(bars):
            ax.bar(xs + (b - (len(bars) - 1) / 2) * w, [figure(v) for v in adh.values()], w, label=name, color=colour)
        for x, v in zip(xs, adh.values()):
            ax.hlines(v["chance"], x - 0.4, x + 0.4, colors="k", linestyles=":")
        ax.set_xticks(xs, list(adh))
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax.set_ylim(0, 1.45)   # room above the bars for the legend
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title("prompt adherence (dotted: chance)")
