"""Composer wrappers around the plain-PyTorch models (the models themselves never import Composer)."""
from __future__ import annotations

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from trainer.models.autoencoder import LatentAutoencoder


# ---------------------------------------------------------------- autoencoder

class ReconstructionTokenAccuracy(Metric):
    """Share of real (non-pad) tokens reproduced exactly, position by position.

    Fed either teacher-forced argmax predictions or greedy decodes padded/cut to the label length.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        keep = labels != -100
        self.correct += ((preds == labels) & keep).sum().float()
        self.total += keep.sum().float()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp_min(1)


class ReconstructionLoss(Metric):
    """Mean token cross-entropy on the eval split (teacher-forced)."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss: torch.Tensor, n: torch.Tensor) -> None:
        self.sum += loss.detach().float() * n
        self.count += n

    def compute(self) -> torch.Tensor:
        return self.sum / self.count.clamp_min(1)


def align_to_labels(generated: torch.Tensor, labels: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Greedy ids [B, G] -> [B, T] to compare with labels [B, T]: cut or padded (a pad never matches)."""
    B, T = labels.shape
    out = generated.new_full((B, T), pad_id)
    n = min(T, generated.shape[1])
    out[:, :n] = generated[:, :n]
    return out


class GreedyTokenAccuracy(ReconstructionTokenAccuracy):
    """Token accuracy of the greedy decode from the latent (not teacher-forced)."""


class AutoencoderComposerModel(ComposerModel):
    """Trains a LatentAutoencoder: batch = {'input_ids', 'attention_mask'}; loss = reconstruction CE.

    Eval metrics: loss and token accuracy teacher-forced, and (if `greedy_eval`) token accuracy of the
    greedy decode from the latent -- the figure that says whether the decoder really reads the latent.
    """

    def __init__(self, autoencoder: LatentAutoencoder, greedy_eval: bool = True):
        super().__init__()
        self.autoencoder = autoencoder
        self.greedy_eval = greedy_eval
        self.train_acc = ReconstructionTokenAccuracy()
        self.val_metrics = {"ReconstructionLoss": ReconstructionLoss(),
                            "TokenAccuracy": ReconstructionTokenAccuracy()}
        if greedy_eval:
            self.val_metrics["GreedyTokenAccuracy"] = GreedyTokenAccuracy()
        self.val_metrics = torch.nn.ModuleDict(self.val_metrics)

    def forward(self, batch: dict) -> dict:
        return self.autoencoder(batch["input_ids"], batch["attention_mask"])

    def loss(self, outputs: dict, batch: dict) -> torch.Tensor:
        return outputs["loss"]

    def eval_forward(self, batch: dict, outputs=None) -> dict:
        # Composer calls eval_forward(batch, outputs) for the train metrics on EVERY training batch (under
        # model_eval_mode, so self.training is False there): a greedy decode there would cost more than the
        # step itself. Only the eval loop calls it without outputs; only there do we decode.
        if outputs is not None:
            return outputs
        out = self.forward(batch)
        if self.greedy_eval:
            labels = out["labels"]
            gen = self.autoencoder.generate_ids(out["latents"], max_length=labels.shape[1])
            out = dict(out, greedy=align_to_labels(gen, labels, self.autoencoder.tokenizer.pad_token_id))
        return out

    def get_metrics(self, is_train: bool = False) -> dict:
        return {"TokenAccuracy": self.train_acc} if is_train else dict(self.val_metrics)

    def update_metric(self, batch: dict, outputs: dict, metric: Metric) -> None:
        labels = outputs["labels"]
        if isinstance(metric, ReconstructionLoss):
            # The reconstruction term alone, so runs with and without an auxiliary loss compare.
            metric.update(outputs.get("reconstruction_loss", outputs["loss"]), (labels != -100).sum())
        elif isinstance(metric, GreedyTokenAccuracy):
            # Composer deep-copies metrics, so they are told apart by type, never by identity.
            metric.update(outputs["greedy"], labels)
        else:  # teacher-forced
            metric.update(outputs["logits"].argmax(-1), labels)
