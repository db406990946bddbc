"""A chain run YAML: the whole pipeline as dependent jobs from one file, each stage fed by the one before.

    out_dir: out/chain                    # every stage writes <out_dir>/<stage name>
    compute: {backend: slurm, nodes: 4, gpus: 8, partition: gpu}   # the default of every stage
    stages:
      - {name: prep, job: prep, job_yaml: yamls/prep/bundled.yaml, compute: {nodes: 1, gpus: 0}}
      - name: autoencoder
        job: train
        job_yaml: yamls/autoencoder/bart_base.yaml
        inputs: {data.path: prep}         # key -> <stage>[/<path in its out_dir>]
      - name: pretrain_masked
        ...
        inputs: {data.path: encode/train, autoencoder: autoencoder/autoencoder}

    latentverse launch CHAIN.yaml [--dry-run] [key=value ...]

A stage is a run YAML's job part (`job`, `job_yaml`, `overrides`, inline keys) plus `inputs` (config
keys filled with the out_dir of an earlier stage, or a path in it) and `compute` (over the chain's).
The preflight, before anything is written or submitted, loads every stage's typed config (the job's
own config class) and checks that every input path exists or is made by an earlier stage; it refuses
otherwise in one line naming the stage and the key. Then slurm submits one sbatch per stage, each
`--dependency=afterok:<the stage before>` (a requeued job keeps its id, so the chain waits for it);
local (and the other backends started from here) runs the stages in order on this machine. The job
ids and out_dirs go to <out_dir>/chain.json. `--dry-run` prints the plan and starts nothing.

Failures: a Slurm job is submitted requeueable; a node that dies makes Slurm requeue the job, and a
time-limit / preemption warning (USR1) makes the training job checkpoint and requeue itself (see
launch/backends.py); either way the job resumes from its last complete checkpoint (autoresume) and
the stages after it keep waiting. A stage that fails for another reason cancels the rest
(--kill-on-invalid-dep); after a fix, the same command runs the chain again and every finished
stage skips its work.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
from typing import Any, Optional

from launch import launcher as L
from launch.compute import ComputeConfig
from launch.run_yaml import Run, RunSpec, nest
from trainer.base import config as C
from trainer.base.files import write_json_atomic
from trainer.base.log import get_logger

log = get_logger("chain")

# What a stage makes under its out_dir (relative paths; "" is the out_dir itself); a path below one of
# these folders counts as made too. The key is the job, or job/task for the jobs with a `task:` key.
PRODUCTS = {
    "prep": ["", "train", "val", "test"],
    "encode": ["", "train", "val", "test"],
    "train/autoencoder": ["autoencoder", "checkpoints"],
    "train/token_lm": ["latent_encoder", "poem_lm", "checkpoints"],
    "train/diffusion": ["denoiser", "pipeline", "checkpoints"],
    "evaluate/autoencoder": ["report.json"],
    "evaluate/generation": ["report.json"],
}
DEFAULT_TASK = {"train": "autoencoder", "evaluate": "generation"}
# The config keys that name a job's input paths; each that is set must exist or be made earlier.
INPUT_KEYS = {
    "prep": ["data.path"],
    "encode": ["data.path", "autoencoder"],
    "train": ["data.path", "data.root", "data.eval_path", "autoencoder", "load_path", "adapt.init_from",
              "model.pretrained_path"],
    "evaluate": ["pipeline", "token_lm", "latent_data", "autoencoder", "autoencoder_dir", "data_path"],
}


@dataclasses.dataclass
class StageSpec:
    name: str
    job: str
    job_yaml: Optional[str] = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)     # key -> <stage>[/<path>]
    compute: dict[str, Any] = dataclasses.field(default_factory=dict)    # over the chain's compute
    job_keys: dict[str, Any] = dataclasses.field(default_factory=dict)   # inline job keys (filled by load)


@dataclasses.dataclass
class Stage:
    spec: StageSpec
    out_dir: str          # absolute
    products: list[str]
    run: Run
    plan: Any = None      # backends.Plan


STAGE_KEYS = {f.name for f in dataclasses.fields(StageSpec)} - {"job_keys"}


def is_chain(path: str) -> bool:
    return os.path.isfile(path) and "stages" in C.read_yaml(path)


def product_key(job: str, job_data: dict) -> str:
    return f"{job}/{job_data.get('task', DEFAULT_TASK[job])}" if job in DEFAULT_TASK else job


def _dotted(cfg: Any, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def load_stages(path: str, overrides: list[str] = ()) -> list[Stage]:
    """The chain YAML (+ key=value over it) -> stages with their job data; inputs resolved, not checked."""
    from launch.cli import JOBS

    raw = C.merge(C.read_yaml(path), C.parse_overrides(overrides))
    unknown = set(raw) - {"out_dir", "compute", "stages"}
    if unknown:
        raise C.ConfigError(f"{path}: {sorted(unknown)[0]}: unknown key; a chain has out_dir, compute and stages")
    if not raw.get("out_dir") or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise C.ConfigError(f"{path}: out_dir and a non-empty list of stages are required")
    root = os.path.abspath(raw["out_dir"])
    jobs = [j for j in JOBS if j not in ("launch", "demo")]
    stages: list[Stage] = []
    for i, item in enumerate(raw["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(item, dict):
            raise C.ConfigError(f"{where}: expected a mapping with name and job")
        known = {k: v for k, v in item.items() if k in STAGE_KEYS}
        spec = C.from_dict(StageSpec, known, source=where)
        spec.job_keys = {k: v for k, v in item.items() if k not in STAGE_KEYS}
        where = f"{path}: stage {spec.name}"
        if spec.job not in jobs:
            raise C.ConfigError(f"{where}: job: expected one of {', '.join(jobs)}, got {spec.job!r}")
        if spec.name in {s.spec.name for s in stages} or "/" in spec.name:
            raise C.ConfigError(f"{where}: name: must be unique and without '/'")
        if spec.job_yaml and not os.path.exists(spec.job_yaml):
            raise C.ConfigError(f"{where}: job_yaml: path does not exist: {spec.job_yaml!r}")
        out_dir = os.path.join(root, spec.name)
        data = C.read_yaml(spec.job_yaml) if spec.job_yaml else {}
        data = C.merge(C.merge(data, spec.job_keys), nest(spec.overrides))
        data = C.merge(data, nest({k: resolve(where, k, ref, stages) for k, ref in spec.inputs.items()}))
        data["out_dir"] = out_dir
        cc = C.from_dict(ComputeConfig, C.merge(raw.get("compute") or {}, spec.compute), source=f"{where}: compute")
        cc.job_name = cc.job_name or f"latentverse-{spec.name}"
        run = Run(path=f"{where}", spec=RunSpec(job=spec.job, compute=cc), job_data=data, cli_keys=set())
        products = PRODUCTS.get(product_key(spec.job, data), [""])
        stages.append(Stage(spec, out_dir, products, run))
    return stages


def resolve(where: str, key: str, ref: str, earlier: list[Stage]) -> str:
    """`<stage>[/<path>]` -> the absolute path, refused unless an earlier stage makes it."""
    name, _, rel = str(ref).partition("/")
    by_name = {s.spec.name: s for s in earlier}
    if name not in by_name:
        raise C.ConfigError(f"{where}: inputs.{key}: {ref!r} names no earlier stage "
                            f"(earlier: {', '.join(by_name) or 'none'})")
    stage = by_name[name]
    if not makes(stage, rel):
        raise C.ConfigError(f"{where}: inputs.{key}: stage {name} ({product_key(stage.spec.job, stage.run.job_data)}) "
                            f"makes {', '.join(repr(p) for p in stage.products)} in its out_dir, not {rel!r}")
    return os.path.join(stage.out_dir, rel) if rel else stage.out_dir


def makes(stage: Stage, rel: str) -> bool:
    rel = os.path.normpath(rel) if rel else ""
    return any(rel == p or (p and rel.startswith(p + "/")) for p in stage.products)


def made_by(stages: list[Stage], path: str) -> Optional[Stage]:
    """The stage among `stages` whose out_dir holds `path` and which makes it (None: none does)."""
    path = os.path.abspath(path)
    for s in stages:
        if path == s.out_dir or path.startswith(s.out_dir + "/"):
            return s if makes(s, os.path.relpath(path, s.out_dir) if path != s.out_dir else "") else None
    return None


def preflight(stages: list[Stage], dry_run: bool = False) -> None:
    """Every stage's typed config and compute block checked, every input existing or made earlier, and
    every stage's plan (files, commands) built; nothing written. Refuses in one line."""
    from launch.cli import config_class, load_job_module

    for i, st in enumerate(stages):
        earlier = stages[:i]
        where = st.run.path

        def made(p, earlier=earlier):
            return made_by(earlier, p) is not None

        with C.paths_made_earlier(made):
            cls = config_class(load_job_module(st.spec.job), st.run.job_data)
            cfg = C.from_dict(cls, st.run.job_data, source=where)
            st.plan = L.build(st.run, dry_run=dry_run)
        for key in INPUT_KEYS.get(st.spec.job, []):
            value = _dotted(cfg, key)
            if not value or not isinstance(value, str):
                continue
            if os.path.exists(value) or made(value):
                continue
            later = made_by(stages[i:], value)
            why = f"made by stage {later.spec.name}, which runs after it" if later else \
                "does not exist and no earlier stage makes it"
            raise C.ConfigError(f"{where}: {key}: {value!r} {why}")


def describe(stages: list[Stage]) -> str:
    out = [f"# chain of {len(stages)} stages; each starts when the one before has succeeded"]
    for k, st in enumerate(stages):
        cc = st.run.spec.compute
        inputs = ", ".join(f"{key} <- {ref}" for key, ref in st.spec.inputs.items()) or "none"
        out += [f"# ---- stage {k + 1}/{len(stages)}: {st.spec.name} (latentverse {st.spec.job}), "
                f"out_dir {st.out_dir}; inputs: {inputs}", L.describe(st.plan, cc)]
    return "\n".join(out)


def submit_all(stages: list[Stage], record: dict) -> int:
    """sbatch every stage, each after the one before (afterok); the ids into `record`."""
    prev = None
    for st in stages:
        (cmd,) = st.plan.commands
        argv = [cmd.argv[0], "--parsable", *([f"--dependency=afterok:{prev}", "--kill-on-invalid-dep=yes"]
                                             if prev else []), *cmd.argv[1:]]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            log.error(f"stage {st.spec.name}: {shlex.join(argv)} failed: {r.stderr.strip()}")
            return r.returncode
        prev = r.stdout.strip().split(";")[0]
        record["stages"][st.spec.name]["job_id"] = prev
        print(f"stage {st.spec.name}: slurm job {prev}")
    return 0


def run_all(stages: list[Stage]) -> int:
    """Each stage's launchers on this machine, in order; the first failure stops the chain."""
    for k, st in enumerate(stages, 1):
        log.info(f"stage {st.spec.name} ({k}/{len(stages)}): latentverse {st.spec.job}")
        rc = L.run_commands(st.plan, os.path.dirname(st.plan.job_yaml))
        if rc:
            log.error(f"stage {st.spec.name} failed ({rc}); the stages after it did not run")
            return rc
    return 0


def launch_chain(args) -> int:
    stages = load_stages(args.run, args.overrides)
    if args.node_rank is not None:
        raise C.ConfigError("command line: --node-rank: not for a chain")
    preflight(stages, dry_run=args.dry_run)
    if args.dry_run:
        print(describe(stages))
        return 0
    backends_used = {st.plan.backend for st in stages}
    if "slurm" in backends_used and backends_used != {"slurm"}:
        raise C.ConfigError(f"{args.run}: compute.backend: a chain is either all slurm or all started from here")
    root = os.path.dirname(stages[0].out_dir)
    record = {"chain": os.path.abspath(args.run), "stages": {
        st.spec.name: {"job": st.spec.job, "out_dir": st.out_dir, "job_yaml": st.plan.job_yaml} for st in stages}}
    for st in stages:
        L.write_files(st.plan.files, keep=st.plan.job_yaml)
    os.makedirs(root, exist_ok=True)
    try:
        if backends_used == {"slurm"}:
            return submit_all(stages, record)
        return run_all(stages)
    finally:
        write_json_atomic(os.path.join(root, "chain.json"), record)


# `latentverse launch`: a chain YAML (`stages:`) here, a run YAML (one job) through launch/launcher.py.
add_arguments = L.add_arguments


def main(args) -> int:
    return launch_chain(args) if is_chain(args.run) else L.main(args)
