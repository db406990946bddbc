"""A run YAML = a job YAML + where to run it. Split it into the compute block and the job's own config.

    job: train                                  # which `latentverse JOB` every process runs
    job_yaml: yamls/autoencoder/bart_base.yaml  # optional base job YAML
    overrides: {trainer.max_duration: 10ba}     # optional, over the base (dotted or nested keys)
    compute: {backend: slurm, nodes: 4, gpus: 8, partition: gpu}
    out_dir: out/ae                             # any other top-level key is a job key (inline)

The job part is, from weakest to strongest: job_yaml, inline keys, `overrides:`, then command-line
`key=value` that are not run keys. `compute` and `job` are stripped: the job's typed loader refuses
unknown keys. Command-line `compute.*`, `job`, `job_yaml` change the run itself.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from launch.compute import ComputeConfig
from trainer.base import config as C

RUN_KEYS = ("job", "job_yaml", "overrides", "compute")


@dataclasses.dataclass
class RunSpec:
    job: str
    job_yaml: Optional[str] = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)


@dataclasses.dataclass
class Run:
    path: str                 # the run YAML
    spec: RunSpec
    job_data: dict            # the job's config mapping, merged, without run keys
    cli_keys: set[str]        # dotted keys set on the command line (for error attribution)


def nest(d: dict) -> dict:
    """{'a.b': 1, 'c': {'d.e': 2}} -> {'a': {'b': 1}, 'c': {'d': {'e': 2}}}"""
    out: dict = {}
    for k, v in d.items():
        v = nest(v) if isinstance(v, dict) else v
        parts = str(k).split(".")
        for part in reversed(parts[1:]):
            v = {part: v}
        out = C.merge(out, {parts[0]: v})
    return out


def load_run(path: str, overrides: list[str] = ()) -> Run:
    """Read, merge and check the run part; the job part is checked by the job's own config class."""
    from launch.cli import JOBS

    raw = C.read_yaml(path)
    extra = C.parse_overrides(overrides)
    cli_keys = C._paths(extra)
    merged = C.merge(raw, extra)
    spec = C.from_dict(RunSpec, {k: merged[k] for k in RUN_KEYS if k in merged}, source=path, cli_keys=cli_keys)
    jobs = [j for j in JOBS if j not in ("launch", "demo")]
    if spec.job not in jobs:
        src = "command line" if "job" in cli_keys else path
        raise C.ConfigError(f"{src}: job: expected one of {', '.join(jobs)}, got {spec.job!r}")

    if spec.job_yaml and not os.path.exists(spec.job_yaml):
        src = "command line" if "job_yaml" in cli_keys else path
        raise C.ConfigError(f"{src}: job_yaml: path does not exist: {spec.job_yaml!r}")
    job_data = C.read_yaml(spec.job_yaml) if spec.job_yaml else {}
    for k in RUN_KEYS:
        if spec.job_yaml and k in job_data:
            raise C.ConfigError(f"{spec.job_yaml}: {k}: a run key in a job YAML; "
                                f"job_yaml must name a plain job YAML")
    job_data = C.merge(job_data, {k: v for k, v in raw.items() if k not in RUN_KEYS})
    job_data = C.merge(job_data, nest(spec.overrides))
    job_data = C.merge(job_data, {k: v for k, v in extra.items() if k not in RUN_KEYS})
    return Run(path=path, spec=spec, job_data=job_data, cli_keys=cli_keys)
