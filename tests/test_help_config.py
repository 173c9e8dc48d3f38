"""Config help lives in the dataclass fields; `edgeft run --help-config SECTION` prints it."""

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from edgeft import pipeline
from edgeft.config import coerce, field_help, from_dict, help_lines
from edgeft.demo.base import Config as EmbeddedBaseConfig
from edgeft.profile import Profile
from edgeft.stages.base_import import Config as BaseImportConfig

REPO = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(\w+)\.(\w+) \((.+), default (.*?)\): (.+)$")


def _sections() -> dict[str, type]:
    return {**pipeline.recipe_schema(), "profile": Profile}


def _all_config_classes() -> dict[str, type]:
    return {**_sections(), "base_import": BaseImportConfig, "embedded_base": EmbeddedBaseConfig}


def _edgeft(*args):
    env = {**os.environ, "EDGEFT_HOME": str(REPO / ".edgeft-home")}
    return subprocess.run([sys.executable, "-m", "edgeft.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env=env)


@pytest.mark.parametrize("section", sorted(_all_config_classes()))
def test_every_config_field_has_help(section):
    cls = _all_config_classes()[section]
    missing = [f.name for f in dataclasses.fields(cls) if not field_help(f)]
    assert not missing, f"{section}: fields without help (use opt(default, 'help')): {missing}"


@pytest.mark.parametrize("section", sorted(_sections()))
def test_help_lines_show_the_real_type_and_default(section):
    cls = _sections()[section]
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    lines = help_lines(cls, section)
    assert len(lines) == len(fields)
    for f, line in zip(fields, lines):
        m = LINE.match(line)
        assert m, line
        sec, key, typ, default, text = m.groups()
        assert (sec, key, typ, text) == (section, f.name, f.type, field_help(f))
        # the shown default, written into a YAML recipe, is the field's real default
        assert coerce(yaml.safe_load(default), hints[f.name], key) == f.default, line


@pytest.mark.parametrize("section", sorted(_sections()))
def test_metadata_fields_round_trip_through_from_dict(section):
    cls = _sections()[section]
    assert from_dict(cls, dataclasses.asdict(cls()), section) == cls()


def test_help_config_train_prints_every_key_with_its_default():
    proc = _edgeft("run", "--help-config", "train")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    cls = pipeline.recipe_schema()["train"]
    hints = typing.get_type_hints(cls)
    shown = {}
    for line in lines:
        m = LINE.match(line)
        assert m and m.group(1) == "train", line
        shown[m.group(2)] = m
    assert list(shown) == [f.name for f in dataclasses.fields(cls)]
    for f in dataclasses.fields(cls):
        m = shown[f.name]
        assert m.group(3) == f.type
        assert coerce(yaml.safe_load(m.group(4)), hints[f.name], f.name) == f.default
        assert m.group(5) == field_help(f)
    assert "train.lr (float, default 0.0002): " in proc.stdout  # what a user reads for lr = 2e-4


def test_help_config_without_a_section_lists_them_and_needs_no_recipe():
    proc = _edgeft("run", "--help-config")
    assert proc.returncode == 0, proc.stderr
    for name in _sections():
        assert re.search(rf"^\s+{name}\s", proc.stdout, re.M), name


def test_help_config_unknown_section_is_a_one_line_error():
    proc = _edgeft("run", "--help-config", "trian")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgeft: error: --help-config: unknown section 'trian'")
    assert "valid sections: " in lines[0] and all(name in lines[0] for name in _sections())
    assert proc.stdout == ""


def test_run_still_requires_recipe_and_out():
    proc = _edgeft("run", "--out", "x")
    assert proc.returncode == 2 and "the following arguments are required: --recipe" in proc.stderr
