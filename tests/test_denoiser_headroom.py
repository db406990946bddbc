"""bench/denoiser_headroom.py: the denoisers that need no training, scored against the best linear one on
real MDS latent shards. Where the latents are two clusters and the prompt says which, the mixture and the
prompt-aware linear denoiser must beat the Wiener filter by far; on Gaussian latents with an unrelated
prompt neither may."""
import numpy as np
import torch
from streaming import MDSWriter

from bench.denoiser_headroom import Mixture, PromptLinear, main
from trainer.diffusion.linear import LinearDenoiser

COLUMNS = {"latent": "ndarray:float16:4,3", "prompt_pooled": "ndarray:float16:5"}


def write_split(path: str, n: int, seed: int, clustered: bool) -> None:
    g = np.random.default_rng(seed)
    side = g.integers(0, 2, n) * 2 - 1                               # which cluster (+1 / -1)
    lat = 0.3 * g.standard_normal((n, 12))
    if clustered:
        lat[:, :4] += 2.0 * side[:, None]                            # two clusters far apart along 4 numbers
    prompts = 0.1 * g.standard_normal((n, 5))
    prompts[:, 0] += side if clustered else 0.0                      # the prompt names the cluster
    with MDSWriter(out=path, columns=COLUMNS) as w:
        for i in range(n):
            w.write({"latent": lat[i].reshape(4, 3).astype(np.float16), "prompt_pooled": prompts[i].astype(np.float16)})


def table_rows(path: str) -> dict[str, list[float]]:
    rows = {}
    for line in open(path).read().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1][:1].isdigit():
            rows[cells[0]] = [float(cells[1]), float(cells[2])]
    return rows


def test_clustered_latents_leave_room_below_the_linear_denoiser(tmp_path):
    for split, n, seed in (("train", 1500, 0), ("val", 300, 1)):
        write_split(str(tmp_path / split), n, seed, clustered=True)
    assert main(["--latents", str(tmp_path), "--mixtures", "2", "--out", str(tmp_path / "out")]) == 0
    rows = table_rows(str(tmp_path / "out" / "headroom.md"))
    assert rows["linear"] == [1.0, 1.0]
    # The clusters lie along one direction of variance 16 (4 numbers at +-2); every direction has 0.09
    # within a cluster. Knowing the cluster, the error per direction is 0.09 s^2 / (0.09 + s^2) in all 12;
    # the Wiener filter has 16 s^2 / (16 + s^2) along the clusters' direction instead.
    for i, s2 in enumerate((0.16, 0.64)):
        within, along = 0.09 * s2 / (0.09 + s2), 16 * s2 / (16 + s2)
        assert abs(rows["mixture 2"][i] - 12 * within / (11 * within + along)) < 0.04, rows
    # the prompt names the cluster (to within 0.1), so a denoiser linear in (latent, prompt) gains too
    assert rows["linear + prompt"][0] < 0.95 and rows["linear + prompt"][1] < 0.8, rows


def test_gaussian_latents_leave_none(tmp_path):
    for split, n, seed in (("train", 3000, 0), ("val", 600, 1)):
        write_split(str(tmp_path / split), n, seed, clustered=False)
    assert main(["--latents", str(tmp_path), "--mixtures", "4", "--out", str(tmp_path / "out")]) == 0
    rows = table_rows(str(tmp_path / "out" / "headroom.md"))
    for name in ("linear + prompt", "mixture 4"):
        assert all(0.97 < r < 1.03 for r in rows[name]), (name, rows)
    # the training set's own posterior mean memorises: on held-out latents it is worse than linear
    assert min(rows["training set"]) > 1.0, rows


def test_the_mixture_of_one_is_the_wiener_filter_and_the_prompt_posterior_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=g, dtype=torch.float64) @ torch.diag(torch.linspace(0.2, 2, 6, dtype=torch.float64))
    noisy = x[:50] + 0.5 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    lin = LinearDenoiser.fit(x)
    m = Mixture(x, 1)
    assert torch.allclose(m(noisy, 0.5), lin(noisy, 0.5), atol=1e-3)
    # with a prompt that is the latent itself, the posterior mean is the latent, whatever the noise
    p = PromptLinear(x, x.clone(), ridge=1e-9)
    assert torch.allclose(p(noisy, x[:50], 0.5), x[:50], atol=1e-3)
