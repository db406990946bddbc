"""Export a trained denoiser with its autoencoder and prompt encoder; load, sample and decode."""
