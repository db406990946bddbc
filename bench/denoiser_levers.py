"""The denoiser's levers side by side (issue #28; the lab notebook is docs/experiments.md).

    python -m bench.denoiser_levers --latents out/demo/latents --autoencoder out/demo/autoencoder_adapted/autoencoder \
        --out out/levers --levers base,standardize,two_slots [--scale 1.0] [--parallel 2]

Each lever is the demo's two diffusion stages (yamls/diffusion/*_tiny_cpu.yaml, the demo's budgets in
batches, times `--scale` for a screen) with its overrides, then the generation evaluation on the
validation split (seed 1, no MAUVE), so nothing is chosen on the test split. `--parallel N` runs N
levers at once with one thread each. Every run skips what it finished earlier (the jobs' own rule), so
an interrupted sweep continues. Writes OUT/levers.md (the goal's figures per lever) and OUT/levers.png
(the EMA denoiser's error ÷ the best linear denoiser's at sigma 0.4 and 0.8 over the batches of both
stages: eval/EMAvsLinear_* of the diffusion job's metrics.jsonl).

`--frechet own,1,2` re-measures only the evaluation's Fréchet ratio of each lever's pipeline, at the
pipeline's own guidance scale (`own`: the figure its evaluation reports, the same samples) and at the
scales given, beside as many draws from the training latents' Gaussian: the samples without decoding
them, minutes per lever instead of the evaluation's ~20. Writes OUT/frechet.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN, FINETUNE = "yamls/diffusion/pretrain_masked_tiny_cpu.yaml", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml"
BUDGET = (6500, 2800)                 # the demo's batches per stage
EVAL_EVERY = (500, 400)

# name: (overrides of both stages, of stage 1 only, of stage 2 only, what it changes)
LEVERS = {
    "base": ([], [], [], "the demo's settings"),
    "standardize": (["data.normalize=standardize"], [], [], "per-channel normalisation of the latents"),
    "whiten": (["data.normalize=whiten"], [], [],
               "latents whitened with their covariance: the DiT starts as the best linear denoiser"),
    "two_slots": (["model.moe_dit.slots_per_token=2"], [], [], "two latent slots per DiT token"),
    "lr_2x": ([], ["optim.lr=2.0e-3"], ["optim.lr=1.0e-3"], "twice the learning rates"),
    "wide": (["model.moe_dit.dim=192", "model.moe_dit.head_dim=32"], [], [], "width 192 instead of 128"),
    "deep": (["model.moe_dit.depth=6"], [], [], "6 blocks instead of 4"),
    "ema_short": (["ema.decay=0.998"], [], [], "EMA horizon 500 steps instead of 1,000"),
    "batch_64": (["batch_size=64"], [], [], "batches of 64 (same number of batches: twice the samples)"),
    "p_mean_low": (["loss.P_mean=-1.0"], [], [], "training noise ln sigma ~ N(-1.0, 1.2^2): more weight at low sigma"),
    "unmasked": ([], ["mask_ratio=0.0"], [], "no masking in stage 1 (each stage-1 batch costs more)"),
}


def commands(lever: str, latents: str, autoencoder: str, out: str, scale: float, threads: int,
             extra: tuple[str, ...] = ()) -> list[list[str]]:
    both, one, two, _ = LEVERS[lever]
    b1, b2 = (max(1, round(b * scale)) for b in BUDGET)
    e1, e2 = (max(1, round(e * scale)) for e in EVAL_EVERY)
    common = [f"data.root={latents}/train", f"data.eval_path={latents}/val", f"autoencoder={autoencoder}",
              f"threads={threads}", "sample_every=0", "tensorboard=false", *extra, *both]
    o = os.path.join(out, lever)
    return [["train", PRETRAIN, f"out_dir={o}/pretrain", f"max_duration={b1}ba", f"eval_interval={e1}ba", *common, *one],
            ["train", FINETUNE, f"out_dir={o}/finetune", f"max_duration={b2}ba", f"eval_interval={e2}ba",
             f"load_path={o}/pretrain/checkpoints/latest-rank0.pt", *common, *two],
            ["evaluate", "yamls/eval/generation.yaml", f"out_dir={o}/eval", f"pipeline={o}/finetune/pipeline",
             f"latent_data={latents}", "held_out_split=val", "seed=1", "mauve=false", "n_linear_check=512"]]


def run_lever(lever: str, args) -> subprocess.Popen:
    """The lever's three commands one after another in one shell, logged to OUT/<lever>.log."""
    cli = f"{sys.executable} -m launch.cli"
    steps = " && ".join(f"{cli} " + " ".join(f"'{a}'" for a in c)
                        for c in commands(lever, args.latents, args.autoencoder, args.out, args.scale, args.threads,
                                          tuple(args.set)))
    log = open(os.path.join(args.out, f"{lever}.log"), "a")
    return subprocess.Popen(["bash", "-c", steps], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _rows(out: str, lever: str, stage: str) -> list[dict]:
    path = os.path.join(out, lever, stage, "metrics.jsonl")
    return [json.loads(x) for x in open(path)] if os.path.isfile(path) else []


def _last_batch(rows: list[dict]) -> int:
    return max([r["batch"] for r in rows if "train/loss" in r] or [0])


def curve(out: str, lever: str) -> list[tuple[int, float, float]]:
    """(batch over both stages, ratio at 0.4, at 0.8) of the lever's evaluations."""
    pts, offset = [], 0
    for stage in ("pretrain", "finetune"):
        rows = _rows(out, lever, stage)
        for r in rows:
            if "eval/EMAvsLinear_0.4" in r:
                pts.append((offset + r["batch"], r["eval/EMAvsLinear_0.4"], r["eval/EMAvsLinear_0.8"]))
        offset += _last_batch(rows)
    return pts


def figures(out: str, lever: str) -> dict:
    path = os.path.join(out, lever, "eval", "report.json")
    if not os.path.isfile(path):
        return {}
    r = json.load(open(path))
    lin = r["denoiser_vs_linear"]
    ratio = (lambda s: lin[s]["denoiser"] / lin[s]["linear"])
    meter, form = r["adherence"]["meter"]["text"], r["adherence"]["form"]["text"]
    return {"mse_0.4": ratio("0.4"), "mse_0.8": ratio("0.8"), "validity_free": r["word_validity"].get("generated_free"),
            "meter_greedy": meter.get("accuracy_greedy", meter["accuracy"]), "form_text": form["accuracy"],
            "frechet": r["frechet"]["ratio"], "memo": r["memorisation_4gram"]["generated"],
            "memo_held": r["memorisation_4gram"]["held_out"]}


def trained(out: str, lever: str) -> int:
    """Batches the lever trained over both stages (its metrics.jsonl): the budget's sum when it finished."""
    return sum(_last_batch(_rows(out, lever, stage)) for stage in ("pretrain", "finetune"))


def write_table(out: str, levers: list[str], scale: float) -> str:
    fmt = (lambda v: "" if v is None else f"{v:.2f}")
    lines = [f"Validation split, seed 1; budgets x{scale:g} of the demo's {BUDGET[0]} + {BUDGET[1]} batches.", "",
             "| lever | what | MSE ÷ linear σ 0.4 | σ 0.8 | word validity (free) | meter, text (greedy) | form, text "
             "| Fréchet ratio | 4-gram memorisation (held-out) | batches trained |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for lv in levers:
        f = figures(out, lv)
        lines.append(f"| {lv} | {LEVERS[lv][3]} | {fmt(f.get('mse_0.4'))} | {fmt(f.get('mse_0.8'))} | "
                     f"{fmt(f.get('validity_free'))} | {fmt(f.get('meter_greedy'))} | {fmt(f.get('form_text'))} | "
                     f"{fmt(f.get('frechet'))} | {fmt(f.get('memo'))} ({fmt(f.get('memo_held'))}) | {trained(out, lv)} |")
    lines += ["", "Goal (issue #28): ≤ 0.8 at both σ; validity ≥ 0.85; meter ≥ 0.6; Fréchet ≤ 1.5; "
                  "memorisation no higher than held-out's."]
    path = os.path.join(out, "levers.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def draw(out: str, levers: list[str]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for k, (ax, sigma) in enumerate(zip(axes, ("0.4", "0.8"))):
        for j, lv in enumerate(levers):
            pts = curve(out, lv)
            if pts:     # tab20: more levers than the default cycle's 10 colours
                ax.plot([p[0] for p in pts], [p[1 + k] for p in pts], "o-", ms=3, label=lv, color=plt.cm.tab20(j % 20))
        ax.axhline(1.0, color="k", lw=0.8, ls=":")
        ax.axhline(0.8, color="g", lw=0.8, ls="--")
        ax.set_xlabel("batch (stage 1, then stage 2)"), ax.set_title(f"EMA denoiser ÷ best linear, MSE at sigma {sigma}")
    axes[0].set_ylabel("ratio (1 = the latents' Gaussian; goal 0.8)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "levers.png")
    fig.savefig(path + ".tmp.png", dpi=90)
    os.replace(path + ".tmp.png", path)
    return path


def eval_config(lever: str, latents: str, out: str, overrides: tuple[str, ...] = ()):
    """The generation evaluation's config of the lever's pipeline, as its third command runs it, with
    `overrides` after its own (e.g. held_out_split=test)."""
    from launch.cli import load_config, load_job_module

    _, yaml, *own = commands(lever, latents, "", out, 1.0, 1)[2]
    return load_config(load_job_module("evaluate"), os.path.join(ROOT, yaml), [*own, *overrides])


def frechet_over_guidance(cfg, guidances: list) -> dict:
    """The evaluation's Fréchet ratio (trainer/evaluation/generation.py `frechet`) of the pipeline's samples
    for the evaluation's prompts, seed and sampler, at each guidance scale (None: the pipeline's own, whose
    figure is the evaluation's), and of as many draws from the training latents' Gaussian: {label: ratio}."""
    import dataclasses

    from trainer.evaluation import generation as G
    from trainer.evaluation.metrics import GaussianLatents, most_common
    from trainer.evaluation.samples import Sampling, read_latent_split, sample
    from trainer.pipeline.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(cfg.pipeline)
    train = read_latent_split(cfg.latent_data, cfg.train_split, cfg.max_train)
    held = read_latent_split(cfg.latent_data, cfg.held_out_split, cfg.n_real)
    prompts = most_common(held["prompt"], cfg.n_prompts) or [""]
    ratio = (lambda latents: G.frechet(train["latent"], held["latent"], latents, cfg.pca_dims)["ratio"])
    sampling, out = Sampling.of(cfg), {}
    for g in guidances:
        scale = g if g is not None else cfg.guidance if cfg.guidance is not None else pipe.cfg.sampler.guidance_scale
        x, latents = sample(pipe, prompts, dataclasses.replace(sampling, guidance=scale))
        out[f"{scale:g}" + (" (own)" if g is None else "")] = ratio(latents)
    gauss = GaussianLatents(train["latent"], pipe.normalizer).sample(len(x), cfg.seed)
    out["Gaussian draws"] = ratio(pipe.to_latents(gauss).cpu().numpy())
    return out


def write_frechet(out: str, latents: str, levers: list[str], guidances: list, overrides: tuple[str, ...] = ()) -> str:
    """OUT/frechet.md: per lever with a pipeline, the Fréchet ratio at each guidance scale."""
    given = f" with {' '.join(overrides)}" if overrides else ""
    lines = [f"The levers' evaluation (validation split, seed 1){given}: its samples (prompts, sampler, seed), not decoded.",
             "", "| lever | guidance | Fréchet ratio |", "|---|---|---|"]
    for lv in levers:
        if not os.path.isdir(os.path.join(out, lv, "finetune", "pipeline")):
            print(f"{lv}: no pipeline yet ({out}/{lv}/finetune/pipeline)", flush=True)
            continue
        cfg = eval_config(lv, latents, out, overrides)
        t0 = time.time()
        for label, r in frechet_over_guidance(cfg, guidances).items():
            lines.append(f"| {lv} | {label} | {r:.2f} |")
        print(f"{lv}: {time.time() - t0:.0f} s; " + "; ".join(lines[-len(guidances) - 1:]), flush=True)
    lines += ["", "Goal (issue #28): Fréchet ratio ≤ 1.5."]
    path = os.path.join(out, "frechet.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.denoiser_levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", help="the encode job's out_dir (train/, val/, test/); not with --report")
    p.add_argument("--autoencoder", help="the (adapted) autoencoder the pipeline decodes with; not with --report")
    p.add_argument("--out", required=True)
    p.add_argument("--levers", default="base", help=f"comma-separated, of: {', '.join(LEVERS)}")
    p.add_argument("--scale", type=float, default=1.0, help="budget factor (1 = the demo's batches)")
    p.add_argument("--parallel", type=int, default=1, help="levers at once")
    p.add_argument("--threads", type=int, default=0, help="threads per run (0: 2 // parallel, at least 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for both training stages of every lever (e.g. precision=fp32 on a GPU)")
    p.add_argument("--report", action="store_true", help="only write the table and curves of what OUT holds now")
    p.add_argument("--frechet", metavar="own,1,2", help="only the Fréchet ratio of each lever's pipeline at these "
                   "guidance scales (own: the pipeline's); needs --latents")
    p.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                   help="with --frechet: an override of the evaluation's config (e.g. held_out_split=test seed=0)")
    args = p.parse_args(argv)
    levers = [x for x in args.levers.split(",") if x]
    bad = [x for x in levers if x not in LEVERS]
    if bad:
        p.error(f"--levers: unknown {bad}; known: {', '.join(LEVERS)}")
    if args.frechet:
        try:
            guidances = [None if g == "own" else float(g) for g in args.frechet.split(",")]
        except ValueError:
            p.error(f"--frechet: expected own or numbers, comma-separated; got {args.frechet!r}")
        for key in ("latents", "out"):            # out: the sweep's folder, holding the levers' pipelines
            if not getattr(args, key) or not os.path.isdir(getattr(args, key)):
                p.error(f"--{key}: no such folder: {getattr(args, key)}")
        print(open(write_frechet(args.out, args.latents, levers, guidances, tuple(args.eval_set))).read())
        return
    if args.report:
        print(open(write_table(args.out, levers, args.scale)).read())
        print(f"curves: {draw(args.out, levers)}")
        return
    for key in ("latents", "autoencoder"):
        if not getattr(args, key) or not os.path.isdir(getattr(args, key)):
            p.error(f"--{key}: no such folder: {getattr(args, key)}")
    args.threads = args.threads or max(1, 2 // args.parallel)
    os.makedirs(args.out, exist_ok=True)
    t0, queue, running, failed = time.time(), list(levers), {}, []
    try:
        while queue or running:
            while queue and len(running) < args.parallel:
                lv = queue.pop(0)
                running[lv] = run_lever(lv, args)
                print(f"{lv}: started ({LEVERS[lv][3]}); log {args.out}/{lv}.log", flush=True)
            time.sleep(5)
            for lv, proc in list(running.items()):
                if proc.poll() is not None:
                    del running[lv]
                    if proc.returncode:
                        failed.append(lv)
                    done = len(levers) - len(queue) - len(running)
                    print(f"{lv}: {'FAILED (see its log)' if proc.returncode else 'done'} after {time.time() - t0:.0f} s; "
                          f"{done} of {len(levers)} levers", flush=True)
    except KeyboardInterrupt:     # stopped (Ctrl-C, a deadline): the table and curves of what ran so far
        for lv, proc in running.items():       # each lever is a session of its own: its jobs stop with it
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
        failed += [f"{lv} (stopped)" for lv in [*running, *queue]]
        print(f"stopped after {time.time() - t0:.0f} s: {sorted(running)} running, {queue} not started", flush=True)
    print(open(write_table(args.out, levers, args.scale)).read())
    print(f"curves: {draw(args.out, levers)}")
    if failed:
        sys.exit(f"levers that failed: {failed}")


if __name__ == "__main__":
    main()
