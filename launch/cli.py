"""The one command line: `latentverse JOB [CONFIG] [key=value ...]`.

Each job is a thin entry over an importable library module that exposes either
  CONFIG (a dataclass, or config_class(raw_yaml_dict) -> dataclass) and run(cfg), or
  add_arguments(parser) and main(args) for jobs whose command line is not a config (generate).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

import trainer  # noqa: F401  (offline defaults)
from trainer.base import config as C


@dataclasses.dataclass(frozen=True)
class Job:
    module: str
    help: str


JOBS: dict[str, Job] = {
    "prep": Job("data_prep.prep_job", "poem corpora -> cleaned, split text shards (MDS)"),
    "train": Job("trainer.jobs.train", "train the autoencoder, the token LM or the diffusion model with Composer"),
    "encode": Job("data_prep.encode_job", "text shards -> latent shards with prompt embeddings"),
    "generate": Job("trainer.jobs.generate", "generate poems from a prompt with an exported pipeline"),
    "evaluate": Job("trainer.jobs.evaluate", "evaluate an autoencoder or a pipeline; writes report.json and a PNG"),
    "launch": Job("launch.chain", "start or submit a multi-process / multi-node job (run YAML) or a chain of them"),
    "demo": Job("launch.demo", "the end-to-end demo: every stage, on the bundled corpus or your poems"),
}


def load_job_module(name: str):
    return importlib.import_module(JOBS[name].module)


def config_class(module, raw: dict) -> type:
    if hasattr(module, "config_class"):
        return module.config_class(raw)
    return module.CONFIG


def load_config(module, path: str | None, overrides: list[str]) -> Any:
    """The job's checked config: YAML + overrides, refused with one line before any work."""
    extra = C.parse_overrides(overrides)
    raw = C.merge(C.read_yaml(path) if path else {}, extra)
    try:
        cls = config_class(module, raw)
    except C.KeyProblem as e:
        top = e.key.split(".")[0].split("[")[0]
        raise C.ConfigError(f"{'command line' if top in extra or not path else path}: {e}") from None
    return C.load(cls, path, overrides)


def _top_help() -> str:
    lines = ["usage: latentverse JOB [CONFIG] [key=value ...] [--print-config]", "", "jobs:"]
    lines += [f"  {n:<9} {j.help}" for n, j in JOBS.items()]
    lines += ["", "`latentverse JOB --help` shows a job's options and config keys."]
    return "\n".join(lines)


def _config_in(args: list[str]) -> str | None:
    """The YAML among a command line's arguments, if any (it picks the task whose keys --help lists)."""
    return next((a for a in args if not a.startswith("-") and "=" not in a and os.path.isfile(a)), None)


def _job_parser(name: str, module, config: str | None = None) -> argparse.ArgumentParser:
    doc = (module.__doc__ or JOBS[name].help).strip()
    p = argparse.ArgumentParser(prog=f"latentverse {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if hasattr(module, "add_arguments"):
        module.add_arguments(p)
        return p
    p.add_argument("config", nargs="?", help="job YAML (optional: the dataclass defaults are used without it)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. model.depth=4")
    p.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    try:  # the keys of the task the YAML selects (`latentverse train DIFFUSION.yaml --help`)
        cls = config_class(module, C.read_yaml(config) if config else {})
    except C.UserError:
        cls = getattr(module, "CONFIG", None)
    if cls is not None:
        p.epilog = (f"config keys of {cls.__name__} (key: type = default):\n  " + "\n  ".join(C.describe(cls)))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in JOBS:
        print(f"latentverse: unknown job {name!r}; jobs: {', '.join(JOBS)}", file=sys.stderr)
        return 2
    module = load_job_module(name)
    parser = _job_parser(name, module, _config_in(rest))
    args = parser.parse_args(rest)
    try:
        if hasattr(module, "add_arguments"):
            return int(module.main(args) or 0)
        # A config given as key=value only (no YAML) lands in `config`: move it to the overrides.
        if args.config is not None and "=" in args.config and not os.path.exists(args.config):
            args.overrides.insert(0, args.config)
            args.config = None
        cfg = load_config(module, args.config, args.overrides)
        if args.print_config:
            print(C.dump(cfg), end="")
            return 0
        module.run(cfg)
        return 0
    except C.UserError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"latentverse {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
