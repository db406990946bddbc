"""Diffusion core: EDM preconditioning and loss (with the prompt's mean latent), the Heun sampler,
classifier-free guidance, and DDPM as a sibling formulation with the same call shape. Every denoiser
here wraps a backbone behind the seam described in `trainer/models/denoisers/interface.py`.
Nothing here imports Composer.
"""
