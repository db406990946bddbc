"""`latentverse train CONFIG.yaml`: train the autoencoder, the token LM or the diffusion model with Composer.

The top-level `task:` key picks the job: `autoencoder` (trainer/jobs/train_autoencoder.py), `diffusion`
(trainer/jobs/train_diffusion.py) or `token_lm` (trainer/jobs/train_token_lm.py). Without it,
`autoencoder` is assumed. `latentverse train CONFIG.yaml --help` lists the keys of CONFIG's task.
"""
from __future__ import annotations

from trainer.jobs.tasks import Tasks

TASKS = Tasks({"autoencoder": "trainer.jobs.train_autoencoder", "diffusion": "trainer.jobs.train_diffusion",
              "token_lm": "trainer.jobs.train_token_lm"}, default="autoencoder")
config_class, run = TASKS.config_class, TASKS.run
