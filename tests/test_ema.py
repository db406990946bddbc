"""The EMA of the diffusion model, under a real Composer Trainer, against a hand computation:
ema_k = net_k before ema.start_batch (a copy), then ema_k = d * ema_(k-1) + (1 - d) * net_k."""
import torch
from composer import Trainer
from composer.core import Callback

from trainer.diffusion.edm import EDMConfig, EDMLoss, EDMPrecond
from trainer.models.denoisers import DenoiserConfig, MLPUNetConfig, build_denoiser
from trainer.training.callbacks import EMACallback
from trainer.training.diffusion_model import DiffusionComposerModel

torch.set_num_threads(1)


class NetWeights(Callback):
    """The raw net's weights (and the batch count) after every optimizer step."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def batch_end(self, state, logger):
        self.seen.append((int(state.timestamp.batch),
                          [p.detach().clone() for p in self.model.net.parameters()]))


def test_ema_follows_the_hand_computed_update_over_a_few_steps():
    torch.manual_seed(0)
    decay, start, steps = 0.6, 2, 5
    net = EDMPrecond(build_denoiser(DenoiserConfig(kind="mlp", latent_tokens=4, latent_dim=3, prompt_dim=0,
                                                   mlp=MLPUNetConfig(widths=[16, 8], emb_dim=8))), sigma_data=0.5)
    model = DiffusionComposerModel(net, EDMLoss(EDMConfig(sigma_data=0.5)))
    first = [e.detach().clone() for e in model.ema.parameters()]
    batches = [{"latent": torch.randn(4, 4, 3)} for _ in range(steps)]
    record = NetWeights(model)
    Trainer(model=model, train_dataloader=batches, max_duration=f"{steps}ba", device="cpu",
            device_train_microbatch_size=4, optimizers=torch.optim.SGD(model.parameters(), lr=0.5),
            callbacks=[EMACallback(model, decay, start_batch=start), record], progress_bar=False,
            log_to_console=False, seed=0).fit()

    assert [b for b, _ in record.seen] == list(range(1, steps + 1))
    ema = first
    for b, weights in record.seen:
        d = 0.0 if b < start else decay
        ema = [d * e + (1 - d) * w for e, w in zip(ema, weights)]
    got = list(model.ema.parameters())
    last = record.seen[-1][1]
    # the net moved, so the EMA differs from the last weights by a clear margin; the hand EMA is matched
    assert max(float((g - w).abs().max()) for g, w in zip(got, last)) > 1e-3
    for g, want in zip(got, ema):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6)
