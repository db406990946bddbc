"""Latent shards -> training batches: a StreamingDataset over one or more streams (with proportions),
normalised by the latent statistics the encode job recorded, and a StreamingDataLoader whose state
goes into Composer's checkpoints (so a resumed run continues mid-epoch where it stopped).

Normalisation (`normalize`), and the sigma_data that EDM must use with it:
  center       x - channel_mean                     sigma_data = stats["sigma_data"] (the default)
  standardize  (x - channel_mean) / channel_std     sigma_data = 1
  none         x                                    sigma_data = stats["std"]
  whiten       W (x - mean) over the flattened [T*C]  sigma_data = 1 (mean, W = Cov^-1/2: trainer/data/whitening.py,
               fitted by the diffusion job and saved beside its checkpoints and in its export)

Each batch is {latent [B,T,C] float32, sample_index [B] long, and when the shards have them
prompt_emb [B,L,D] float32 + prompt_mask [B,L] bool, prompt_pooled [B,D] float32}.
`sample_index` is the sample's id in the dataset's global sample space (what the resume test logs).
"""
from __future__ import annotations

import dataclasses
import json
import re
import os
from typing import Literal, Optional

import numpy as np
import torch

from trainer.base.schema import LATENT_STATS
from trainer.base.config import ConfigError
from trainer.data.mds import check_shards
from trainer.data.whitening import Whitening
from trainer.base import uris
from trainer.data.remote import shared_memory_lock, stream_local


@dataclasses.dataclass
class StreamConfig:
    path: str
    proportion: Optional[float] = None  # share of each epoch drawn from this stream (all set, or none)

    def __post_init__(self):
        if self.proportion is not None and self.proportion <= 0:
            raise ValueError(f"proportion must be > 0, got {self.proportion}")


@dataclasses.dataclass
class ResolvedStream(StreamConfig):
    """A stream as read: `path` is a local folder (the node-local cache when the shards are in a bucket)
    and `remote` the URI they come from (None for local shards)."""
    remote: Optional[str] = None


@dataclasses.dataclass
class LatentDataConfig:
    path: str = ""                      # one latent-shard folder (holds index.json) or URI (s3://...), or use `streams`
    streams: list[StreamConfig] = dataclasses.field(default_factory=list)
    root: str = ""                      # when set, `path` and stream paths are relative to this folder
    stats_path: str = ""                # default: <root>/latent_stats.json with a root, else the first
                                        # stream's (the encode job writes one per split)
    eval_path: str = ""                 # held-out latent shards; empty = no evaluation
    normalize: Literal["center", "standardize", "none", "whiten"] = "center"
    num_workers: int = 0
    # Loader workers kept alive across epochs (with num_workers > 0: no restart each epoch), and batches in
    # pinned memory on a GPU machine (the copy to the device is then asynchronous).
    persistent_workers: bool = True
    pin_memory: bool = True
    shuffle: bool = True
    shuffle_seed: int = 9176
    drop_last: bool = True

    def local_of(self, path: str, key: str) -> str:
        """A local folder of shards for `path`: itself, or the node-local cache of a URI."""
        return stream_local(path, key) if uris.is_uri(path) else path

    def stream_paths(self) -> list[ResolvedStream]:
        if self.path and self.streams:
            raise ConfigError("data.path: set data.path or data.streams, not both (one folder with a YAML "
                              "that has streams: add data.streams=[] data.root=)")
        streams = list(self.streams) or ([StreamConfig(self.path)] if self.path else [])
        if self.root:
            join = uris.join if uris.is_uri(self.root) else os.path.join
            streams = [dataclasses.replace(s, path=join(self.root, s.path)) for s in streams]
        if not streams:
            raise ConfigError("data.path: set data.path or data.streams to the latent shards")
        resolved = []
        for i, s in enumerate(streams):
            key = "data.path" if not self.streams else f"data.streams[{i}].path"
            local = self.local_of(s.path, key)
            if not os.path.isfile(os.path.join(local, "index.json")):
                raise ConfigError(f"{key}: no latent shards (index.json) in {s.path!r}")
            check_shards(local)
            resolved.append(ResolvedStream(local, s.proportion, s.path if uris.is_uri(s.path) else None))
        streams = resolved
        given = [s.proportion is not None for s in streams]
        if any(given) and not all(given):
            raise ConfigError("data.streams: give a proportion for every stream or for none")
        return streams

    def eval_stream(self) -> ResolvedStream:
        """data.eval_path as read (see stream_paths)."""
        return ResolvedStream(self.local_of(self.eval_path, "data.eval_path"), None,
                              self.eval_path if uris.is_uri(self.eval_path) else None)

    def stats_file(self) -> str:
        if self.stats_path and uris.is_uri(self.stats_path):
            return uris.download(self.stats_path, uris.cache_dir(self.stats_path, LATENT_STATS), "data.stats_path")
        if self.stats_path:
            return self.stats_path
        if self.root and uris.is_uri(self.root):
            return uris.download(uris.join(self.root, LATENT_STATS), uris.cache_dir(self.root, LATENT_STATS),
                                 "data.root")
        return os.path.join(self.root or self.stream_paths()[0].path, LATENT_STATS)


def own_generator(seed: int) -> torch.Generator:
    """The loader's own generator for the seed each `iter()` draws (worker seeds). From the global RNG that
    draw would shift every later noise/sigma/mask draw by one whenever a new epoch starts: a run resumed
    from a checkpoint at an epoch's last batch would then train on other draws than the uninterrupted one
    (the saved RNG state is put back after the resumed run's `iter()`, see RestoreRNGOnResume)."""
    return torch.Generator().manual_seed(int(seed))


def load_latent_stats(path: str) -> dict:
    try:
        with open(path) as f:
            stats = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (latent_stats.json is written by the encode job)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: line {e.lineno}: not valid JSON") from None
    if not isinstance(stats, dict):
        raise ConfigError(f"{path}: expected a JSON object of latent statistics")
    for key in ("channel_mean", "channel_std", "std", "sigma_data"):
        if key not in stats:
            raise ConfigError(f"{path}: {key}: missing")
    if not all(s > 0 for s in stats["channel_std"]) or not stats["std"] > 0 or not stats["sigma_data"] > 0:
        raise ConfigError(f"{path}: channel_std, std and sigma_data must be > 0")
    return stats


def shard_columns(local: str) -> dict[str, str]:
    """Column name -> MDS encoding of the first shard of a latent-shard folder (e.g. 'ndarray:float16:32,64')."""
    with open(os.path.join(local, "index.json")) as f:
        shard = json.load(f)["shards"][0]
    return dict(zip(shard["column_names"], shard["column_encodings"]))


def column_shape(encoding: str) -> Optional[tuple[int, ...]]:
    """'ndarray:float16:32,64' -> (32, 64); None when the encoding carries no shape."""
    parts = encoding.split(":")
    if len(parts) == 3 and parts[0] == "ndarray":
        return tuple(int(x) for x in parts[2].split(","))
    return None


class LatentNormalizer:
    """Maps encoder latents to the space the diffusion model is trained in, and back."""

    def __init__(self, stats: dict, mode: str = "center", whitening: Optional[Whitening] = None):
        self.mode = mode
        self.mean = torch.tensor(stats["channel_mean"], dtype=torch.float32)    # [C]
        self.std = torch.tensor(stats["channel_std"], dtype=torch.float32)      # [C]
        self.sigma_data = float({"center": stats["sigma_data"], "standardize": 1.0, "none": stats["std"],
                                 "whiten": 1.0}[mode])
        if mode == "whiten" and whitening is None:
            raise ValueError("normalize whiten: needs the fitted whitening (trainer/data/whitening.py)")
        self.whitening = whitening if mode == "whiten" else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.whitening is not None:
            return self.whitening(x)
        x = x - self.mean.to(x)
        return x / self.std.to(x) if self.mode == "standardize" else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "none":
            return x
        if self.whitening is not None:
            return self.whitening.inverse(x)
        if self.mode == "standardize":
            x = x * self.std.to(x)
        return x + self.mean.to(x)


def _latent_dataset_class():
    from streaming import StreamingDataset

    class LatentDataset(StreamingDataset):
        """Yields {latent [T,C], sample_index, prompt_emb [L,D], prompt_mask [L], prompt_pooled [D]}; the
        latent normalised, except with normalize whiten (WhitenBatch whitens the collated batch)."""

        def __init__(self, normalizer: LatentNormalizer, **kwargs):
            with shared_memory_lock():   # two jobs starting at once on one node: one prefix each
                super().__init__(**kwargs)
            self.normalizer = normalizer

        def get_item(self, sample_id: int, retry: int = 7):
            s = super().get_item(sample_id, retry)
            z = torch.from_numpy(np.asarray(s["latent"], dtype=np.float32))
            out = {"latent": z if self.normalizer.whitening is not None else self.normalizer(z),
                   "sample_index": torch.tensor(sample_id, dtype=torch.long)}
            if "prompt_emb" in s:
                emb = torch.from_numpy(np.asarray(s["prompt_emb"], dtype=np.float32))     # [L, D]
                mask = torch.arange(emb.shape[0]) < int(s["prompt_len"])                   # [L] True = real
                out["prompt_emb"], out["prompt_mask"] = emb, mask
            if "prompt_pooled" in s:
                out["prompt_pooled"] = torch.from_numpy(np.asarray(s["prompt_pooled"], dtype=np.float32))
            return out

    return LatentDataset


class WhitenBatch:
    """The loader's collate for normalize whiten: the batch's latents whitened in one matrix product
    ([B, T*C] x [T*C, T*C]); latent by latent, each would read the whole matrix again (measured at
    B = 32, T*C = 2048, one thread: 36 ms per batch instead of 12, half a demo CPU step)."""

    def __init__(self, normalizer: LatentNormalizer):
        self.normalizer = normalizer

    def __call__(self, items: list[dict]) -> dict:
        from torch.utils.data import default_collate

        batch = default_collate(items)
        batch["latent"] = self.normalizer(batch["latent"])
        return batch


def build_latent_dataloader(cfg: LatentDataConfig, batch_size: int, *, eval: bool = False,
                            seed: Optional[int] = None, epoch_size: Optional[int] = None,
                            whitening: Optional[Whitening] = None):
    """(StreamingDataLoader, LatentNormalizer) for one rank; `batch_size` is per rank.

    Train: the streams of `cfg`, shuffled, whose loader state_dict resumes mid-epoch. Eval: `cfg.eval_path`,
    in order, every sample. Both are normalised with the train statistics (`cfg.stats_file()`), and with
    normalize=whiten with `whitening` (the diffusion job's fit)."""
    from streaming import Stream, StreamingDataLoader

    if batch_size < 1:
        raise ConfigError(f"batch_size: must be >= 1 per rank, got {batch_size}")
    if cfg.normalize == "whiten" and whitening is None:
        raise ConfigError("data.normalize: whiten needs the whitening the diffusion job fits (none was given)")
    stats = load_latent_stats(cfg.stats_file())
    normalizer = LatentNormalizer(stats, cfg.normalize, whitening)
    if eval:
        ev = cfg.eval_stream()
        if not os.path.isfile(os.path.join(ev.path, "index.json")):
            raise ConfigError(f"data.eval_path: no latent shards (index.json) in {cfg.eval_path!r}")
        check_shards(ev.path)
        streams = [Stream(remote=ev.remote, local=ev.path)]
    else:
        streams = [Stream(remote=s.remote, local=s.path, proportion=s.proportion) for s in cfg.stream_paths()]
    ds = _latent_dataset_class()(
        normalizer,
        streams=streams,
        shuffle=cfg.shuffle and not eval,
        shuffle_seed=cfg.shuffle_seed if seed is None else seed,
        batch_size=batch_size,
        epoch_size=None if eval else epoch_size,
    )
    loader = StreamingDataLoader(ds, batch_size=batch_size, num_workers=cfg.num_workers,
                                 collate_fn=WhitenBatch(normalizer) if normalizer.whitening is not None else None,
                                 drop_last=cfg.drop_last and not eval, generator=own_generator(cfg.shuffle_seed),
                                 persistent_workers=cfg.persistent_workers and cfg.num_workers > 0,
                                 pin_memory=cfg.pin_memory and torch.cuda.is_available())
    return loader, normalizer


_STREAMING_SHM = re.compile(r"^\d{6}_(locals|barrier|cache_usage|next_epoch|shard_access_times|shard_states|"
                            r"epoch_shape|epoch_data|filelock_barrier|filelock_cache)$")


def _mapped_shm_names() -> Optional[set[str]]:
    """Names of /dev/shm segments some live process maps (from /proc/*/maps); None when unknowable."""
    if not os.path.isdir("/proc/self") or not os.path.isdir("/dev/shm"):
        return None
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find("/dev/shm/")
                    if i >= 0:
                        names.add(line[i + 9:].split()[0])
        except (OSError, IndexError):
            continue  # the process ended, or is not ours to read
    return names


def clean_stale_shared_memory() -> list[str]:
    """Remove the shared memory that a crashed mosaicml-streaming run left behind; returns the names.

    streaming's own `clean_stale_shared_memory()` unlinks every streaming segment on the machine,
    including those of runs still alive (another job on the node, another test); here a segment is
    stale only when no live process maps it. Where /proc is unavailable, streaming's is used."""
    mapped = _mapped_shm_names()
    if mapped is None:
        from streaming.base.util import clean_stale_shared_memory as clean_all

        clean_all()
        return []
    removed = []
    for name in sorted(os.listdir("/dev/shm")):
        if _STREAMING_SHM.match(name) and name not in mapped:
            try:
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
            except OSError:
                pass  # removed meanwhile, or someone else's
    return removed


def to_encoder_latents(x: torch.Tensor, normalizer, latent_kind: str, renormalize: bool = True) -> torch.Tensor:
    """Diffusion space -> the latent encoder's space: inverse normalisation, then for the BART-Perceiver
    latent each slot back on the sphere its encoder uses (norm sqrt(dim)). The pipeline and the
    training job's poem samples both decode through this."""
    z = normalizer.inverse(x.float())
    if renormalize and latent_kind == "bart_perceiver":
        z = torch.nn.functional.normalize(z, dim=-1) * z.shape[-1] ** 0.5
    return z
