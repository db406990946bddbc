"""Encode job: text shards -> latent shards with prompt embeddings, and the latent statistics.

    latentverse encode yamls/encode/bundled.yaml data.path=out/text_shards autoencoder=out/ae out_dir=out/latents

Each slot (`num_workers` processes here, times WORLD_SIZE ranks under torchrun or the Composer
launcher) takes a contiguous block of every split, runs the autoencoder's encoder and the prompt
encoder in batches under inference mode, and writes `out_dir/<split>/<slot>/`; rank 0 merges the
indexes, so slot order = input order and 1 slot and N slots give the same dataset. A killed job run
again keeps the finished slots (they have done-markers, see trainer/data/mds.py) and redoes the rest.

Columns (trainer/base/schema.py latent_columns): latent fp16 [32, 64]; prompt_emb fp16 [L, D] zero-padded
plus prompt_len, and/or prompt_pooled fp16 [D] (`prompt_mode`); text, prompt, id, source and labels.
`latent_stats.json` (per-channel and overall mean and std, and sigma_data = the std of the
channel-centred latents, which EDM uses; see trainer/data/loaders.py) is computed from the fp16 values
actually stored, per split, in `out_dir/<split>/latent_stats.json`, and the train split's also in
`out_dir/latent_stats.json`.

`partition_by: form` (any label column, or source) also splits every split by that column's value:
samples go to `out_dir/<split>/form=<value>/<slot>/`, each such folder is a dataset of its own after the
merge, and `out_dir/<split>/index.json` still covers them all. Training then weighs the partitions
with `data.streams` proportions, e.g. to show a rare form more often (see docs/data.md).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import time
from typing import Literal, Optional

import numpy as np

from trainer.base import uris
from trainer.data.mds import LocalMDS, RankedDataset, partition_name, wait_for, world_from_env
from trainer.data.remote import write_through_stage
from trainer.base.files import check_out_dir, read_json, write_json_atomic
from trainer.base.schema import ENCODE_RECORD, LABELS, LATENT_STATS, SPLITS, latent_columns
from trainer.base.config import ExistingPath, UserError
from trainer.base.log import get_logger
from trainer.models.text_encoders import PromptEncoderConfig

log = get_logger("encode")

@dataclasses.dataclass
class EncodeDataConfig:
    path: ExistingPath = "out/demo/text_shards"   # the prep job's out_dir (holds <split>/index.json)
    splits: list[str] = dataclasses.field(default_factory=lambda: list(SPLITS))
    max_samples: Optional[int] = None             # per split, for quick runs


@dataclasses.dataclass
class EncodeConfig:
    out_dir: str
    autoencoder: ExistingPath                      # an exported autoencoder directory
    data: EncodeDataConfig = dataclasses.field(default_factory=EncodeDataConfig)
    prompt_encoder: PromptEncoderConfig = dataclasses.field(default_factory=PromptEncoderConfig)
    prompt_mode: Literal["tokens", "pooled", "both"] = "both"
    format: Literal["mds", "wds"] = "mds"
    batch_size: int = 64
    num_workers: int = 1                           # processes on this machine (per launcher rank)
    threads_per_slot: Optional[int] = None         # torch threads per slot; None = share this node's cores
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compression: Optional[str] = "zstd"
    overwrite: bool = False                        # re-encode when out_dir holds a different config
    wait_timeout_s: float = 24 * 3600.0
    partition_by: Optional[str] = None             # a label column (or source): one dataset per value

    def __post_init__(self):
        if self.partition_by is not None:
            cols = ("source", *LABELS)
            if self.partition_by not in cols:
                raise ValueError(f"partition_by must be one of {', '.join(cols)}, got {self.partition_by!r}")
            if self.format != "mds":
                raise ValueError("partition_by needs format: mds")
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


CONFIG = EncodeConfig


# ---------------------------------------------------------------------------------------------
# statistics: exact sums over the stored fp16 values, combined across slots


class LatentStats:
    def __init__(self, channels: int):
        self.n = 0                                   # latent vectors (samples x slots)
        self.s = np.zeros(channels, np.float64)
        self.ss = np.zeros(channels, np.float64)

    def add(self, latents: np.ndarray) -> None:      # [B, T, C]
        x = latents.astype(np.float64).reshape(-1, latents.shape[-1])
        self.n += x.shape[0]
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)

    def to_json(self) -> dict:
        return {"n": self.n, "s": self.s.tolist(), "ss": self.ss.tolist()}

    @classmethod
    def combine(cls, parts: list[dict]) -> "LatentStats":
        out = cls(len(parts[0]["s"]))
        for p in parts:
            out.n += p["n"]
            out.s += np.asarray(p["s"])
            out.ss += np.asarray(p["ss"])
        return out

    def summary(self) -> dict:
        n = max(self.n, 1)
        mean_c = self.s / n
        var_c = np.maximum(self.ss / n - mean_c ** 2, 0.0)
        mean = self.s.sum() / (n * len(self.s))
        var = max(self.ss.sum() / (n * len(self.s)) - mean ** 2, 0.0)
        return {"count_vectors": int(self.n), "channel_mean": mean_c.tolist(),
                "channel_std": np.sqrt(var_c).tolist(), "mean": float(mean), "std": float(math.sqrt(var)),
                # EDM's sigma_data for channel-centred latents (trainer/data/loaders.py normalize=center)
                "sigma_data": float(math.sqrt(var_c.mean()))}


# ---------------------------------------------------------------------------------------------
# one slot


def slot_device(device: str, environ, worker: int = 0, num_workers: int = 1, cuda_count: int | None = None):
    """The torch.device one slot runs on: CUDA slots of a node spread over its GPUs.

    A slot's index on its node is LOCAL_RANK * num_workers + worker (the launcher's local rank, then the
    process this rank spawned); it takes GPU (that index mod the GPU count): one rank per GPU under
    `composer -n 8` puts rank r on cuda:r, and one rank with num_workers=8 puts worker j on cuda:j.
    "auto" is cuda when a GPU is visible, else cpu. `environ`: the launcher's variables (os.environ).
    """
    import torch

    count = torch.cuda.device_count() if cuda_count is None else cuda_count
    if device == "cpu" or (device == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise UserError("device: cuda, but this machine has no CUDA device (set device: cpu or auto)")
    try:
        local_rank = int(environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError(f"LOCAL_RANK must be an integer, got {environ.get('LOCAL_RANK')!r}") from None
    return torch.device("cuda", (local_rank * num_workers + worker) % count)


def load_latent_encoder(path: str, device: str):
    """The latent encoder saved at `path`, by the kind its config names: the BART-Perceiver autoencoder
    (latent [32, 64]) or a causal LM's token embeddings (latent [L, d], trainer/models/token_latents.py)."""
    from trainer.models.token_latents import load_latent_encoder as load

    return load(path, device)


def _block(n: int, slot: int, n_slots: int) -> range:
    return range(slot * n // n_slots, (slot + 1) * n // n_slots)


class _WdsRankWriter:
    """webdataset tar shards for one slot and split, with the same done-marker discipline."""

    def __init__(self, out: str):
        import webdataset as wds

        os.makedirs(out, exist_ok=True)
        self.out = out
        self.sink = wds.ShardWriter(os.path.join(out, "latents-%06d.tar"), maxcount=10000, verbose=0)

    def write(self, sample: dict) -> None:
        meta = {k: v for k, v in sample.items() if isinstance(v, (str, int))}
        rec = {"__key__": hashlib.sha1(sample["id"].encode()).hexdigest()[:20], "json": meta,
               "latent.npy": sample["latent"]}
        for k in ("prompt_emb", "prompt_pooled"):
            if k in sample:
                rec[f"{k}.npy"] = sample[k]
        self.sink.write(rec)

    def finish(self) -> None:
        self.sink.close()


class _PromptCache:
    """Prompt embeddings by prompt text: corpora repeat a few label-built prompts many times, so each
    distinct prompt is encoded once per slot (same values as encoding it in every batch)."""

    def __init__(self, penc, limit: int = 100_000):
        self.penc, self.limit = penc, limit
        self.cache: dict = {}

    def get(self, prompts: list[str]):
        """(tokens fp16 [B, L, D], pooled fp16 [B, D], lengths [B])."""
        import torch

        new = list(dict.fromkeys(p for p in prompts if p not in self.cache))
        if len(self.cache) + len(new) > self.limit:  # bounded memory for corpora of free-text prompts
            self.cache.clear()
            new = list(dict.fromkeys(prompts))
        if new:
            with torch.inference_mode():
                tokens, mask, pooled = self.penc(new)
            for j, p in enumerate(new):
                self.cache[p] = (tokens[j].cpu().numpy().astype(np.float16), pooled[j].cpu().numpy().astype(np.float16),
                                 int(mask[j].sum()))
        got = [self.cache[p] for p in prompts]
        return (np.stack([g[0] for g in got]), np.stack([g[1] for g in got]), np.array([g[2] for g in got]))


def encode_slot(cfg: EncodeConfig, slot: int, n_slots: int, threads: int, device: str = "cpu") -> dict:
    """Encode this slot's block of every split on `device` (slot_device's); returns its marker (counts and
    stat sums)."""
    import torch
    from tqdm import tqdm

    from trainer.models.text_encoders import build_prompt_encoder

    torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what code that says just "cuda" gets
    ae = load_latent_encoder(cfg.autoencoder, device)
    penc = build_prompt_encoder(cfg.prompt_encoder).to(device)
    tokens, dims = ae.latent_shape
    cols = _columns(cfg, (tokens, dims), penc)
    ds_out = RankedDataset(cfg.out_dir, cols, splits=cfg.data.splits, compression=cfg.compression)
    writer = ds_out.rank_writer(slot)
    stats, counts = {}, {}
    prompts = _PromptCache(penc)
    for split in cfg.data.splits:
        src = LocalMDS(os.path.join(cfg.data.path, split))
        n = len(src) if cfg.data.max_samples is None else min(len(src), cfg.data.max_samples)
        block = _block(n, slot, n_slots)
        st = stats[split] = LatentStats(dims)
        wds_writer = _WdsRankWriter(ds_out.rank_dir(slot, split)) if cfg.format == "wds" else None
        bar = tqdm(total=len(block), desc=f"encode {split} slot {slot}", unit="sample", disable=None,
                   position=slot if n_slots > 1 else None, leave=n_slots == 1)
        for start in range(block.start, block.stop, cfg.batch_size):
            rows = [src[i] for i in range(start, min(start + cfg.batch_size, block.stop))]
            texts = [r["text"] for r in rows]
            with torch.inference_mode():
                z = ae.encode(texts).float().cpu().numpy().astype(np.float16)   # [B, T, C]
            tokens, pooled, lens = prompts.get([r["prompt"] for r in rows])
            st.add(z)
            for j, r in enumerate(rows):
                sample = {k: r[k] for k in ("id", "text", "prompt", "source", *LABELS)}
                sample["latent"] = z[j]
                if cfg.prompt_mode in ("tokens", "both"):
                    sample["prompt_emb"], sample["prompt_len"] = tokens[j], int(lens[j])
                if cfg.prompt_mode in ("pooled", "both"):
                    sample["prompt_pooled"] = pooled[j]
                if wds_writer is not None:
                    wds_writer.write(sample)
                else:
                    part = partition_name(cfg.partition_by, r.get(cfg.partition_by)) if cfg.partition_by else None
                    writer.write(sample, split=split, partition=part)
            bar.update(len(rows))
        bar.close()
        if wds_writer is not None:
            wds_writer.finish()
        counts[split] = len(block)
    if cfg.format == "wds":  # no MDS data: write the marker directly
        write_json_atomic(ds_out.marker(slot), {"rank": slot, "counts": counts,
                                                "info": {"stats": {s: v.to_json() for s, v in stats.items()}}})
    else:
        writer.finish({"stats": {s: v.to_json() for s, v in stats.items()}})
    return {"slot": slot, "counts": counts}


def _columns(cfg: EncodeConfig, latent_shape, penc=None) -> dict:
    L = cfg.prompt_encoder.max_length if penc is None else penc.max_length
    D = None if penc is None else penc.dim
    return latent_columns(latent_shape, (L, D) if cfg.prompt_mode in ("tokens", "both") else None,
                          D if cfg.prompt_mode in ("pooled", "both") else None)


def _slot_entry(args):
    cfg_dict, slot, n_slots, threads, device = args
    from trainer.base import config as C

    cfg = C.from_dict(EncodeConfig, cfg_dict)
    return encode_slot(cfg, slot, n_slots, threads, device)


# ---------------------------------------------------------------------------------------------
# the job


def _as_given(cfg: EncodeConfig) -> dict:
    """The config as a dict with URI inputs named by their URIs, not by this node's copies."""
    d = dataclasses.asdict(cfg)
    d["data"]["path"], d["autoencoder"] = uris.origin(cfg.data.path), uris.origin(cfg.autoencoder)
    return d


def fingerprint(cfg: EncodeConfig, n_slots: int) -> str:
    d = _as_given(cfg)
    for k in ("out_dir", "overwrite", "wait_timeout_s", "num_workers", "device", "batch_size", "threads_per_slot"):
        d.pop(k)
    d["n_slots"] = n_slots
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _check_uris(cfg: EncodeConfig) -> None:
    for key, path in (("data.path", cfg.data.path), ("autoencoder", cfg.autoencoder)):
        if uris.is_uri(path):
            uris.check(path, key, must_exist=True)


def _check_inputs(cfg: EncodeConfig) -> EncodeConfig:
    """The config with its inputs on this node: a URI `data.path` or `autoencoder` is read from its
    node-local copy (made once per node); the text splits must hold shards."""
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=uris.local_path(cfg.data.path, "data.path")),
                              autoencoder=uris.local_path(cfg.autoencoder, "autoencoder"))
    for i, split in enumerate(cfg.data.splits):
        if not os.path.exists(os.path.join(cfg.data.path, split, "index.json")):
            raise UserError(f"data.splits[{i}]: no text shards (index.json) in {os.path.join(cfg.data.path, split)!r}")
    return cfg


def run(cfg: EncodeConfig) -> dict:
    rank, world = world_from_env()
    n_slots = world * cfg.num_workers
    _check_uris(cfg)               # a URI input is copied in below, by the staged run if that runs
    if uris.is_uri(cfg.out_dir):   # staged on this node's disk, then uploaded (trainer/data/remote.py)
        return write_through_stage(cfg, run, fingerprint(cfg, n_slots))
    cfg = _check_inputs(cfg)
    check_out_dir(cfg.out_dir, create=False)   # RankedDataset makes it once the devices are known
    # This rank's slots, each on its own device; refuses device: cuda without a GPU before any work.
    devices = {rank * cfg.num_workers + j: str(slot_device(cfg.device, os.environ, j, cfg.num_workers))
               for j in range(cfg.num_workers)}
    fp = fingerprint(cfg, n_slots)
    ds = RankedDataset(cfg.out_dir, {}, splits=cfg.data.splits)
    done = ds.claim(fp, {"config": _as_given(cfg)}, cfg.overwrite, rank, ENCODE_RECORD, "latents",
                    also_remove=(LATENT_STATS,), wait_timeout=cfg.wait_timeout_s)
    if done is not None:
        log.info(f"{cfg.out_dir}: already encoded ({done['counts']}); nothing to do")
        return done

    my_slots = list(devices)
    todo = [s for s in my_slots if ds.rank_done(s) is None]
    if len(todo) < len(my_slots):
        log.info(f"resuming: slots {sorted(set(my_slots) - set(todo))} already finished")
    t0 = time.time()
    # Share this machine's cores among the slots running on it (all launcher ranks of this node).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = cfg.threads_per_slot or max(1, (os.cpu_count() or 1) // (local_world * cfg.num_workers))
    log.info("slots " + ", ".join(f"{s} on {devices[s]}" for s in todo))
    if len(todo) == 1:
        encode_slot(cfg, todo[0], n_slots, threads, devices[todo[0]])
    elif todo:
        # One process per slot (not a pool): a slot that dies must not take its siblings down, so
        # that their finished work is kept for the re-run.
        ctx = mp.get_context("spawn")
        procs = {s: ctx.Process(target=_slot_entry, args=((dataclasses.asdict(cfg), s, n_slots, threads, devices[s]),))
                 for s in todo}
        for p in procs.values():
            p.start()
        for p in procs.values():
            p.join()
        dead = [f"slot {s} " + (f"killed by {signal.Signals(-p.exitcode).name}" if p.exitcode < 0
                                else f"exited with {p.exitcode}") for s, p in procs.items() if p.exitcode != 0]
        if dead:
            raise UserError(f"encode: {', '.join(dead)}; run the same command again to finish (finished slots "
                            f"are kept)")
    if rank != 0:
        wait_for([os.path.join(cfg.out_dir, "_done.json")], cfg.wait_timeout_s, what="rank 0's merge")
        return read_json(os.path.join(cfg.out_dir, "_done.json"))

    markers = ds.wait_ranks(n_slots, cfg.wait_timeout_s)
    if cfg.format == "mds":
        ds.merge(n_slots)
    else:
        for split in cfg.data.splits:
            tars = sorted(os.path.relpath(os.path.join(dp, f), os.path.join(cfg.out_dir, split))
                          for dp, _, fs in os.walk(os.path.join(cfg.out_dir, split)) for f in fs if f.endswith(".tar"))
            with open(os.path.join(cfg.out_dir, split, "shards.txt"), "w") as f:
                f.write("\n".join(tars) + "\n")
    counts, summaries = {}, {}
    for split in cfg.data.splits:
        counts[split] = sum(m["counts"].get(split, 0) for m in markers)
        st = LatentStats.combine([m["info"]["stats"][split] for m in markers])
        summaries[split] = dict(st.summary(), count_samples=counts[split])
        write_json_atomic(os.path.join(cfg.out_dir, split, LATENT_STATS), summaries[split])
    main_split = "train" if "train" in summaries else cfg.data.splits[0]
    write_json_atomic(os.path.join(cfg.out_dir, LATENT_STATS), dict(summaries[main_split], split=main_split))
    seconds = time.time() - t0
    total = sum(counts.values())
    info = {"fingerprint": fp, "counts": counts, "slots": n_slots, "seconds": round(seconds, 2),
            "samples_per_s": round(total / max(seconds, 1e-9), 2), "format": cfg.format}
    ds.mark_complete(info)
    log.info(f"encoded {counts} in {seconds:.1f} s ({info['samples_per_s']} samples/s) into {cfg.out_dir}")
    return info
