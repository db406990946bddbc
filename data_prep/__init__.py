"""latentverse data_prep: corpus readers, cleaning, text shards, the encode job."""
import trainer  # noqa: F401  (sets the offline defaults)
