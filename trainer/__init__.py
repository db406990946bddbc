"""latentverse trainer: models, diffusion, Composer jobs.

Offline by default: nothing reaches for a model hub unless the user unsets these.
"""
import os

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
