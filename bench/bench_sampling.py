"""Sampling at equal quality: for each of the project's samplers, the steps it needs to reach the same
latent Fréchet distance to held-out latents, and the wall time of a sampling run at that many steps.

One tiny MoE DiT is trained here (EDM loss) on synthetic latent shards (trainer/data/synthetic.py,
with a planted prompt effect, so the latents depend on their prompts). All samplers then run on that
one network, as `latentverse generate --sampler` runs them on a pipeline's: Heun (EDM, deterministic),
Heun with churn 40 (the demo's), and DDPM's ancestral sampler (diffusers' DDPMScheduler through the
pipeline's EDM-as-epsilon adapter). Each sampler is swept over step counts on the held-out prompts with
the same noise, and the Fréchet distance (trainer.evaluation.generation.frechet: PCA features fitted on
training latents) of its samples to the held-out latents is computed at each count.

The common target is the worst of the samplers' best distances plus 5%: a quality every sampler
reaches. For each sampler, the fewest steps in its sweep from which on it stays within the target (a
lucky dip at few steps does not count); those step counts are then timed side by side (interleaved
runs, median), and the rows are the ratios of the times.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

CMD = "python -m bench sampling"
TOL = 1.05
N_TRAIN, N_HELD = 2000, 250
SHAPE = (4, 32)                  # latent tokens x dims (the project's are 32 x 64: smaller keeps this quick)
PCA = 16
SWEEPS = {"heun": [3, 4, 6, 8, 12, 18, 25, 35],
          "heun churn 40": [3, 4, 6, 8, 12, 18, 25, 35],
          "ddpm": [5, 10, 20, 50, 100, 200, 500]}   # 1000 steps left out to keep the run short
REPS = 2                         # interleaved timed runs at the step counts found


def _load(path: str) -> dict:
    from trainer.data.mds import LocalMDS

    ds = LocalMDS(path)
    rows = [ds[i] for i in range(len(ds))]
    emb = torch.tensor(np.stack([r["prompt_emb"] for r in rows]), dtype=torch.float32)
    k = torch.tensor([int(r["prompt_len"]) for r in rows])
    from trainer.models.denoisers.interface import Prompt
    return {"latent": torch.tensor(np.stack([r["latent"] for r in rows]), dtype=torch.float32),
            "prompt": Prompt(emb, torch.arange(emb.shape[1]) < k[:, None],
                             torch.tensor(np.stack([r["prompt_pooled"] for r in rows]), dtype=torch.float32))}


def _train(train: dict, sigma_data: float, steps: int = 800, batch: int = 64):
    from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
    from trainer.models.denoisers import DenoiserConfig, MoEDiTConfig, build_denoiser
    from trainer.models.denoisers.interface import Prompt

    torch.manual_seed(0)
    T, C = train["latent"].shape[1:]
    cfg = DenoiserConfig(latent_tokens=T, latent_dim=C, prompt_dim=train["prompt"].emb.shape[-1],
                         moe_dit=MoEDiTConfig(dim=64, depth=2, head_dim=32, patch_mixer_depth=1, num_experts=4))
    net = EDMPrecond(build_denoiser(cfg), sigma_data=sigma_data).train()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    loss_fn = EDMLoss(EDMConfig(sigma_data=sigma_data))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        i = torch.randint(0, len(train["latent"]), (batch,), generator=g)
        p = train["prompt"]
        prompt = Prompt(p.emb[i], p.mask[i], p.pooled[i])
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net, train["latent"][i], prompt, generator=g).loss
        loss.backward()
        opt.step()
        sched.step()
    print(f"  trained a {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M-parameter MoE DiT for {steps} "
          f"steps in {time.perf_counter() - t0:.0f} s (last loss {float(loss.detach()):.3f})", flush=True)
    return net.eval()


def _sampler(net, name: str, steps: int, noise: torch.Tensor, prompt, seed: int = 1):
    """A function drawing the samples of `name` at `steps` steps (same noise every call)."""
    from torch import nn

    from trainer.diffusion.ddpm import DDPM, DDPMConfig
    from trainer.diffusion.sampler import SamplerConfig, edm_sampler
    from trainer.pipeline.pipeline import _EDMAsEpsilon

    if name == "ddpm":
        ddpm = DDPM(nn.Identity(), DDPMConfig(num_inference_steps=steps))
        ddpm.backbone = _EDMAsEpsilon(net, ddpm.scheduler.alphas_cumprod, ddpm.cfg.num_train_timesteps)
        return lambda: ddpm.sample(noise, prompt, generator=torch.Generator().manual_seed(seed))
    cfg = SamplerConfig(num_steps=steps, S_churn=40.0 if "churn" in name else 0.0)
    return lambda: edm_sampler(net, noise, prompt, cfg, generator=torch.Generator().manual_seed(seed))


def calls(name: str, steps: int) -> int:
    return steps if name == "ddpm" else 2 * steps - 1


def main() -> list[dict]:
    from trainer.data.synthetic import write_latent_shards
    from trainer.evaluation.metrics import PCAFeatures, frechet_distance

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_latent_shards(os.path.join(tmp, "latents"), n_train=N_TRAIN, n_val=N_HELD, tokens=SHAPE[0],
                                    dim=SHAPE[1], prompt_effect=1.0)
        train, held = _load(paths["train"]), _load(paths["val"])
    mean = train["latent"].mean((0, 1))
    sigma_data = float(train["latent"].std())
    train["latent"], held["latent"] = train["latent"] - mean, held["latent"] - mean
    net = _train(train, sigma_data)
    # trainer.evaluation.generation.frechet's features and distance, the PCA fitted once
    features = PCAFeatures(train["latent"].numpy(), PCA)
    real = features(held["latent"].numpy())
    noise = torch.randn(held["latent"].shape, generator=torch.Generator().manual_seed(0))
    fd = {}
    with torch.no_grad():
        for name, sweep in SWEEPS.items():
            for n in sweep:
                t = time.perf_counter()
                x = _sampler(net, name, n, noise, held["prompt"])()
                fd[name, n] = frechet_distance(features(x.float().numpy()), real)
                print(f"  {name:>13} {n:5d} steps ({calls(name, n):5d} calls): Fréchet {fd[name, n]:.4f} "
                      f"({time.perf_counter() - t:.1f} s)", flush=True)
        best = {name: min(fd[name, n] for n in sweep) for name, sweep in SWEEPS.items()}
        target = TOL * max(best.values())
        need = {name: min(n for n in sweep if all(fd[name, m] <= target for m in sweep if m >= n))
                for name, sweep in SWEEPS.items()}
        runs = {name: _sampler(net, name, need[name], noise, held["prompt"]) for name in SWEEPS}
        times = {name: [] for name in SWEEPS}
        for _ in range(REPS):
            for name, run in runs.items():
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
    t = {name: statistics.median(v) for name, v in times.items()}
    for name in SWEEPS:
        print(f"  {name}: best Fréchet {best[name]:.4f}; reaches the target {target:.4f} at {need[name]} steps "
              f"({calls(name, need[name])} calls): {t[name]:.2f} s for {N_HELD} samples")
    # at the sweep's first count the sampler may need fewer steps than the sweep tried: say so
    desc = (lambda name: f"{name} {'≤ ' if need[name] == SWEEPS[name][0] else ''}{need[name]} steps {t[name]:.1f} s")
    bests = ", ".join(f"{name} {v:.3f}" for name, v in best.items())
    rows = [{"benchmark": f"sampling time at equal latent Fréchet distance ({N_HELD} samples of a tiny DiT; target "
                          f"{target:.3f} = the worst sampler's best +5%; bests: {bests}), DDPM ÷ Heun: "
                          f"{desc('ddpm')}, {desc('heun')}",
             "ratio": t["ddpm"] / t["heun"], "goal": "reported"},
            {"benchmark": f"the same, Heun with churn 40 ÷ Heun: {desc('heun churn 40')}",
             "ratio": t["heun churn 40"] / t["heun"], "goal": "reported"}]
    for r in rows:
        r["command"] = CMD
    return rows


if __name__ == "__main__":
    for r in main():
        print(r)
