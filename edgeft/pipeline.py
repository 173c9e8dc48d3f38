"""The chain, in order: data -> train -> merge -> export (GGUF, ONNX) -> bench.

Each stage writes an artifact directory under the run dir, named after the stage so the flow reads
from the folder names. A stage whose artifact id (parent, params, input hashes) already exists is
skipped, so rerunning a recipe only redoes what changed.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.config import apply_overrides, from_dict, load_yaml
from edgeft.constants import EMBEDDED, KIND_ADAPTER
from edgeft.errors import UserError
from edgeft.profile import Profile

# The stage registry: literal and ordered, modules imported only when a stage runs.
STAGES = {
    "data": "edgeft.data",
    "train": "edgeft.stages.train",
    "merge": "edgeft.stages.merge",
    "export_gguf": "edgeft.stages.export_gguf",
    "export_onnx": "edgeft.stages.export_onnx",
    "bench": "edgeft.stages.bench",
}
RECIPE_SECTIONS = {"data": "data", "train": "train", "merge": "merge", "bench": "bench"}  # section -> stage


@dataclass(frozen=True)
class Base:
    model: str = EMBEDDED  # hub id (org/name), local model dir, or 'embedded' (the built-in demo base)
    trust_remote_code: bool = False  # run model code shipped with a hub model; recorded when on
    pretrain_steps: int = 450  # embedded base only: pretraining steps on the manual (~3 min on 2 cores)


def stage(name: str):
    """The module of a registered stage."""
    return importlib.import_module(STAGES[name])


def recipe_schema() -> dict[str, type]:
    """Section name -> Config dataclass, for validation and overrides."""
    schema = {"base": Base}
    schema.update({sec: stage(st).Config for sec, st in RECIPE_SECTIONS.items()})
    return schema


def load_recipe(path: Path, overrides: dict[str, str]) -> dict:
    """Parse a recipe YAML plus `section.key=value` overrides into {section: Config}."""
    schema = recipe_schema()
    raw = load_yaml(path)
    for sec in raw:
        if sec not in schema and sec != "name":
            raise UserError(f"{path}: unknown section '{sec}'; valid sections: name, {', '.join(schema)}")
    raw = apply_overrides(raw, overrides, schema, "override")
    recipe = {sec: from_dict(cls, raw.get(sec), f"{path}:{sec}") for sec, cls in schema.items()}
    recipe["name"] = str(raw.get("name", path.stem))
    return recipe


def export_configs(profile: Profile) -> dict:
    """The export stages a profile asks for, with their configs."""
    out = {}
    if profile.gguf:
        out["export_gguf"] = stage("export_gguf").Config(types=profile.gguf, threads=profile.threads)
    if profile.onnx:
        out["export_onnx"] = stage("export_onnx").Config(types=profile.onnx)
    return out


def run(recipe: dict, profile: Profile, out: Path) -> dict[str, artifact.Artifact]:
    """Run the whole chain into `out`; returns the artifacts by stage name."""
    from edgeft.stages import hf_io

    for sec, st in RECIPE_SECTIONS.items():  # every stage refuses bad values before any stage runs
        validate = getattr(stage(st), "validate", None)
        if validate:
            validate(recipe[sec])
    for name, cfg in export_configs(profile).items():
        stage(name).validate(cfg)
    base_cfg: Base = recipe["base"]
    embedded = base_cfg.model == EMBEDDED
    base_src = None if embedded else hf_io.resolve_model(base_cfg.model)  # fail before writing anything
    if recipe["data"].train == EMBEDDED and not embedded:
        raise UserError("data.train: the embedded data is made for the embedded base; pass data.train=PATH "
                        "with base.model")
    created = not out.exists()
    try:
        arts = _run(recipe, profile, out, base_src)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return arts


def _run(recipe: dict, profile: Profile, out: Path, base_src) -> dict[str, artifact.Artifact]:
    arts = {"data": stage("data").run(None, recipe["data"], out / "data")}
    if base_src is None:
        from edgeft.demo import base as embedded_base

        base_src = embedded_base.ensure(arts["data"], embedded_base.Config(steps=recipe["base"].pretrain_steps))
    tuned = arts["train"] = stage("train").run(base_src, recipe["train"], out / "train", data=arts["data"])
    if tuned.kind == KIND_ADAPTER:
        tuned = arts["merge"] = stage("merge").run(tuned, recipe["merge"], out / "merge")
    exports = []
    for name, cfg in export_configs(profile).items():
        arts[name] = stage(name).run(tuned, cfg, out / name.split("_", 1)[1])
        exports.append(arts[name])
    bench_cfg = dataclasses.replace(recipe["bench"], threads=profile.threads,
                                    max_samples=recipe["bench"].max_samples or profile.bench_samples)
    base_path = base_src.path if isinstance(base_src, artifact.Artifact) else base_src
    arts["bench"] = stage("bench").run(tuned, bench_cfg, out / "bench", data=arts["data"], base=base_path,
                                       exports=exports)
    return arts
