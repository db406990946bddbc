"""`latentverse evaluate CONFIG.yaml`: evaluate an autoencoder or a whole pipeline.

The top-level `task:` key picks the evaluation: `autoencoder` (reconstruction: token accuracy, exact
match, BLEU, and the latent-shuffle check; trainer/jobs/evaluate_autoencoder.py) or `generation` (samples of
an exported pipeline against held-out poems; trainer/jobs/evaluate_generation.py). Each writes report.json
and a PNG into its out_dir. `latentverse evaluate CONFIG.yaml --help` lists the keys of CONFIG's task.
"""
from __future__ import annotations

from trainer.jobs.tasks import Tasks

TASKS = Tasks({"autoencoder": "trainer.jobs.evaluate_autoencoder", "generation": "trainer.jobs.evaluate_generation"},
              default="generation")
config_class, run = TASKS.config_class, TASKS.run
