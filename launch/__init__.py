"""latentverse launch: turn a run YAML into a local, Composer, torchrun, SLURM or DeepSpeed job."""
import trainer  # noqa: F401  (sets the offline defaults)
