"""Plain-PyTorch models (never import Composer here)."""
