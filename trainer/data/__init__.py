"""MDS shards (writing, reading, ranks) and the streaming loaders of latent shards."""
