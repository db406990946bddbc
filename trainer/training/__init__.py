"""Composer wrappers, callbacks and checkpoints: everything a training job runs under Composer."""
