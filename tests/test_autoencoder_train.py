"""`latentverse train` on tiny text shards (the prep job's schema) exports a loadable autoencoder; the
evaluation function reports greedy accuracy, exact match, BLEU and the latent-shuffle check."""
import json
import os
import random

import pytest
import torch

from trainer.base.config import UserError

from .conftest import run_cli
from .tiny import fit

torch.set_num_threads(1)

WORDS = ("rose night sea moon wind heart light dream stone river star fire song bird rain snow gold tree "
         "sleep dawn shadow silver morning flame").split()


def poems(n, seed=0):
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(2))
            for _ in range(n)]


def write_text_shards(root, splits):
    """Tiny text shards exactly as the prep job writes them (trainer/base/schema.py TEXT_COLUMNS)."""
    from streaming import MDSWriter

    from trainer.base.schema import LABELS, TEXT_COLUMNS

    for split, texts in splits.items():
        with MDSWriter(out=os.path.join(root, split), columns=TEXT_COLUMNS) as w:
            for i, t in enumerate(texts):
                w.write({"id": f"test-{split}-{i}", "text": t, "prompt": "", "source": "jsonl",
                         **{k: "" for k in LABELS}, "n_tokens": len(t.split())})
    return str(root)


TINY = ["model.d_model=32", "model.encoder_layers=1", "model.decoder_layers=1", "model.attention_heads=2",
        "model.ffn_dim=64", "model.perceiver_depth=1", "model.perceiver_heads=2", "model.perceiver_dim_head=16",
        "model.reconstruction_depth=1", "model.max_tokens=24", "tokenizer.vocab_size=300",
        "tokenizer.min_frequency=1", "batch_size=8", "data.eval_samples=16", "threads=1",
        # Other test files may run streaming at the same time: do not unlink their shared memory.
        "data.clean_shared_memory=false"]


@pytest.mark.slow
def test_train_job_exports_a_loadable_autoencoder(tmp_path):
    from trainer.evaluation.autoencoder import evaluate_autoencoder
    from trainer.models.autoencoder import LatentAutoencoder

    data = write_text_shards(tmp_path / "shards", {"train": poems(96), "val": poems(16, 1), "test": poems(16, 2)})
    out = tmp_path / "run"
    args = ["train", "yamls/autoencoder/tiny_cpu.yaml", f"out_dir={out}", f"data.path={data}", *TINY,
            "max_duration=24ba", "eval_interval=12ba", "save_interval=12ba", "log_interval=4", "max_minutes=null"]
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    ae = out / "autoencoder"
    assert sorted(os.listdir(ae)) == ["autoencoder_config.json", "diffusion_pytorch_model.safetensors", "lexicon.txt",
                                      "tokenizer.json", "tokenizer_config.json"]
    m = LatentAutoencoder.from_pretrained(str(ae))
    # The lexicon: the training split's words seen at least twice (lexicon.min_count), not the held-out's.
    from collections import Counter

    from trainer.text.words import words

    counts = Counter(w for t in poems(96) for w in words(t))
    assert m.lexicon.words == {w for w, c in counts.items() if c >= 2} and len(m.lexicon) > 10
    assert m.encode(poems(3)).shape == (3, 32, 64) and len(m.decode(m.encode(poems(2)), max_length=8)) == 2
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(train_losses) == 6 and train_losses[-1] < train_losses[0]
    evals = [r for r in rows if "eval/GreedyTokenAccuracy" in r]
    assert [r["batch"] for r in evals] == [12, 24]
    assert all(0.0 <= r["eval/TokenAccuracy"] <= 1.0 for r in evals)
    assert os.path.getsize(out / "training_curve.png") > 1000
    assert (out / "checkpoints" / "latest-rank0.pt").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["batches"] == 24

    # A rerun finds its export and skips; a longer max_duration with the export removed resumes from
    # the checkpoint (autoresume) instead of starting over.
    r = run_cli(*args)
    assert r.returncode == 0 and "skipping" in r.stderr
    import shutil

    shutil.rmtree(ae)
    r = run_cli(*args[:-4], "max_duration=30ba", "eval_interval=100ba", "save_interval=100ba", "log_interval=4")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    resumed = [r["batch"] for r in rows if "train/loss" in r][6:]
    assert resumed == [28]  # batches 25..30 only: it resumed at 24
    assert json.loads((out / "train_summary.json").read_text())["batches"] == 30

    report = evaluate_autoencoder(str(ae), poems(8, 2), batch_size=4)
    for key in ("token_accuracy", "exact_match"):
        assert 0.0 <= report[key] <= 1.0 and 0.0 <= report["shuffled"][key] <= 1.0
    assert 0.0 <= report["bleu"] <= 100.0 and report["n"] == 8

    # Decoder adaptation from the export: only the decoder side changes, so the latents stay the same.
    adapted = tmp_path / "adapted"
    r = run_cli("train", "yamls/autoencoder/adapt_decoder_tiny_cpu.yaml", f"out_dir={adapted}", f"data.path={data}",
                f"adapt.init_from={ae}", "adapt.samples=64", "batch_size=8", "max_duration=12ba", "eval_interval=12ba",
                "data.eval_samples=16", "threads=1", "data.clean_shared_memory=false", "max_minutes=null")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "latent prior fitted on 64 training poems" in r.stderr
    a = LatentAutoencoder.from_pretrained(str(adapted / "autoencoder"))
    m = LatentAutoencoder.from_pretrained(str(ae))       # the export it started from (re-exported at 30 batches)
    before, after = dict(m.named_parameters()), dict(a.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("reconstruction.", "bart.model.decoder.", "bow_head.")) for k in changed)
    assert any(k.startswith("bart.model.decoder.layers.") for k in changed)
    assert torch.equal(m.encode(poems(4, 3)), a.encode(poems(4, 3)))
    assert a.cfg == m.cfg                                 # exported with the original training config
    assert a.lexicon.words == m.lexicon.words             # and the lexicon it started from
    r = run_cli("train", "yamls/autoencoder/adapt_decoder_tiny_cpu.yaml", f"out_dir={tmp_path / 'a2'}",
                f"data.path={data}", f"adapt.init_from={tmp_path / 'none'}", "data.clean_shared_memory=false")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("adapt.init_from: ")


def test_missing_shards_is_one_line(tmp_path):
    r = run_cli("train", "yamls/autoencoder/tiny_cpu.yaml", f"out_dir={tmp_path}/o", f"data.path={tmp_path}/none")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("data.path: ") and "index.json" in r.stderr


def test_unknown_task_and_unknown_key_are_one_line(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("task: gan\n")
    r = run_cli("train", str(p))
    assert r.returncode == 2 and r.stderr.strip().startswith(f"{p}: task: expected one of")
    r = run_cli("train", "yamls/autoencoder/tiny_cpu.yaml", "model.d_modl=3")
    assert r.returncode == 2 and "model.d_modl: unknown key" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_evaluation_shuffle_check_separates_a_working_autoencoder():
    """Overfit a tiny autoencoder on 6 poems: greedy accuracy is high, and collapses with shuffled latents."""
    from trainer.evaluation.autoencoder import evaluate_autoencoder
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.tokenizers import train_bpe

    texts = poems(6, 5)
    tok = train_bpe(texts * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    m = LatentAutoencoder(AutoencoderConfig(d_model=64, encoder_layers=1, decoder_layers=1, attention_heads=2,
                                            ffn_dim=128, perceiver_depth=1, reconstruction_depth=1,
                                            max_tokens=24, decoder_token_dropout=0.0), tok)
    fit(m, texts, 250)
    report = evaluate_autoencoder(m, texts, batch_size=6)
    assert report["token_accuracy"] > 0.85 and report["exact_match"] >= 0.5 and report["bleu"] > 50
    assert report["shuffled"]["token_accuracy"] < report["token_accuracy"] - 0.3
    assert report["shuffled"]["exact_match"] <= 1 / 6


def test_evaluate_refuses_empty_texts():
    from trainer.evaluation.autoencoder import evaluate_autoencoder

    with pytest.raises(UserError):
        evaluate_autoencoder("/nonexistent", ["  ", ""])


def test_yamls_load(tmp_path):
    r = run_cli("train", "yamls/autoencoder/tiny_cpu.yaml", "--print-config")
    assert r.returncode == 0 and "decoder_token_dropout_start: 1.0" in r.stdout and "max_duration: 4400ba" in r.stdout
    assert "bow_loss_weight: 1.0" in r.stdout
    r = run_cli("train", "yamls/autoencoder/adapt_decoder_tiny_cpu.yaml", "--print-config")
    assert r.returncode == 0 and "init_from: out/demo/autoencoder/autoencoder" in r.stdout
    r = run_cli("train", "yamls/autoencoder/adapt_decoder_tiny_cpu.yaml", "adapt.prior_mix=0", "--print-config")
    assert r.returncode == 2 and "adapt: prior_mix must be in (0, 1]" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # bart_base.yaml needs a local BART: refused in one line without it, accepted with one.
    r = run_cli("train", "yamls/autoencoder/bart_base.yaml", "--print-config")
    assert r.returncode == 2 and r.stderr.strip().endswith("pretrained_path: path does not exist: 'models/bart-base'")
    r = run_cli("train", "yamls/autoencoder/bart_base.yaml", f"model.pretrained_path={tmp_path}", "--print-config")
    assert r.returncode == 0 and "kind: pretrained" in r.stdout and "freeze_bart: true" in r.stdout
    from trainer.base import config as C
    from trainer.jobs.evaluate_autoencoder import EvalAutoencoderConfig

    cfg = C.load(EvalAutoencoderConfig, "yamls/eval/autoencoder.yaml", [f"autoencoder_dir={tmp_path}",
                                                                         f"data_path={tmp_path}"])
    assert cfg.split == "test" and cfg.n_samples == 500


def test_composer_model_metrics_are_told_apart_after_copying():
    """Composer deep-copies metrics: each copy must still get its own figure (teacher-forced vs greedy)."""
    import copy

    from trainer.training.autoencoder_model import AutoencoderComposerModel
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.tokenizers import train_bpe

    texts = poems(4, 7)
    tok = train_bpe(texts * 5, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    ae = LatentAutoencoder(AutoencoderConfig(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2,
                                             ffn_dim=64, perceiver_depth=1, reconstruction_depth=1, max_tokens=24), tok)
    cm = AutoencoderComposerModel(ae).eval()
    batch = ae.tokenize(texts)
    with torch.no_grad():
        out = cm.eval_forward(batch)
    # A greedy decode that is perfect, so that a mix-up with the (untrained) teacher-forced figure shows.
    out = dict(out, greedy=out["labels"].clamp_min(0))
    metrics = copy.deepcopy(cm.get_metrics(is_train=False))
    for m in metrics.values():
        cm.update_metric(batch, out, m)
    keep = out["labels"] != -100
    tf = ((out["logits"].argmax(-1) == out["labels"]) & keep).sum() / keep.sum()
    greedy = ((out["greedy"] == out["labels"]) & keep).sum() / keep.sum()
    assert greedy == 1.0 and tf < 0.5
    assert torch.isclose(metrics["TokenAccuracy"].compute(), tf)
    assert torch.isclose(metrics["GreedyTokenAccuracy"].compute(), greedy)
    assert torch.isclose(metrics["ReconstructionLoss"].compute(), out["loss"])


def test_train_metrics_do_not_decode(monkeypatch):
    """Composer computes train metrics from the step's outputs every batch: that must not run a greedy decode."""
    from trainer.training.autoencoder_model import AutoencoderComposerModel
    from trainer.models.autoencoder import AutoencoderConfig, LatentAutoencoder
    from trainer.models.tokenizers import train_bpe

    texts = poems(4, 8)
    tok = train_bpe(texts * 5, vocab_size=300, min_frequency=1)
    ae = LatentAutoencoder(AutoencoderConfig(d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2,
                                             ffn_dim=64, perceiver_depth=1, reconstruction_depth=1, max_tokens=24), tok)
    cm = AutoencoderComposerModel(ae)
    calls = []
    real = ae.generate_ids
    monkeypatch.setattr(ae, "generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    batch = ae.tokenize(texts)
    outputs = cm(batch)
    cm.eval()  # Composer's model_eval_mode around the train-metric update
    with torch.no_grad():
        assert "greedy" not in cm.eval_forward(batch, outputs) and calls == []
        assert "greedy" in cm.eval_forward(batch) and calls == [1]


def test_read_texts_reads_compressed_shards_like_the_prep_job_writes(tmp_path):
    from streaming import MDSWriter

    from trainer.data.mds import read_texts

    with MDSWriter(out=str(tmp_path / "train"), columns={"text": "str"}, compression="zstd", size_limit=1 << 10) as w:
        for i in range(50):
            w.write({"text": f"line {i}\nand its echo {i}"})
    assert read_texts(str(tmp_path / "train"), "text", 30) == [f"line {i}\nand its echo {i}" for i in range(30)]
    spread = read_texts(str(tmp_path / "train"), "text", 5, spread=True)
    assert spread == [f"line {i}\nand its echo {i}" for i in (0, 12, 24, 37, 49)]      # evenly over the split
