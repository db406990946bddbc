"""Config loading: every refusal is one line naming the file (or command line) and the key path."""
import dataclasses
from typing import Literal, Optional

import pytest
import yaml

from trainer.base import config as C


@dataclasses.dataclass
class Model:
    depth: int = 4
    width: float = 1.0
    kind: Literal["moe_dit", "mlp"] = "moe_dit"
    heads: Optional[int] = None
    weights: Optional[C.ExistingPath] = None


@dataclasses.dataclass
class Data:
    path: C.ExistingPath = "."
    splits: list[str] = dataclasses.field(default_factory=lambda: ["train", "val"])


@dataclasses.dataclass
class Job:
    out_dir: str
    model: Model = dataclasses.field(default_factory=Model)
    data: Data = dataclasses.field(default_factory=Data)
    flag: bool = False


def write(tmp_path, text, name="x.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def one_line_error(fn):
    with pytest.raises(C.ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel:\n  depth: 6\n")
    cfg = C.load(Job, p, ["model.width=2", "flag=true", "data.splits=[train]", "model.heads=8"])
    assert cfg.model.depth == 6 and cfg.model.width == 2.0 and isinstance(cfg.model.width, float)
    assert cfg.flag is True and cfg.data.splits == ["train"] and cfg.model.heads == 8
    assert cfg.model.kind == "moe_dit"  # default kept
    assert "depth: 6" in C.dump(cfg)


def test_floats_written_without_a_dot_are_floats(tmp_path):
    """PyYAML (YAML 1.1) reads 1e-4 and 989e12 as strings; a float key takes them, in a file and on the
    command line, and still refuses a word."""
    p = write(tmp_path, "out_dir: o\nmodel:\n  width: 1e-4\n")
    assert C.load(Job, p).model.width == 1e-4
    assert C.load(Job, p, ["model.width=989e12"]).model.width == 989e12
    assert C.load(Job, p, ["model.width=-2.5E+3"]).model.width == -2500.0
    assert one_line_error(lambda: C.load(Job, p, ["model.width=1e4x"])) == "command line: model.width: expected float, got '1e4x'"


def test_wrong_type_names_file_and_key(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel:\n  depth: twelve\n")
    assert one_line_error(lambda: C.load(Job, p)) == f"{p}: model.depth: expected int, got 'twelve'"


def test_wrong_type_from_override_names_command_line(tmp_path):
    p = write(tmp_path, "out_dir: o\n")
    msg = one_line_error(lambda: C.load(Job, p, ["model.depth=1.5"]))
    assert msg.startswith("command line: model.depth: expected int")


def test_unknown_key(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel:\n  dept: 3\n")
    msg = one_line_error(lambda: C.load(Job, p))
    assert msg.startswith(f"{p}: model.dept: unknown key") and "depth" in msg


def test_missing_required(tmp_path):
    p = write(tmp_path, "model:\n  depth: 3\n")
    assert one_line_error(lambda: C.load(Job, p)) == f"{p}: out_dir: required value missing"


def test_bad_literal(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel:\n  kind: unet\n")
    msg = one_line_error(lambda: C.load(Job, p))
    assert msg.startswith(f"{p}: model.kind: expected one of 'moe_dit', 'mlp'")


def test_unreadable_yaml_names_line(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel: [1, 2\n")
    msg = one_line_error(lambda: C.load(Job, p))
    assert msg.startswith(f"{p}: line ") and "not valid YAML" in msg


def test_missing_yaml_file(tmp_path):
    p = str(tmp_path / "nope.yaml")
    assert one_line_error(lambda: C.load(Job, p)) == f"{p}: no such file"


def test_top_level_not_a_mapping(tmp_path):
    p = write(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in one_line_error(lambda: C.load(Job, p))


def test_path_must_exist(tmp_path):
    p = write(tmp_path, f"out_dir: o\ndata:\n  path: {tmp_path}/missing\n")
    msg = one_line_error(lambda: C.load(Job, p))
    assert msg.startswith(f"{p}: data.path: path does not exist")


def test_bool_is_not_int_and_int_is_not_bool(tmp_path):
    p = write(tmp_path, "out_dir: o\nmodel:\n  depth: true\n")
    assert "expected int" in one_line_error(lambda: C.load(Job, p))
    p = write(tmp_path, "out_dir: o\nflag: 1\n", "y.yaml")
    assert "flag: expected bool" in one_line_error(lambda: C.load(Job, p))


def test_bad_override_syntax():
    assert "expected key=value" in one_line_error(lambda: C.load(Job, None, ["model.depth"]))


def test_nested_list_item_error_names_index(tmp_path):
    p = write(tmp_path, "out_dir: o\ndata:\n  splits: [train, 3]\n")
    assert one_line_error(lambda: C.load(Job, p)) == f"{p}: data.splits[1]: expected str, got 3"


def test_optional_path_keeps_the_existence_message(tmp_path):
    p = write(tmp_path, f"out_dir: o\nmodel:\n  weights: {tmp_path}/none.pt\n")
    assert one_line_error(lambda: C.load(Job, p)).startswith(f"{p}: model.weights: path does not exist")
    p = write(tmp_path, "out_dir: o\nmodel:\n  weights: null\n", "n.yaml")
    assert C.load(Job, p).model.weights is None


# ---------------------------------------------------------------- a nested section's default_factory


@dataclasses.dataclass
class Sampler:
    steps: int = 32
    guidance: float = 1.0
    model: Model = dataclasses.field(default_factory=Model)


@dataclasses.dataclass
class Stage:
    sampler: Sampler = dataclasses.field(default_factory=lambda: Sampler(steps=18, guidance=3.0))
    plain: Sampler = dataclasses.field(default_factory=Sampler)


@dataclasses.dataclass
class Run:
    out_dir: str
    # a factory two levels up that changes a section two levels down
    stage: Stage = dataclasses.field(default_factory=lambda: Stage(plain=Sampler(model=Model(depth=9, kind="mlp"))))
    maybe: Optional[Sampler] = dataclasses.field(default_factory=lambda: Sampler(guidance=2.0))


def test_nested_default_factory_is_the_base_yaml_keys_merge_over(tmp_path):
    cfg = C.load(Run, write(tmp_path, "out_dir: o\n"))
    assert (cfg.stage.sampler.steps, cfg.stage.sampler.guidance) == (18, 3.0)   # the factory's, not Sampler's
    assert (cfg.stage.plain.model.depth, cfg.stage.plain.model.kind) == (9, "mlp")  # the outer factory wins
    assert cfg.maybe.guidance == 2.0 and "guidance: 3.0" in C.dump(cfg)
    p = write(tmp_path, "out_dir: o\nstage:\n  sampler: {steps: 4}\n  plain:\n    model: {width: 2.0}\nmaybe: {steps: 5}\n",
              "y.yaml")
    cfg = C.load(Run, p, ["stage.plain.model.heads=2"])
    assert (cfg.stage.sampler.steps, cfg.stage.sampler.guidance) == (4, 3.0)    # YAML key over the factory
    assert (cfg.stage.plain.model.depth, cfg.stage.plain.model.width, cfg.stage.plain.model.heads) == (9, 2.0, 2)
    assert (cfg.maybe.steps, cfg.maybe.guidance) == (5, 2.0)
    assert C.load(Run, p, ["maybe=null"]).maybe is None
    # an error inside a factory-made section still names the key
    msg = one_line_error(lambda: C.load(Run, p, ["stage.sampler.guidance=high"]))
    assert msg == "command line: stage.sampler.guidance: expected float, got 'high'"


def test_diffusion_yaml_prints_the_sampler_factory_guidance(cli, tmp_path):
    # A diffusion YAML that sets only the sampler's steps: the guidance is the factory's 3.0, not
    # SamplerConfig's own 1.0 (pipelines exported from such a YAML sampled without guidance).
    path = tmp_path / "d.yaml"
    path.write_text("task: diffusion\nsampler: {num_steps: 24}\n")
    r = cli("train", str(path), "--print-config")
    assert r.returncode == 0, r.stderr
    sampler = yaml.safe_load(r.stdout)["sampler"]
    assert (sampler["guidance_scale"], sampler["num_steps"]) == (3.0, 24)


def test_help_lists_the_factory_defaults():
    lines = C.describe(Run)
    assert "stage.sampler.guidance: float = 3.0" in lines and "stage.sampler.steps: int = 18" in lines
    assert "stage.plain.model.depth: int = 9" in lines and "stage.plain.guidance: float = 1.0" in lines
    assert "out_dir: str = (required)" in lines
