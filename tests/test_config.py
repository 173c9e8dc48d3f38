"""Recipe and profile parsing: typed overrides, unknown keys listed, bad YAML located."""

from pathlib import Path

import pytest

from edgeft import pipeline, profile
from edgeft.config import parse_overrides
from edgeft.errors import UserError
from edgeft.stages import data

REPO = Path(__file__).resolve().parent.parent


def test_overrides_are_typed():
    r = pipeline.load_recipe(REPO / "recipes/tiny.yaml", parse_overrides(
        ["train.epochs=2.5", "train.max_steps=7", "train.use_dora=true", "base.model=org/model",
         "data.train=/x.jsonl"]))
    assert r["train"].epochs == 2.5 and r["train"].max_steps == 7 and r["train"].use_dora is True
    assert r["base"].model == "org/model" and r["data"].train == "/x.jsonl"


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(UserError, match="unknown override key 'train.epoch'.*train.epochs"):
        pipeline.load_recipe(REPO / "recipes/tiny.yaml", {"train.epoch": "2"})
    with pytest.raises(UserError, match="valid sections"):
        pipeline.load_recipe(REPO / "recipes/tiny.yaml", {"nope.x": "2"})


def test_mistyped_values_name_the_key(tmp_path):
    with pytest.raises(UserError, match="train.max_steps: expected int"):
        pipeline.load_recipe(REPO / "recipes/tiny.yaml", {"train.max_steps": "many"})
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(UserError, match="train.lr: expected float"):
        pipeline.load_recipe(bad, {})


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  lr: 1\n bad: [\n")
    with pytest.raises(UserError, match=r"r.yaml:\d+: invalid YAML"):
        pipeline.load_recipe(bad, {})


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "profiles").glob("*.yaml")))
def test_every_profile_loads(name):
    p = profile.load(name)
    assert p.memory_budget_gb <= p.memory_gb and p.bandwidth_gbs > 0


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "recipes").glob("*.yaml")))
def test_every_recipe_loads_and_validates(name):
    recipe = pipeline.load_recipe(REPO / "recipes" / name, {})
    assert recipe["name"] == name.removesuffix(".yaml")
    files = [f for f in (recipe["data"].train, recipe["data"].eval, recipe["data"].manual)
             if f and f != "embedded"]
    missing = [f for f in files if not Path(f).is_file()]  # a dev data set outside this checkout
    if not missing:
        data.validate(recipe["data"])
    else:
        with pytest.raises(UserError, match=f"file not found: {missing[0]}"):
            data.validate(recipe["data"])


def test_profile_overrides_and_unknown_profile():
    p = profile.load("tiny", {"threads": "4", "gguf": "q8_0,q4_k_m", "onnx": ""})
    assert p.threads == 4 and p.gguf == ("q8_0", "q4_k_m") and p.onnx == ()
    with pytest.raises(UserError, match="unknown profile 'nope'; choose one of"):
        profile.load("nope")
    with pytest.raises(UserError, match="unknown key 'speed'"):
        profile.load("tiny", {"speed": "1"})


def test_recipe_export_sections_set_gates_and_the_profile_sets_what_to_build(tmp_path):
    r = pipeline.load_recipe(REPO / "recipes/tiny.yaml", parse_overrides(
        ["export_onnx.min_top1_int8=0.97", "export_gguf.imatrix=true"]))
    prof = profile.load("tiny")
    cfgs = pipeline.export_configs(prof, r)
    assert cfgs["export_onnx"].min_top1_int8 == 0.97 and cfgs["export_onnx"].types == prof.onnx
    assert cfgs["export_onnx"].route == prof.onnx_route
    assert cfgs["export_gguf"].imatrix is True and cfgs["export_gguf"].types == prof.gguf
    assert cfgs["export_gguf"].threads == prof.threads
    assert pipeline.export_configs(prof)["export_onnx"].min_top1_int8 == 0.99  # no recipe: the stage defaults
    with pytest.raises(UserError, match="export_onnx.types is set by the device profile.*profile.onnx"):
        pipeline.load_recipe(REPO / "recipes/tiny.yaml", {"export_onnx.types": "int4"})
    bad = tmp_path / "r.yaml"
    bad.write_text("export_gguf:\n  threads: 8\n")
    with pytest.raises(UserError, match="r.yaml: export_gguf.threads is set by the device profile"):
        pipeline.load_recipe(bad, {})
