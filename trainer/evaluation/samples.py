"""What the generation evaluation reads and makes: latent shards read evenly over a split, and samples
of an exported pipeline with their poems as the pipeline reads them (for a prompt naming a meter, with
decode.meter_readings > 1, the best-scanning of several readings; beside them the greedy reading)."""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Optional

import numpy as np

from trainer.base.config import UserError
from trainer.base.schema import LABELS
from trainer.data.mds import LocalMDS
from trainer.text.prosody import prompt_meter

if TYPE_CHECKING:
    import torch


def read_latent_split(root: str, split: str, limit: int) -> dict:
    """{latent [N, T, C] float32, text, prompt, <labels>} of `limit` samples of a split, evenly spaced
    over it (a split the encode job partitioned holds its partitions one after another)."""
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


def check_enough(train: dict, held: dict) -> None:
    if len(held["text"]) < 4 or len(train["text"]) < 4:
        raise UserError(f"latent_data: too few samples ({len(train['text'])} train, {len(held['text'])} held-out)")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the samples are drawn and read; None takes the pipeline's own setting. No defaults here: the
    evaluation job's config holds them (`Sampling.of(cfg)`)."""
    samples_per_prompt: int
    steps: Optional[int]
    guidance: Optional[float]
    churn: Optional[float]          # the Heun sampler's S_churn
    sampler: str                    # heun | ddpm
    meter_readings: Optional[int]   # readings per latent for a prompt naming a meter
    seed: int
    temperature: Optional[float]    # a token LM's sampling (None = its own, poem_lm.json)
    top_p: Optional[float]
    max_new_tokens: Optional[int]

    @classmethod
    def of(cls, cfg) -> "Sampling":
        """The sampling fields of a config that holds them under the same names."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Samples:
    """`samples_per_prompt` samples for each prompt, prompt-major: x in the diffusion space (None for a
    token LM's), the latents in the encoder's space, the poems as the pipeline reads them, and their greedy
    readings (the same list when no prompt's meter is read for)."""
    prompts: list[str]
    x: Optional["torch.Tensor"]
    latents: np.ndarray
    poems: list[str]
    greedy: list[str]

    def records(self, free: Optional["Samples"] = None) -> list[dict]:
        """A row per sample: its prompt, the poem, its greedy reading and, given the same samples spelt
        freely (spelt_freely), their poem and greedy reading."""
        k = len(self.poems) // len(self.prompts)
        rows = [{"prompt": self.prompts[i // k], "poem": t, "greedy": g} for i, (t, g) in enumerate(zip(self.poems, self.greedy))]
        if free is not None:
            for row, t, g in zip(rows, free.poems, free.greedy):
                row.update(free=t, free_greedy=g)
        return rows

    def of_prompt(self, j: int, texts: list) -> list:
        """The rows of `texts` (poems, greedy readings or predictions) made for the j-th prompt."""
        k = len(self.poems) // len(self.prompts)
        return texts[j * k:(j + 1) * k]


def sample(pipe, prompts: list[str], sampling: Sampling):
    """The pipeline's samples for `prompts` (samples_per_prompt each, prompt-major), not decoded: x in the
    diffusion space and the latents in the encoder's space (numpy)."""
    x, _ = pipe.sample_latents(prompts, sampling.samples_per_prompt, sampling.steps, sampling.guidance, sampling.seed,
                               sampling.sampler, churn=sampling.churn)
    return x, pipe.to_latents(x).cpu().numpy()


def generate(pipe, prompts: list[str], sampling: Sampling) -> Samples:
    x, latents = sample(pipe, prompts, sampling)
    return Samples(prompts, x, latents, *readings(pipe, x, prompts, sampling))


def spelt_freely(pipe, samples: Samples, sampling: Sampling) -> Samples:
    """The same samples read without the decoder's lexicon: what the decoder spells on its own."""
    poems, greedy = readings(pipe, samples.x, samples.prompts, sampling, lexicon=False)
    return dataclasses.replace(samples, poems=poems, greedy=greedy)


def readings(pipe, x, prompts: list[str], sampling: Sampling, lexicon=None) -> tuple[list[str], list[str]]:
    """The poems of latents x made for `prompts` (samples_per_prompt each) as the pipeline decodes them
    (the best-scanning reading for a prompt naming a meter), and their greedy readings."""
    greedy = pipe.decode(x, lexicon)
    if pipe.meter_readings(sampling.meter_readings) < 2 or not any(prompt_meter(p) for p in prompts):
        return greedy, greedy
    rows = [p for p in prompts for _ in range(sampling.samples_per_prompt)]
    return pipe.read_for_meter(x, greedy, rows, lexicon, sampling.meter_readings, sampling.seed), greedy
