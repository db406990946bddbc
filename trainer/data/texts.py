"""Text shards (the prep job's output) as training data: the config of a text-model job's data, the
split folders, and a StreamingDataLoader over a split (mid-epoch resume) with a job's collate."""
from __future__ import annotations

import dataclasses
import os

from trainer.base import uris
from trainer.base.config import UserError
from trainer.data.loaders import own_generator
from trainer.data.mds import check_shards
from trainer.data.remote import remote_of, shared_memory_lock, stream_local


@dataclasses.dataclass
class TextDataConfig:
    path: str = "out/demo/text_shards"  # the prep job's out_dir: <path>/<split>/index.json; or a URI (s3://...)
    train_split: str = "train"
    eval_split: str = "val"
    text_column: str = "text"
    eval_samples: int = 256             # held-out texts per evaluation
    num_workers: int = 0
    # Clean streaming's leaked shared memory at start; turn off when other streaming jobs run on this machine.
    clean_shared_memory: bool = True


def text_split_dir(data: TextDataConfig, split: str) -> str:
    """The folder a split is read from: <data.path>/<split>, or for a URI data.path (s3://...) the split's
    node-local cache folder (trainer/data/remote.py: its index fetched now, the shards as they are read)."""
    if uris.is_uri(data.path):
        uris.check(data.path, "data.path", must_exist=True)
        d = stream_local(uris.join(data.path, split), "data.path")
    else:
        d = os.path.join(data.path, split)
        if not os.path.isfile(os.path.join(d, "index.json")):
            raise UserError(f"data.path: {d}/index.json not found (text shards from `latentverse prep` expected)")
    check_shards(d)
    return d


def text_dataloader(local: str, collate, data: TextDataConfig, batch_size: int, train: bool, seed: int):
    """Shuffled (train) or in order (eval) batches of shard records, turned into tensors by `collate`.
    A cache folder of text_split_dir streams from its URI, as the diffusion job's latent shards do."""
    from streaming import StreamingDataLoader, StreamingDataset

    with shared_memory_lock():   # two jobs starting at once on one node: one prefix each
        ds = StreamingDataset(remote=remote_of(local), local=local, batch_size=batch_size, shuffle=train,
                              shuffle_seed=seed)
    return StreamingDataLoader(ds, batch_size=batch_size, collate_fn=collate, num_workers=data.num_workers,
                               drop_last=train, generator=own_generator(seed))
