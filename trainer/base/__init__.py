"""Ground floor: typed config, logging, atomic files, package data, shard schemas and file names, plots."""
