"""The keys every training job shares (trainer/training/job.py, trainer/training/reporting.py), through
the one skeleton `run_training` with a real Composer Trainer on a tiny least-squares job: gradient
accumulation gives the same updates as the whole batch, save_folder takes the checkpoints and
autoresume reads them back, loggers (TensorBoard, W&B offline, MLflow on a file store) receive the
metrics, console lines replace progress bars off a terminal, and bad keys are one-line errors."""
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from torch.utils.data import DataLoader, TensorDataset

from trainer.base import config as C
from trainer.base.config import ConfigError
from trainer.training.job import Parts, TrainingConfig, TrainingJob, run_training

g = torch.Generator().manual_seed(0)
X = torch.randn(64, 6, generator=g)
Y = X @ torch.randn(6, 1, generator=g) + 0.1 * torch.randn(64, 1, generator=g)


class LeastSquares(ComposerModel):
    """A linear model whose loss is the mean over the samples of a (micro)batch, and a record of the
    sizes of the batches it was called with."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = torch.nn.Linear(6, 1)
        self.seen: list[int] = []

    def forward(self, batch):
        self.seen.append(len(batch[0]))
        return self.lin(batch[0])

    def loss(self, outputs, batch):
        return F.mse_loss(outputs, batch[1])


class TinyJob(TrainingJob):
    export_name, export_marker = "export", "weights.pt"

    def build(self, world, per_rank):
        self.model = LeastSquares()
        return Parts(self.model, DataLoader(TensorDataset(X, Y), batch_size=per_rank), final_eval=False)

    def export(self, trainer, parts, summary):
        os.makedirs(self.export_dir, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in parts.model.state_dict().items()},
                   os.path.join(self.export_dir, self.export_marker))


def train(out, *overrides):
    cfg = C.from_dict(TrainingConfig, C.parse_overrides(
        [f"out_dir={out}", "threads=1", "optim.warmup=0ba", "optim.lr=0.05", "optim.grad_clip_norm=0",
         "max_duration=4ba", "save_interval=100ba", *overrides]))
    job = TinyJob(cfg)
    summary = run_training(job)
    return job, summary, torch.load(os.path.join(job.export_dir, "weights.pt"))


def max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_microbatches_make_the_same_updates_as_the_whole_batch(tmp_path):
    whole, _, w_whole = train(tmp_path / "whole", "global_train_batch_size=8")
    micro, _, w_micro = train(tmp_path / "micro", "global_train_batch_size=8", "device_train_microbatch_size=2")
    alias, _, w_alias = train(tmp_path / "alias", "batch_size=8")
    small, _, w_small = train(tmp_path / "small", "global_train_batch_size=2")
    assert whole.model.seen == [8] * 4 and micro.model.seen == [2] * 16
    # fp32: the runs differ only in how the gradient of the 8 samples is summed (one mean, or four
    # means of 2 weighted 1/4 by Composer), a few ulp (~1e-7 relative); AdamW's step m/sqrt(v) does not
    # grow that, so 4 steps of lr 0.05 move the weights apart by well under 1e-5 ...
    assert max_diff(w_whole, w_micro) < 1e-5
    assert max_diff(w_whole, w_alias) == 0
    # ... while other updates (4 batches of 2 instead of 8) move them by far more than the tolerance.
    assert max_diff(w_whole, w_small) > 1e-3


def test_save_folder_holds_the_checkpoints_and_autoresume_reads_them(tmp_path):
    folder = tmp_path / "elsewhere" / "ckpts"
    job, summary, _ = train(tmp_path / "run", f"save_folder={folder}", "save_interval=2ba", "global_train_batch_size=8")
    assert sorted(os.path.basename(p) for p in glob.glob(str(folder / "ep*"))) == ["ep0-ba2-rank0.pt",
                                                                                  "ep0-ba4-rank0.pt"]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
    os.remove(os.path.join(job.export_dir, "weights.pt"))       # train on: 4 more batches from ba4
    job, summary, _ = train(tmp_path / "run", f"save_folder={folder}", "save_interval=2ba",
                            "global_train_batch_size=8", "max_duration=8ba")
    assert summary["batches"] == 8 and job.model.seen == [8] * 4


def test_console_lines_instead_of_progress_bars_off_a_terminal(tmp_path, capfd):
    train(tmp_path / "a", "global_train_batch_size=8", "log_interval=2")
    err = capfd.readouterr().err
    assert "[batch=2/4]" in err and "[batch=4/4]" in err and "[batch=3/4]" not in err   # (Composer adds the 1st)
    assert "Train loss/train/total" in err
    assert "it/s" not in err and "ba/s" not in err       # no tqdm bar
    train(tmp_path / "b", "global_train_batch_size=8", "progress_bar=true", "console_log_interval=1ba")
    err = capfd.readouterr().err
    assert "[batch=" not in err                           # a bar chosen: lines off unless asked for


def test_loggers_tensorboard_wandb_offline_mlflow_file_store(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")   # MLflow 3 wants a database unless told so
    uri = (tmp_path / "mlruns").as_uri()
    out = tmp_path / "run"
    train(out, "global_train_batch_size=8", "run_name=keys", "tensorboard=true",
          "loggers.wandb={project: latentverse-test}",
          f"loggers.mlflow={{tracking_uri: '{uri}', experiment_name: poems, synchronous: true, "
          "log_system_metrics: false}", "callbacks.optimizer_monitor={batch_log_interval: 2}")
    assert glob.glob(str(out / "tensorboard" / "**" / "events.out.tfevents*"), recursive=True)
    assert glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("poems").experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "loss/train/total")) == 4
    # callbacks.optimizer_monitor with its kwargs: every 2nd batch
    assert [m.step for m in client.get_metric_history(run.info.run_id, "l2_norm/grad/global")] == [2, 4]


@pytest.mark.parametrize("override, message", [
    ("loggers.neptune={}", "loggers.neptune: unknown logger; known: tensorboard, wandb, mlflow"),
    ("loggers.tensorboard={logdir: x}", "loggers.tensorboard.logdir: TensorboardLogger takes no such keyword"),
    ("callbacks.speedmonitor={}", "callbacks.speedmonitor: unknown callback; known: "),
    ("callbacks.sample_index_log={}", "callbacks.sample_index_log: unknown callback"),  # the diffusion job's own
    ("callbacks.speed_monitor={window: 3}", "callbacks.speed_monitor.window: SpeedMonitor takes no such keyword"),
])
def test_bad_keys_are_one_line_errors_before_any_work(tmp_path, override, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("(", r"\(")) as e:
        train(tmp_path / "bad", override)
    assert "\n" not in str(e.value)
    assert os.listdir(tmp_path / "bad") == []


def test_batch_size_and_its_new_name_disagreeing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="batch_size \\(4\\) and global_train_batch_size \\(8\\) are one key"):
        C.from_dict(TrainingConfig, {"batch_size": 4, "global_train_batch_size": 8})
    with pytest.raises(ConfigError, match="device_train_microbatch_size: 16 is more than a rank's 8 samples"):
        train(tmp_path, "global_train_batch_size=8", "device_train_microbatch_size=16")
