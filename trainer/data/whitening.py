"""Whitening of the flattened latents for `data.normalize: whiten` (trainer/data/loaders.py):

    x = W (z - mu),   z = W^-1 x + mu,   W = Cov^(-1/2) over the T*C numbers of a latent [T, C]

Whitened training latents have mean 0 and covariance I, so with sigma_data = 1 EDM's c_skip is
1 / (1 + sigma^2): a backbone whose output is zero at initialisation (the MoE DiT's adaLN-zero) makes
D(x; sigma) = x / (1 + sigma^2), the Wiener filter of these latents, i.e. the best linear denoiser; the
network only has to learn what lies beyond the latents' Gaussian.

Symmetric (ZCA) whitening, W = V diag(ev^-1/2) V^T, rather than PCA whitening (diag(ev^-1/2) V^T): of
all the matrices that whiten, it keeps each whitened number closest to the original one (Kessy, Lewin
and Strimmer 2018, "Optimal whitening and decorrelation"), so whitened slot t is still mostly slot t,
which the DiT's slot tokens and stage 1's dropped slots assume.

Eigenvalue floor: eigenvalues below `floor` x the largest are raised to it before taking the inverse
root. Without it a covariance fitted to fewer samples than T*C (a small corpus) has zero eigenvalues
and W is infinite, and directions that hold only the fp16 rounding of the stored latents would be
blown up to unit variance for the network to model as if they were structure. A floor, not shrinkage
(Cov + a I): shrinkage moves every eigenvalue, so the whitened covariance would be I nowhere; the floor
leaves every direction above it exactly at unit variance (below it the variance is ev / floor < 1).
1e-4 bounds W's condition number by 100.

The fit is saved as safetensors (WHITENING_FILE), never as JSON: two [T*C, T*C] float32 matrices.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from trainer.base.config import UserError

WHITENING_FILE = "whitening.safetensors"
DEFAULT_FLOOR = 1e-4


class Whitening:
    def __init__(self, mean: torch.Tensor, whiten: torch.Tensor, unwhiten: torch.Tensor, shape: tuple[int, ...]):
        self.shape = tuple(int(s) for s in shape)                   # (T, C)
        n = self.shape[0] * self.shape[1]
        if mean.shape != (n,) or whiten.shape != (n, n) or unwhiten.shape != (n, n):
            raise ValueError(f"whitening of latents {list(self.shape)}: expected mean [{n}] and matrices [{n}, {n}], "
                             f"got {list(mean.shape)}, {list(whiten.shape)}, {list(unwhiten.shape)}")
        self.mean, self.whiten, self.unwhiten = mean.float(), whiten.float(), unwhiten.float()
        self.floored: Optional[int] = None      # directions raised to the floor (known after `fit`)

    @classmethod
    def fit(cls, latents: torch.Tensor, floor: float = DEFAULT_FLOOR) -> "Whitening":
        """latents [N, T, C] (the encoder's, raw) -> the whitening of their flattened mean and covariance."""
        x = torch.as_tensor(latents).reshape(len(latents), -1).double()
        if len(x) < 2:
            raise ValueError(f"whitening: needs at least 2 latents, got {len(x)}")
        mean = x.mean(0)
        ev, vecs = torch.linalg.eigh(torch.cov((x - mean).T))
        top = float(ev.max())
        if not top > 0:
            raise ValueError("whitening: the latents do not vary (their covariance is zero)")
        floored = int((ev < floor * top).sum())
        ev = ev.clamp(min=floor * top)
        out = cls(mean, (vecs * ev.rsqrt()) @ vecs.T, (vecs * ev.sqrt()) @ vecs.T, tuple(latents.shape[1:]))
        out.floored = floored
        return out

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z [..., T, C] -> x = W (z - mu), [..., T, C]."""
        flat = z.reshape(*z.shape[:-2], -1) - self.mean.to(z)
        return (flat @ self.whiten.to(z).T).reshape(z.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, C] -> z = W^-1 x + mu."""
        flat = x.reshape(*x.shape[:-2], -1)
        return (flat @ self.unwhiten.to(x).T + self.mean.to(x)).reshape(x.shape)

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "whiten": self.whiten, "unwhiten": self.unwhiten,
                "shape": torch.tensor(self.shape, dtype=torch.long)}

    @classmethod
    def from_state(cls, state: dict) -> "Whitening":
        return cls(state["mean"], state["whiten"], state["unwhiten"], tuple(int(s) for s in state["shape"]))

    def save(self, path: str) -> None:
        """To `path` (a temporary name first, then renamed: a reader never sees half a file)."""
        from safetensors.torch import save_file

        tmp = f"{path}.tmp.{os.getpid()}"
        save_file({k: v.contiguous() for k, v in self.state().items()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "Whitening":
        from safetensors.torch import load_file

        if not os.path.isfile(path):
            raise UserError(f"{path}: missing (the whitening of data.normalize=whiten)")
        try:
            return cls.from_state(load_file(path))
        except Exception as e:  # safetensors raises its own types for damaged files; a missing key is KeyError
            raise UserError(f"{path}: not a whitening file ({type(e).__name__}: {e})") from None

    @classmethod
    def find(cls, folder: str) -> Optional["Whitening"]:
        """The whitening saved in `folder`, or None."""
        path = os.path.join(folder, WHITENING_FILE)
        return cls.load(path) if os.path.isfile(path) else None
