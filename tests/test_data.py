"""trainer/data/loaders.py on real tiny latent shards: normalisation and sigma_data, one epoch = every sample
once, stream proportions, mid-epoch resume from the loader state, one-line errors, and the stale
shared-memory cleanup that spares live segments."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.base.config import ConfigError
from trainer.data.loaders import (LatentDataConfig, LatentNormalizer, StreamConfig, build_latent_dataloader, clean_stale_shared_memory, load_latent_stats)

from trainer.data.synthetic import write_latent_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    a = write_latent_shards(tmp_path_factory.mktemp("a"), n_train=40, n_val=10, seed=1)
    b = write_latent_shards(tmp_path_factory.mktemp("b"), n_train=24, n_val=4, seed=2)
    return a, b


def raw_latents(path):
    from streaming import StreamingDataset

    ds = StreamingDataset(local=path, shuffle=False, batch_size=1)
    return {i: ds[i] for i in range(len(ds))}


def test_normalizer_modes_round_trip_and_sigma_data(shards):
    stats = load_latent_stats(os.path.join(shards[0]["train"], "latent_stats.json"))
    x = torch.randn(3, 32, 64) * 0.5 + 0.1
    for mode, sd in (("center", stats["sigma_data"]), ("standardize", 1.0), ("none", stats["std"])):
        n = LatentNormalizer(stats, mode)
        assert n.sigma_data == pytest.approx(sd)
        torch.testing.assert_close(n.inverse(n(x)), x, atol=1e-5, rtol=1e-5)
    c = LatentNormalizer(stats, "center")
    torch.testing.assert_close(c(x), x - torch.tensor(stats["channel_mean"], dtype=torch.float32))
    # centred training latents have std sigma_data (what EDM assumes)
    lat = torch.stack([torch.from_numpy(r["latent"].astype(np.float32)) for r in raw_latents(shards[0]["train"]).values()])
    assert float(c(lat).std()) == pytest.approx(stats["sigma_data"], rel=0.02)


def test_one_epoch_yields_every_sample_once_with_prompts(shards):
    cfg = LatentDataConfig(path=shards[0]["train"], drop_last=False)
    loader, norm = build_latent_dataloader(cfg, batch_size=8)
    seen, raw = [], raw_latents(shards[0]["train"])
    for batch in loader:
        assert batch["latent"].shape[1:] == (32, 64) and batch["latent"].dtype == torch.float32
        assert batch["prompt_emb"].shape[1:] == (8, 16) and batch["prompt_mask"].dtype == torch.bool
        for j, i in enumerate(batch["sample_index"].tolist()):
            r = raw[i]
            torch.testing.assert_close(batch["latent"][j], norm(torch.from_numpy(r["latent"].astype(np.float32))))
            assert int(batch["prompt_mask"][j].sum()) == int(r["prompt_len"])
            seen.append(i)
    assert sorted(seen) == list(range(40)) and seen != list(range(40))   # all once, shuffled
    ev, _ = build_latent_dataloader(LatentDataConfig(path=shards[0]["train"], eval_path=shards[0]["val"]), 4, eval=True)
    assert [i for b in ev for i in b["sample_index"].tolist()] == list(range(10))  # in order, nothing dropped


def test_stream_proportions(shards):
    cfg = LatentDataConfig(streams=[StreamConfig(shards[0]["train"], 0.75), StreamConfig(shards[1]["train"], 0.25)],
                           drop_last=False)
    loader, _ = build_latent_dataloader(cfg, batch_size=8, epoch_size=64)
    ids = [i for b in loader for i in b["sample_index"].tolist()]
    assert len(ids) == 64
    assert sum(i < 40 for i in ids) == 48 and sum(i >= 40 for i in ids) == 16   # stream b's ids follow a's


def test_loader_state_resumes_mid_epoch(shards):
    cfg = LatentDataConfig(path=shards[0]["train"])
    loader, _ = build_latent_dataloader(cfg, batch_size=8)
    it = iter(loader)
    first = [next(it)["sample_index"].tolist() for _ in range(2)]
    state = loader.state_dict()
    del it
    loader2, _ = build_latent_dataloader(cfg, batch_size=8)
    loader2.load_state_dict(state)
    rest = [b["sample_index"].tolist() for b in loader2]
    ids = [i for b in first + rest for i in b]
    assert len(rest) == 3 and sorted(ids) == list(range(40))


def test_config_errors_are_one_line(shards, tmp_path):
    with pytest.raises(ConfigError, match="data.path: set data.path or data.streams"):
        LatentDataConfig().stream_paths()
    with pytest.raises(ConfigError, match="not both"):
        LatentDataConfig(path=shards[0]["train"], streams=[StreamConfig(shards[1]["train"])]).stream_paths()
    with pytest.raises(ConfigError, match="proportion for every stream or for none"):
        LatentDataConfig(streams=[StreamConfig(shards[0]["train"], 0.5), StreamConfig(shards[1]["train"])]).stream_paths()
    with pytest.raises(ConfigError, match=r"data.streams\[1\].path: no latent shards"):
        LatentDataConfig(streams=[StreamConfig(shards[0]["train"]), StreamConfig(str(tmp_path))]).stream_paths()
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"channel_mean": [0.0], "channel_std": [0.0], "std": 1.0, "sigma_data": 1.0}))
    with pytest.raises(ConfigError, match="must be > 0"):
        load_latent_stats(str(bad))
    bad.write_text(json.dumps({"channel_mean": [0.0]}))
    with pytest.raises(ConfigError, match="channel_std: missing"):
        load_latent_stats(str(bad))
    with pytest.raises(ConfigError, match="data.eval_path: no latent shards"):
        build_latent_dataloader(LatentDataConfig(path=shards[0]["train"], eval_path=str(tmp_path)), 4, eval=True)


def test_stale_shared_memory_is_removed_and_live_memory_is_kept():
    from multiprocessing import shared_memory

    stale = f"{999990 - os.getpid() % 1000:06d}_locals"
    code = (f"import os, signal\nfrom multiprocessing import shared_memory, resource_tracker\n"
            f"s = shared_memory.SharedMemory({stale!r}, create=True, size=64)\n"
            f"resource_tracker.unregister(s._name, 'shared_memory')\nos.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert os.path.exists(f"/dev/shm/{stale}")
    live = shared_memory.SharedMemory(f"{999980 - os.getpid() % 1000:06d}_barrier", create=True, size=64)
    try:
        removed = clean_stale_shared_memory()
        assert stale in removed and not os.path.exists(f"/dev/shm/{stale}")
        assert os.path.exists(f"/dev/shm/{live.name}")                  # mapped by this live process
    finally:
        live.close()
        live.unlink()
