"""How far below the best linear denoiser can a denoiser go on these latents? (issue #28)

    python -m bench.denoiser_headroom --latents out/demo/latents [--split val] [--n-held-out 2000] [--out DIR]

The goal of issue #28 asks the DiT for an error 0.8 times the best linear denoiser's at sigma 0.4 and 0.8.
This measures, on the held-out split, what denoisers that need no training reach against that same
reference, each fitted in seconds to the training latents (raw encoder space, as the diffusion job's
`center` normalisation; the same noise draw for all):

- `linear`: the Wiener filter of the training latents' Gaussian (trainer/diffusion/linear.py): 1 by definition;
- `linear + prompt`: the posterior mean when latent and pooled prompt embedding are jointly Gaussian,
  linear in (noisy latent, prompt): what a denoiser gains from the prompt without any nonlinearity;
- `mixture K`: K Gaussians (k-means centres, one shared within-cluster covariance), its exact posterior
  mean: a nonlinear denoiser that knows the latents' cluster structure;
- `training set`: the posterior mean when the latents are exactly the training latents (the ideal
  denoiser of the training set, which memorises): what a denoiser that fits its training data perfectly
  does on poems it has not seen.

Writes OUT/headroom.md (the table) when --out is given; prints it always.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from trainer.data.mds import LocalMDS
from trainer.diffusion.linear import LinearDenoiser
from trainer.jobs.train_diffusion import _read_spread

SIGMAS = (0.4, 0.8)


def read_split(path: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(flattened latents [N, T*C], pooled prompts [N, D]) of a latent-shard split, `limit` (0: all) spread
    over it, read as the diffusion job reads its fits' sample (_read_spread)."""
    pooled, latents = _read_spread([path], [limit or len(LocalMDS(path))])
    if isinstance(pooled, str):
        raise SystemExit(f"--latents: {pooled} holds no prompt embeddings")
    return latents.reshape(len(latents), -1).double(), pooled.double()


class PromptLinear:
    """E[x0 | x, p] when (x0, p) is Gaussian and x = x0 + sigma n: linear in (x, p)."""

    def __init__(self, x: torch.Tensor, p: torch.Tensor, ridge: float = 1e-4):
        self.mx, self.mp = x.mean(0), p.mean(0)
        z = torch.cat([x - self.mx, p - self.mp], 1)
        cov = z.T @ z / (len(z) - 1)
        self.d = x.shape[1]
        self.cov = cov + ridge * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)

    def __call__(self, x: torch.Tensor, p: torch.Tensor, sigma: float) -> torch.Tensor:
        d = self.d
        czz = self.cov.clone()
        czz[:d, :d] += sigma ** 2 * torch.eye(d, dtype=czz.dtype)
        cxz = self.cov[:d]                                  # Cov(x0, z) = [Sxx, Sxp]
        z = torch.cat([x - self.mx, p - self.mp], 1)
        return self.mx + torch.linalg.solve(czz, z.T).T @ cxz.T


def kmeans(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        for j in range(k):
            members = x[assign == j]
            centres[j] = members.mean(0) if len(members) else x[torch.randint(len(x), (1,), generator=g)][0]
    return centres


class Mixture:
    """K Gaussians N(mu_k, W) with weights pi_k (k-means centres, W the pooled within-cluster covariance):
    E[x0 | x] = sum_k P(k | x) (mu_k + W (W + sigma^2 I)^-1 (x - mu_k))."""

    def __init__(self, x: torch.Tensor, k: int):
        self.mu = kmeans(x, k)
        assign = torch.cdist(x, self.mu).argmin(1)
        self.logpi = torch.log(torch.bincount(assign, minlength=k).double().clamp(min=1) / len(x))
        r = x - self.mu[assign]
        self.ev, self.vecs = torch.linalg.eigh(r.T @ r / (len(x) - k))
        self.ev = self.ev.clamp(min=0)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        var = self.ev + sigma ** 2
        xr, mur = x @ self.vecs, self.mu @ self.vecs                        # in W's eigenbasis
        maha = ((xr ** 2 / var).sum(1, keepdim=True) - 2 * (xr / var) @ mur.T
                + (mur ** 2 / var).sum(1))                                 # [B, K] squared Mahalanobis
        post = torch.softmax(self.logpi - 0.5 * maha, 1)                   # P(k | x)
        shrink = self.ev / var
        mean_r = post @ mur                                                # sum_k P(k|x) mu_k
        return (mean_r + shrink * (xr - mean_r)) @ self.vecs.T


class TrainingSet:
    """The ideal denoiser when the data are exactly the training latents: a softmax over all of them."""

    def __init__(self, x: torch.Tensor):
        self.x, self.sq = x, (x ** 2).sum(1)

    def __call__(self, x: torch.Tensor, sigma: float, chunk: int = 256) -> torch.Tensor:
        out = []
        for c in x.split(chunk):
            d2 = (c ** 2).sum(1, keepdim=True) - 2 * c @ self.x.T + self.sq
            out.append(torch.softmax(-d2 / (2 * sigma ** 2), 1) @ self.x)
        return torch.cat(out)


def measure(latents: str, split: str, n_held_out: int, mixtures: tuple[int, ...], sigmas=SIGMAS,
            seed: int = 1) -> tuple[list[dict], int]:
    """(one row per denoiser: its error ÷ the linear one's per sigma, the number of held-out latents)."""
    t0 = time.time()
    x, p = read_split(os.path.join(latents, "train"))
    xv, pv = read_split(os.path.join(latents, split), n_held_out)
    print(f"read {len(x)} training and {len(xv)} {split} latents of {x.shape[1]} numbers ({time.time() - t0:.0f} s)",
          flush=True)
    lin = LinearDenoiser.fit(x)
    ev = lin.ev
    print(f"the training latents' covariance: trace {ev.sum().item():.1f}; "
          + ", ".join(f"{int((ev > s * s).sum())} directions of variance above sigma^2 = {s * s:.2f}" for s in sigmas),
          flush=True)
    plin = PromptLinear(x, p)
    fits = {"linear": lambda y, s: lin(y, s), "linear + prompt": lambda y, s: plin(y, pv, s)}
    for k in mixtures:
        t = time.time()
        m = Mixture(x, k)
        fits[f"mixture {k}"] = m
        print(f"mixture {k}: fitted in {time.time() - t:.0f} s", flush=True)
    fits["training set"] = TrainingSet(x)
    noisy = {s: xv + s * torch.randn(xv.shape, generator=torch.Generator().manual_seed(seed + int(s * 100)),
                                     dtype=xv.dtype) for s in sigmas}          # one draw per sigma, for all
    ref = {s: (lin(noisy[s], s) - xv).pow(2).mean().item() for s in sigmas}
    rows = []
    for name, f in fits.items():
        row = {"denoiser": name, **{s: (f(noisy[s], s) - xv).pow(2).mean().item() / ref[s] for s in sigmas}}
        rows.append(row)
        print(f"{name}: " + ", ".join(f"sigma {s}: {row[s]:.3f}" for s in sigmas), flush=True)
    return rows, len(xv)


def table(rows: list[dict], latents: str, split: str, n: int, sigmas=SIGMAS) -> str:
    lines = [f"Denoisers fitted to the training latents of `{latents}`, scored on {n} latents of its {split} split: "
             "error ÷ the best linear denoiser's (the same noise draw for all).", "",
             "| denoiser | " + " | ".join(f"σ {s:g}" for s in sigmas) + " |", "|---|" + "---|" * len(sigmas)]
    lines += [f"| {r['denoiser']} | " + " | ".join(f"{r[s]:.3f}" for s in sigmas) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latents", required=True, help="the encode job's out_dir (train/ and the held-out split)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n-held-out", type=int, default=2000)
    ap.add_argument("--mixtures", default="16,128", help="comma-separated numbers of mixture components")
    ap.add_argument("--sigmas", default="0.4,0.8", help="comma-separated noise levels (the goal's: 0.4,0.8)")
    ap.add_argument("--out", help="folder for headroom.md")
    a = ap.parse_args(argv)
    for sub in ("train", a.split):
        if not os.path.isfile(os.path.join(a.latents, sub, "index.json")):
            ap.error(f"--latents: {os.path.join(a.latents, sub)}: no latent shards (index.json missing)")
    mixtures = tuple(int(k) for k in a.mixtures.split(",") if k)
    sigmas = tuple(float(v) for v in a.sigmas.split(",") if v)
    rows, n = measure(a.latents, a.split, a.n_held_out, mixtures, sigmas)
    text = table(rows, a.latents, a.split, n, sigmas)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "headroom.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
