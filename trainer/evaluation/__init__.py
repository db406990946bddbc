"""Metrics, each a plain function with a known answer on hand-made inputs."""
