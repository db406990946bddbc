"""Evaluate an exported pipeline's samples against held-out poems; writes report.json and a PNG panel.

Samples: `samples_per_prompt` poems for each of the `n_prompts` most common held-out prompts.
  fidelity     Fréchet distance between generated and real held-out latents (top-k PCA features of
               the flattened [32, 64] latents, fitted on training latents), beside the real-vs-real
               baseline: the same distance between two disjoint real sets of the same size.
  diversity    distinct-n (n = 1..4) of the samples beside the held-out set's own.
  memorisation share of generated 4-grams found in the training texts, beside the held-out set's own.
  validity     share of generated words found in the training vocabulary.
  (Every held-out reference text is cut to the tokens the latent encoder reads, as the samples are.)
  adherence    a logistic-regression classifier of each label (form, meter) trained on real training
               latents; its accuracy on samples generated for each label's most common prompt
               (beside its accuracy on real held-out latents, the ceiling, and chance). A second
               classifier asks the same of the decoded poems (character n-grams and line shape:
               lines, syllables and words per line), so a decoder that ignores its latent shows.
               Beside them, the latent classifier's accuracy on draws from each value's Gaussian
               (its mean, the covariance pooled within values): what a model reaches that has learnt
               how the label moves the latents' mean and no more.
  meter        with decode.meter_readings > 1 a prompt that names a meter gets the best-scanning of
               several readings of each latent (trainer.pipeline.Pipeline.decode); every text figure is
               also given for the greedy reading (`*_greedy`), and the samples' scansion in their
               meter beside the real held-out poems' (trainer.text.prosody.scansion).
  MAUVE        over MiniLM sentence features of generated vs held-out poems (mauve-text).
  linear check the denoiser's error on noised held-out latents beside the best linear denoiser's: how
               much beyond the latents' mean and covariance it has learnt; and word validity and MAUVE
               of decoded draws from that Gaussian, the baseline the samples have to beat.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np

from trainer.text.prosody import meter_templates, prompt_meter, scansion
from trainer.evaluation import metrics as M
from trainer.base.config import ExistingPath, UserError
from trainer.base.log import get_logger

if TYPE_CHECKING:
    import torch

log = get_logger("evaluate")


@dataclasses.dataclass
class EvalGenerationConfig:
    task: Literal["generation"] = "generation"
    out_dir: str = "out/demo/eval"
    pipeline: ExistingPath = "out/demo/pipeline"
    latent_data: ExistingPath = "out/demo/latents"     # latent shards: <latent_data>/<split>/index.json
    train_split: str = "train"
    held_out_split: str = "test"
    n_real: int = 400                    # held-out poems used as the real reference
    max_train: int = 20000               # training poems for the n-gram set, vocabulary and classifiers
    n_prompts: int = 4
    samples_per_prompt: int = 16
    labels: list[str] = dataclasses.field(default_factory=lambda: ["form", "meter"])
    n_label_values: int = 4              # most common values of each label
    pca_dims: int = 32
    steps: Optional[int] = None          # sampler steps (None = the pipeline's)
    guidance: Optional[float] = None
    churn: Optional[float] = None        # the Heun sampler's S_churn (None = the pipeline's)
    sampler: Literal["heun", "ddpm"] = "heun"
    meter_readings: Optional[int] = None  # readings per latent for prompts naming a meter (None = the pipeline's)
    seed: int = 0
    mauve: bool = True
    n_linear_check: int = 128            # held-out latents for the denoiser-vs-linear check

    def __post_init__(self):
        # Checked here, before the pipeline and the latents are read, rather than by the sampler's own
        # config in the middle of the run.
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")
        if self.churn is not None and self.churn < 0:
            raise ValueError(f"churn: must be >= 0, got {self.churn}")
        if self.churn is not None and self.sampler != "heun":
            raise ValueError("churn: only with sampler heun")
        if self.meter_readings is not None and self.meter_readings < 1:
            raise ValueError(f"meter_readings: must be >= 1, got {self.meter_readings}")


CONFIG = EvalGenerationConfig


def read_latent_split(root: str, split: str, limit: int) -> dict:
    """{latent [N, T, C] float32, text, prompt, <labels>} of `limit` samples of a split, evenly spaced
    over it (a split the encode job partitioned holds its partitions one after another)."""
    from trainer.data.mds import LocalMDS
    from trainer.base.schema import LABELS

    local = os.path.join(root, split)
    if not os.path.isfile(os.path.join(local, "index.json")):
        raise UserError(f"latent_data: no latent shards in {local!r} (index.json missing)")
    ds = LocalMDS(local)
    rows = [ds[i] for i in ds.spread(limit)]
    out = {"latent": np.stack([np.asarray(r["latent"], np.float32) for r in rows]) if rows else np.zeros((0, 32, 64)),
           "text": [r["text"] for r in rows], "prompt": [r["prompt"] for r in rows]}
    for k in LABELS:
        out[k] = [r.get(k, "") for r in rows]
    return out


def _generate(pipe, prompts: list[str], cfg: EvalGenerationConfig) -> tuple[torch.Tensor, np.ndarray, list[str], list[str]]:
    """Samples for the prompts (prompt-major): diffusion-space x, encoder-space latents, the poems as the
    pipeline decodes them, and the greedy readings (the same list when no prompt's meter is read for)."""
    x, _ = pipe.sample_latents(prompts, cfg.samples_per_prompt, cfg.steps, cfg.guidance, cfg.seed, cfg.sampler,
                               churn=cfg.churn)
    return x, pipe.to_latents(x).cpu().numpy(), *_readings(pipe, x, prompts, cfg)


def _readings(pipe, x, prompts: list[str], cfg: EvalGenerationConfig, lexicon=None) -> tuple[list[str], list[str]]:
    """The poems of latents x made for `prompts` (samples_per_prompt each) as the pipeline decodes them
    (the best-scanning reading for a prompt naming a meter), and their greedy readings."""
    greedy = pipe.decode(x, lexicon)
    if pipe.meter_readings(cfg.meter_readings) < 2 or not any(prompt_meter(p) for p in prompts):
        return greedy, greedy
    rows = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    return pipe.read_for_meter(x, greedy, rows, lexicon, cfg.meter_readings, cfg.seed), greedy


def run(cfg: EvalGenerationConfig) -> dict:
    import torch

    from trainer.pipeline.pipeline import Pipeline

    torch.manual_seed(cfg.seed)
    pipe = Pipeline.from_pretrained(cfg.pipeline)
    train = read_latent_split(cfg.latent_data, cfg.train_split, cfg.max_train)
    held = read_latent_split(cfg.latent_data, cfg.held_out_split, cfg.n_real)
    if len(held["text"]) < 4 or len(train["text"]) < 4:
        raise UserError(f"latent_data: too few samples ({len(train['text'])} train, {len(held['text'])} held-out)")
    report: dict = {"pipeline": os.path.abspath(cfg.pipeline), "n_train": len(train["text"]),
                    "n_held_out": len(held["text"]), "config": dataclasses.asdict(cfg)}

    # ---- samples for the most common held-out prompts
    prompts = M.most_common(held["prompt"], cfg.n_prompts) or [""]
    log.info(f"generating {cfg.samples_per_prompt} samples for each of {prompts}")
    gen_x, gen_lat, gen_txt, gen_greedy = _generate(pipe, prompts, cfg)
    report["decode_meter_readings"] = pipe.meter_readings(cfg.meter_readings)
    report["samples"] = [{"prompt": prompts[i // cfg.samples_per_prompt], "poem": t} for i, t in enumerate(gen_txt)]
    n_gen = len(gen_txt)

    # ---- fidelity: Fréchet distance in PCA space, beside two disjoint real sets of the same size
    feats = M.PCAFeatures(train["latent"], cfg.pca_dims)
    real_a = held["latent"][:n_gen]
    real_b = train["latent"][-n_gen:]
    report["frechet"] = {"generated_vs_real": M.frechet_distance(feats(gen_lat), feats(real_a)),
                         "real_vs_real": M.frechet_distance(feats(real_b), feats(real_a)),
                         "n": int(min(n_gen, len(real_a))), "pca_dims": int(feats.components.shape[0])}
    fr = report["frechet"]
    fr["ratio"] = fr["generated_vs_real"] / max(fr["real_vs_real"], 1e-12)

    gauss = M.GaussianLatents(train["latent"], pipe.normalizer)
    report["denoiser_vs_linear"] = denoiser_vs_linear(pipe, gauss, held["latent"][:cfg.n_linear_check],
                                                      held["prompt"][:cfg.n_linear_check], seed=cfg.seed)
    # The baseline a DiT has to beat: as many draws from the Gaussian fitted to the training latents,
    # decoded the same way (no prompt).
    gauss_x = gauss.sample(n_gen, cfg.seed).to(pipe.device)
    gauss_txt = pipe.decode(gauss_x)

    # ---- diversity, memorisation, validity
    # Real references as a latent can hold them: cut to the tokens the encoder reads, as every sample is.
    held_txt = pipe.autoencoder.clip_texts(held["text"])
    train_txt = pipe.autoencoder.clip_texts(train["text"])      # for the text classifiers
    report["distinct"] = {f"distinct_{n}": {"generated": M.distinct_n(gen_txt, n), "real": M.distinct_n(held_txt[:n_gen], n)}
                          for n in (1, 2, 3, 4)}
    train_grams = M.ngram_set(train["text"], 4)
    report["memorisation_4gram"] = {"generated": M.memorisation(gen_txt, train_grams, 4),
                                    "held_out": M.memorisation(held_txt, train_grams, 4)}
    vocab = M.vocabulary(train["text"])
    report["word_validity"] = {"generated": M.word_validity(gen_txt, vocab), "held_out": M.word_validity(held_txt, vocab),
                               "gaussian_draws": M.word_validity(gauss_txt, vocab),
                               "generated_greedy": M.word_validity(gen_greedy, vocab)}
    report["decode_lexicon"] = pipe.uses_lexicon()
    free_txt = None
    if report["decode_lexicon"]:
        # What the decoder spells without the lexicon: the model's own word validity, the lexicon's
        # share is the difference.
        free_txt, free_greedy = _readings(pipe, gen_x, prompts, cfg, lexicon=False)
        report["word_validity"]["generated_free"] = M.word_validity(free_txt, vocab)
        report["word_validity"]["generated_free_greedy"] = M.word_validity(free_greedy, vocab)
        report["word_validity"]["gaussian_draws_free"] = M.word_validity(
            pipe.decode(gauss_x, lexicon=False), vocab)

    # ---- prompt adherence: label classifiers on real latents, applied to samples made for each label
    report["adherence"] = {}
    for label in cfg.labels:
        values = M.most_common(train[label], cfg.n_label_values)
        if len(values) < 2:
            report["adherence"][label] = {"skipped": f"fewer than 2 values of {label!r} in the training latents"}
            continue
        idx = [i for i, v in enumerate(train[label]) if v in values]
        clf = M.LabelClassifier(train["latent"][idx], [train[label][i] for i in idx], seed=cfg.seed)
        hidx = [i for i, v in enumerate(held[label]) if v in values]
        hlab = [held[label][i] for i in hidx]
        hpred = clf.predict(held["latent"][hidx]) if hidx else []
        per_value, label_prompts = {}, []
        for v in values:
            cands = Counter(p for p, lv in zip(train["prompt"], train[label]) if lv == v and p)
            label_prompts.append(cands.most_common(1)[0][0] if cands else v)
        tclf = M.TextLabelClassifier([train_txt[i] for i in idx], [train[label][i] for i in idx], seed=cfg.seed)
        htpred = tclf.predict([held_txt[i] for i in hidx]) if hidx else []
        # The real held-out poems, predicted once: over all of them (the values weighed by their shares)
        # and per value (the samples' reference).
        right = (lambda preds, v=None: float(np.mean([p == y for p, y in zip(preds, hlab) if v in (None, y)])))
        real_acc = right(hpred) if hidx else None
        real_text_acc = right(htpred) if hidx else None
        x, lat, txt, greedy = _generate(pipe, label_prompts, cfg)
        pred, tpred = clf.predict(lat), tclf.predict(txt)
        gpred = tpred if greedy is txt else tclf.predict(greedy)
        fpred = fgpred = None
        if report["decode_lexicon"]:
            ftxt, fgreedy = _readings(pipe, x, label_prompts, cfg, lexicon=False)
            fpred = tclf.predict(ftxt)
            fgpred = fpred if fgreedy is ftxt else tclf.predict(fgreedy)
        k = cfg.samples_per_prompt
        share = (lambda preds, j, v: float(np.mean([p == v for p in preds[j * k:(j + 1) * k]])))
        cond = M.conditional_gaussian_draws(train["latent"][idx], [train[label][i] for i in idx], values, k, cfg.seed)
        for j, v in enumerate(values):
            per_value[v] = {"prompt": label_prompts[j], "accuracy": share(pred, j, v), "text_accuracy": share(tpred, j, v),
                            "conditional_gaussian_accuracy": float(np.mean([p == v for p in clf.predict(cond[v])]))}
            per_value[v]["text_accuracy_greedy"] = share(gpred, j, v)
            if fpred is not None:
                per_value[v]["text_accuracy_free"] = share(fpred, j, v)
                per_value[v]["text_accuracy_free_greedy"] = share(fgpred, j, v)
            if label == "meter" and meter_templates(v):   # the lines' stresses against the meter's patterns
                scans = (lambda texts: float(np.mean([scansion(t, v) for t in texts])) if texts else None)
                per_value[v].update(scansion=scans(txt[j * k:(j + 1) * k]), scansion_greedy=scans(greedy[j * k:(j + 1) * k]),
                                    real_held_out_scansion=scans([held_txt[i] for i, y in zip(hidx, hlab) if y == v]))
            # The real held-out poems of this value, asked the same question: the samples' reference.
            n_v = hlab.count(v)
            if n_v:
                per_value[v].update(real_held_out_accuracy=right(hpred, v), real_held_out_text_accuracy=right(htpred, v),
                                    n_real_held_out=n_v)
        # real_held_out_accuracy weighs the values by their share of the held-out poems; the samples'
        # accuracy weighs them alike, as does the balanced figure (the mean over values with real poems).
        balanced = (lambda key: float(np.mean([d[key] for d in per_value.values() if key in d]))
                    if any(key in d for d in per_value.values()) else None)
        report["adherence"][label] = {
            "accuracy": float(np.mean([d["accuracy"] for d in per_value.values()])),
            "real_held_out_accuracy": real_acc, "real_held_out_balanced_accuracy": balanced("real_held_out_accuracy"),
            "chance": 1.0 / len(values), "per_value": per_value,
            "conditional_gaussian_accuracy": float(np.mean([d["conditional_gaussian_accuracy"]
                                                            for d in per_value.values()])),
            # the same question asked of the decoded poems (character n-grams and line shape)
            "text": {"accuracy": float(np.mean([d["text_accuracy"] for d in per_value.values()])),
                     "accuracy_greedy": float(np.mean([d["text_accuracy_greedy"] for d in per_value.values()])),
                     "real_held_out_accuracy": real_text_acc,
                     "real_held_out_balanced_accuracy": balanced("real_held_out_text_accuracy")}}
        if fpred is not None:  # ... and of the poems spelt freely
            for key in ("free", "free_greedy"):
                report["adherence"][label]["text"][f"accuracy_{key}"] = float(np.mean([d[f"text_accuracy_{key}"]
                                                                                      for d in per_value.values()]))

    # ---- MAUVE over MiniLM sentence features
    report["mauve"] = None
    if cfg.mauve:
        from trainer.models.text_encoders import PromptEncoderConfig, build_prompt_encoder

        enc = build_prompt_encoder(PromptEncoderConfig(max_length=128))
        f = (lambda texts: np.concatenate([enc(texts[i:i + 64])[2].numpy() for i in range(0, len(texts), 64)]))
        held_f = f(held_txt[:max(n_gen, 2)])
        score = M.mauve_score(f(gen_txt), held_f, seed=cfg.seed)
        report["mauve"] = score if score is not None else "mauve-text is not importable here"
        report["mauve_gaussian_draws"] = M.mauve_score(f(gauss_txt), held_f, seed=cfg.seed)
        if free_txt is not None:
            report["mauve_free"] = M.mauve_score(f(free_txt), held_f, seed=cfg.seed)
        if gen_greedy is not gen_txt:
            report["mauve_greedy"] = M.mauve_score(f(gen_greedy), held_f, seed=cfg.seed)

    os.makedirs(cfg.out_dir, exist_ok=True)
    report["panel_png"] = plot_panel(report, os.path.join(cfg.out_dir, "generation_panel.png"))
    tmp = os.path.join(cfg.out_dir, "report.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(cfg.out_dir, "report.json"))
    log.info(summary_line(report))
    print(summary_line(report))
    return report


def denoiser_vs_linear(pipe, gauss: M.GaussianLatents, held_latents: np.ndarray, prompts: list[str],
                       sigmas=(0.2, 0.4, 0.8, 1.5), seed: int = 0) -> dict:
    """Per noise level: mean squared error (diffusion space) of the pipeline's denoiser on noised
    held-out latents with their own prompts, beside the best linear denoiser's (the Wiener filter of
    the training latents' Gaussian: the exact posterior mean if latents were Gaussian) and the noisy
    input's. A denoiser no better than the linear one knows only the latents' mean and covariance,
    and samples from it are draws from that Gaussian."""
    import torch

    x0 = gauss.norm(held_latents)
    prompt = pipe.encode_prompts(list(prompts))
    gen = torch.Generator().manual_seed(seed)
    mse = (lambda a: float((a.float() - x0).pow(2).mean()))
    out = {}
    with torch.no_grad():
        for s in sigmas:
            xn = x0 + s * torch.randn(x0.shape, generator=gen)
            d = pipe.net(xn.to(pipe.device), torch.tensor(float(s)), prompt).sample.cpu()
            out[str(s)] = {"denoiser": mse(d), "linear": mse(gauss.wiener(xn, s)), "noisy": mse(xn)}
    return out


def _real(v: dict):
    """The real held-out poems' accuracy with the values weighed alike, as the samples' is (older reports:
    weighed by the values' shares)."""
    b = v.get("real_held_out_balanced_accuracy")
    return b if b is not None else v.get("real_held_out_accuracy")


def summary_line(r: dict) -> str:
    fr = r["frechet"]
    def adherence(k, v):
        parts = [f"text {v['text']['accuracy']:.2f}"] if "text" in v else []
        if (r.get("decode_meter_readings") or 1) > 1 and "accuracy_greedy" in v.get("text", {}):
            parts.append(f"greedy reading {v['text']['accuracy_greedy']:.2f}")
        if "accuracy_free" in v.get("text", {}):
            parts.append(f"spelt freely {v['text']['accuracy_free']:.2f}")
        if "conditional_gaussian_accuracy" in v:
            parts.append(f"label-conditional Gaussian {v['conditional_gaussian_accuracy']:.2f}")
        real = [x for x in (_real(v), _real(v.get("text", {}))) if x is not None]
        if real:
            parts.append("real held-out " + " / ".join(f"{x:.2f}" for x in real))
        return f"{k} {v['accuracy']:.2f}" + (f" ({', '.join(parts)})" if parts else "")

    adh = ", ".join(adherence(k, v) for k, v in r["adherence"].items() if "accuracy" in v) or "n/a"
    mv = r["mauve"] if isinstance(r["mauve"], (float, type(None))) else "n/a"
    lin = (r.get("denoiser_vs_linear") or {}).get("0.8")
    lin_s = f"; denoiser ÷ linear MSE at sigma 0.8 {lin['denoiser'] / max(lin['linear'], 1e-12):.2f}" if lin else ""
    free = r["word_validity"].get("generated_free")
    free_s = f" (lexicon; spelling freely {free:.2f})" if free is not None else ""
    return (f"Fréchet {fr['generated_vs_real']:.3f} (real-vs-real {fr['real_vs_real']:.3f}); "
            f"distinct-2 {r['distinct']['distinct_2']['generated']:.2f} (real {r['distinct']['distinct_2']['real']:.2f}); "
            f"4-gram memorisation {r['memorisation_4gram']['generated']:.2f} (held-out {r['memorisation_4gram']['held_out']:.2f}); "
            f"word validity {r['word_validity']['generated']:.2f}{free_s}; adherence {adh}; MAUVE {mv}{lin_s}")


def plot_panel(r: dict, png: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 7))
    lin = r.get("denoiser_vs_linear") or {}
    if lin:
        sig = [float(k) for k in lin]
        for key, style in (("noisy", "k:"), ("linear", "s--"), ("denoiser", "o-")):
            ax[0, 2].plot(sig, [v[key] for v in lin.values()], style, label=key)
        ax[0, 2].set_xscale("log")
        ax[0, 2].set_yscale("log")
        ax[0, 2].set_xlabel("sigma")
        ax[0, 2].legend()
    ax[0, 2].set_title("denoiser MSE vs the best linear one")
    wv = r["word_validity"]
    if "gaussian_draws" in wv:
        bars = [("samples", wv["generated"], r["mauve"]),
                ("Gaussian draws", wv["gaussian_draws"], r.get("mauve_gaussian_draws"))]
        if "generated_free" in wv:
            bars.insert(1, ("samples, free spelling", wv["generated_free"], r.get("mauve_free")))
        xs, w = np.arange(2), 0.8 / len(bars)
        for j, (name, valid, mv) in enumerate(bars):
            ax[1, 2].bar(xs + (j - (len(bars) - 1) / 2) * w, [valid, mv if isinstance(mv, float) else 0.0], w, label=name)
        ax[1, 2].set_xticks(xs, ["word validity", "MAUVE"])
        ax[1, 2].set_ylim(0, 1.3)   # room above the bars for the legend
        ax[1, 2].set_yticks(np.linspace(0, 1, 6))
        ax[1, 2].legend(fontsize=7, loc="upper center", ncol=3)
    ax[1, 2].set_title("samples vs draws from the latents' Gaussian" + (" (lexicon)" if r.get("decode_lexicon") else ""))
    fr = r["frechet"]
    ax[0, 0].bar(["generated vs real", "real vs real"], [fr["generated_vs_real"], fr["real_vs_real"]],
                 color=["tab:blue", "tab:gray"])
    ax[0, 0].set_title(f"Fréchet distance (PCA-{fr['pca_dims']} latents)")
    ns = [1, 2, 3, 4]
    ax[0, 1].plot(ns, [r["distinct"][f"distinct_{n}"]["generated"] for n in ns], "o-", label="generated")
    ax[0, 1].plot(ns, [r["distinct"][f"distinct_{n}"]["real"] for n in ns], "s--", label="held-out")
    ax[0, 1].set_xticks(ns)
    ax[0, 1].set_ylim(0, 1.05)
    ax[0, 1].set_title("distinct-n")
    ax[0, 1].legend()
    names = ["4-gram memorisation", "word validity"]
    g = [r["memorisation_4gram"]["generated"], r["word_validity"]["generated"]]
    h = [r["memorisation_4gram"]["held_out"], r["word_validity"]["held_out"]]
    xs = np.arange(2)
    ax[1, 0].bar(xs - 0.2, g, 0.4, label="generated")
    ax[1, 0].bar(xs + 0.2, h, 0.4, label="held-out", color="tab:gray")
    ax[1, 0].set_xticks(xs, names)
    ax[1, 0].set_ylim(0, 1.05)
    ax[1, 0].legend()
    adh = {k: v for k, v in r["adherence"].items() if "accuracy" in v}
    if adh:
        xs = np.arange(len(adh))
        bars = [("generated (latent classifier)", lambda v: v["accuracy"], "tab:blue"),
                ("real held-out (latent, values alike)", lambda v: _real(v) or 0, "tab:gray"),
                ("label-conditional Gaussian (latent)", lambda v: v.get("conditional_gaussian_accuracy") or 0, "tab:purple"),
                ("generated (text classifier)", lambda v: v.get("text", {}).get("accuracy") or 0, "tab:green"),
                ("real held-out (text, values alike)", lambda v: _real(v.get("text", {})) or 0, "silver")]
        if (r.get("decode_meter_readings") or 1) > 1:   # the samples' text before they were read for the meter
            bars.insert(4, ("generated (text, greedy reading)", lambda v: v.get("text", {}).get("accuracy_greedy") or 0,
                            "yellowgreen"))
        w = 0.8 / len(bars)
        for b, (name, get, colour) in enumerate(bars):
            ax[1, 1].bar(xs + (b - (len(bars) - 1) / 2) * w, [get(v) for v in adh.values()], w, label=name, color=colour)
        for x, v in zip(xs, adh.values()):
            ax[1, 1].hlines(v["chance"], x - 0.4, x + 0.4, colors="k", linestyles=":")
        ax[1, 1].set_xticks(xs, list(adh))
        ax[1, 1].legend(fontsize=7, loc="upper center", ncol=2)
    ax[1, 1].set_ylim(0, 1.45)   # room above the bars for the legend
    ax[1, 1].set_yticks(np.linspace(0, 1, 6))
    ax[1, 1].set_title("prompt adherence (dotted: chance)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
