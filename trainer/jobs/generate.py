"""Generate poems from prompts with an exported pipeline directory.

    latentverse generate PIPELINE_DIR --prompt "sonnet about the sea" --num-samples 4 --steps 18 \\
        --guidance 5 --seed 0 [--churn 40] [--sampler heun|ddpm] [--show-steps K] [--lexicon auto|on|off] \\
        [--meter-readings N] [--out FILE.json]
    latentverse generate TOKEN_PIPELINE_DIR --prefix "The sea at night" --show-steps 10

--prefix (pipelines of latent_kind token_embeddings) continues a text: its token embeddings are
clamped into the first latent positions at every sampler step; the guidance defaults to the
pipeline's prefix_guidance (5).

--churn (the Heun sampler's S_churn; default: the pipeline's, 40 for the demo's) adds fresh noise
before every step whose noise level lies in the pipeline's [S_min, S_max] (Karras et al. 2022,
Algorithm 2); 0 samples deterministically.

--lexicon (default: the pipeline's decode.lexicon, which uses the autoencoder's lexicon when it has
one) spells only words of the training corpus; `off` shows what the decoder spells freely.

--meter-readings N (default: the pipeline's decode.meter_readings, 32): when a prompt names a meter
("stanza in iambic pentameter"), each latent is read N ways (the greedy reading and N - 1 sampled
ones) and the reading that scans best in that meter by the CMU dictionary's stresses is kept; 1 gives
the greedy reading only.

--show-steps K prints, and writes as an HTML page beside the pipeline (or --out), how the decoded
text changes from noise to poem at K points of the sampling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from trainer.base import uris
from trainer.base.log import get_logger
from trainer.base.config import UserError
from trainer.base.files import check_out_dir
from trainer.text.prosody import prompt_meter, scansion
from trainer.pipeline.pipeline import Pipeline, show_steps_html

log = get_logger("generate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("pipeline", help="an exported pipeline directory, or its URI (s3://bucket/path)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several); default: the empty prompt")
    p.add_argument("--num-samples", type=int, default=1, help="poems per prompt")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the pipeline's; ddpm: 1000)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--churn", type=float, default=None,
                   help="Heun sampler's stochastic churn S_churn (0 = deterministic; default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=["heun", "ddpm"], default="heun")
    p.add_argument("--show-steps", type=int, default=0, metavar="K",
                   help="show the decoded text at K points of the sampling (and write an HTML page)")
    p.add_argument("--prefix", default=None,
                   help="token_embeddings pipelines: continue this text (clamped into the first positions)")
    p.add_argument("--lexicon", choices=["auto", "on", "off"], default="auto",
                   help="spell only the training corpus's words (auto: the pipeline's decode.lexicon)")
    p.add_argument("--meter-readings", type=int, default=None, metavar="N",
                   help="prompts naming a meter: keep the best-scanning of N readings of each latent "
                        "(default: the pipeline's decode.meter_readings; 1 = greedy only)")
    p.add_argument("--out", default=None, help="also write the poems as JSON here")
    p.add_argument("--device", default="cpu")


def generate(pipeline_dir: str, prompts: list[str], num_samples: int = 1, steps=None, guidance=None, seed: int = 0,
             sampler: str = "heun", show_steps: int = 0, device: str = "cpu", prefix=None, lexicon=None,
             churn=None, meter_readings=None) -> dict:
    if num_samples < 1:
        raise UserError(f"--num-samples: must be >= 1, got {num_samples}")
    if show_steps and sampler != "heun":
        raise UserError("--show-steps: only with --sampler heun")
    if steps is not None and steps < 1:
        raise UserError(f"--steps: must be >= 1, got {steps}")
    if churn is not None and churn < 0:
        raise UserError(f"--churn: must be >= 0, got {churn}")
    if meter_readings is not None and meter_readings < 1:
        raise UserError(f"--meter-readings: must be >= 1, got {meter_readings}")
    pipe = Pipeline.from_pretrained(pipeline_dir, device=device)
    x, trace = pipe.sample_latents(prompts, num_samples, steps, guidance, seed, sampler, show_steps, prefix, churn)
    poems = pipe.decode(x, lexicon, [p for p in prompts for _ in range(num_samples)], meter_readings, seed)
    for t in trace:
        t["texts"] = pipe.decode(t.pop("x0"), lexicon)
    results = [{"prompt": prompts[i // num_samples], "sample": i % num_samples, "poem": p} for i, p in enumerate(poems)]
    for r in results:
        meter = prompt_meter(r["prompt"])
        if meter:   # how well the poem scans in the meter its prompt names
            r.update(meter=meter, scansion=round(scansion(r["poem"], meter), 3))
    return {"results": results, "trace": trace}


def main(args) -> int:
    prompts = args.prompt or [""]
    if uris.is_uri(args.pipeline):   # a pipeline in a bucket: loaded from its node-local copy
        args.pipeline = uris.local_copy(args.pipeline, "pipeline")
    if args.out:   # its folder checked before any work: a folder that is a file is refused in one line
        if os.path.isdir(args.out):
            raise UserError(f"--out: {args.out!r} is a folder; give a file name (e.g. {args.out}/poems.json)")
        check_out_dir(os.path.dirname(args.out) or ".", "--out", create=False)
    out = generate(args.pipeline, prompts, args.num_samples, args.steps, args.guidance, args.seed, args.sampler,
                   args.show_steps, args.device, args.prefix, {"auto": None, "on": True, "off": False}[args.lexicon],
                   args.churn, args.meter_readings)
    if out["trace"]:
        for b in range(len(out["results"])):
            print(f"=== prompt {out['results'][b]['prompt']!r}, sample {out['results'][b]['sample']}: steps")
            for t in out["trace"]:
                print(f"--- step {t['step']} (sigma {t['sigma']:.3f})\n{t['texts'][b]}")
        page = os.path.splitext(args.out)[0] + ".html" if args.out else os.path.join(args.pipeline, "show_steps.html")
        with open(page, "w", encoding="utf-8") as f:
            f.write(show_steps_html(prompts, args.num_samples, out["trace"], [r["poem"] for r in out["results"]]))
        print(f"(steps page: {page})")
    for r in out["results"]:
        scans = f" (scans {r['scansion']:.2f} in {r['meter']})" if "meter" in r else ""
        print(f"=== {r['prompt'] or '(no prompt)'} [{r['sample']}]{scans}\n{r['poem']}\n")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out["results"], f, indent=1, ensure_ascii=False)
    sys.stdout.flush()
    return 0
