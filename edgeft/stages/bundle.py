"""The bundle stage (`edgeft export`): pre-flight, build the profile's variants, bench them here, select, bundle.

`edgeft export --profile jetson --from runs/demo --out dist/jetson` takes the tuned hf artifact of a
run (or an hf artifact dir), walks the profile's quant ladder through the pre-flight (variants that
cannot fit the device are refused before anything is built), builds the rest with the export stages,
benches them with the bench stage, picks one with the bench gate (edgeft.bench.select) and writes
the bundle: the chosen model with its tokenizer, the manual text for retrieval, the bench report,
bundle.json (what to run and how), a README for the field team and a runner script. The bundle is
an artifact like any other: built in a staging dir, manifest (sha256 of every file) written last,
renamed into place, so a failed export never leaves a dist dir that looks finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgeft import artifact, host, pipeline
from edgeft import profile as profiles
from edgeft.artifact import Artifact
from edgeft.bundle import preflight
from edgeft.config import from_dict
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_MODEL_DIR,
    BUNDLE_README,
    BUNDLE_RUNNER,
    BUNDLE_SUMS,
    BUNDLE_VERSION,
    EVAL_FILE,
    KIND_BUNDLE,
    KIND_DATA,
    KIND_HF,
    MANIFEST_NAME,
    MANUAL_FILE,
    REPORT_JSON,
    REPORT_MD,
    RETRIEVAL_FILE,
)
from edgeft.errors import StageFailure, UserError
from edgeft.profile import Profile, stage_config

STAGE = "bundle"
_TUNED_DIRS = ("merge", "train")  # where a run keeps its tuned hf artifact when it has no bench yet


@dataclass(frozen=True)
class Config:
    """What a bundle is built for and from."""

    profile: Profile = field(default=Profile(), metadata={
        "help": "the device profile (edgeft.profile.load): what to build, how the bench runs it, the gate"})
    stage_params: dict = field(default_factory=dict, metadata={
        "help": "export stage keys beyond the profile's, e.g. {'export_onnx': {'min_top1_int8': 0.98}}"})
    max_new_tokens: int = field(default=96, metadata={"help": "answer length cap the bundle's `ask` uses, tokens"})


def run(src: Path, cfg: Config, out: Path, *, data: Path | None = None, work: Path | None = None) -> Artifact:
    """Build, bench, select and bundle `src`'s tuned model (a run dir or an hf artifact dir) into `out`.

    The variants and their bench are cached artifacts under `work` (default RUN/export-PROFILE).
    """
    prof, stage_params = cfg.profile, cfg.stage_params
    tuned, data_art, run_dir = resolve_source(Path(src), data)
    retrieval = _retrieval(data_art)  # a bad retrieval record fails before anything is built
    ests, notes = preflight.plan(tuned.path, prof, profiles.ladder(prof))
    if retrieval is not None:  # before anything is built: the tuned-for prompts must fit the device context
        from edgeft.records import read_jsonl

        ctx = preflight.context_length(preflight.model_shape(tuned.path), prof)
        note = preflight.grounded_prompt_check(tuned.path, read_jsonl(data_art.path / EVAL_FILE), ctx,
                                               cfg.max_new_tokens, prof)
        notes += [note] if note else []
    for line in notes:
        print(line, flush=True)
    fit = [e.variant for e in ests]
    built = dataclasses.replace(prof, gguf=tuple(t for t in prof.gguf if f"gguf:{t}" in fit),
                                onnx=tuple(t for t in prof.onnx if f"onnx:{t}" in fit), ladder=tuple(fit))
    configs = pipeline.export_configs(built)
    for name, params in (stage_params or {}).items():
        for key in params:  # what to build is the profile's (and pre-flight's) call, as in a recipe
            prof_key = profiles.STAGE_KEYS.get(name, {}).get(key)
            if prof_key:
                raise UserError(f"export: {name}.{key} is set by the device profile ({prof_key}), which pre-flight "
                                f"checks; override profile.{prof_key}=... instead")
        if name not in configs:
            raise UserError(f"export: '{name}.*' given but profile {prof.name} builds no "
                            f"{name.removeprefix('export_')} variant that fits; drop the override")
        merged = {**dataclasses.asdict(configs[name]), **params}
        configs[name] = from_dict(type(configs[name]), merged, name)
    for name, stage_cfg in configs.items():
        pipeline.stage(name).validate(stage_cfg)
    work = Path(work) if work else run_dir / f"export-{prof.name}"
    exports = []
    for name, stage_cfg in configs.items():  # a format whose parity gate fails is a rung not taken, said aloud
        try:
            exports.append(pipeline.stage(name).run(tuned, stage_cfg, work / name.split("_", 1)[1]))
        except StageFailure as e:
            if len(configs) == 1 or (name == list(configs)[-1] and not exports):
                raise
            notes.append(f"export: {name} failed its parity gate, its variants are not shipped: "
                         f"{str(e).splitlines()[0]}")
            print(f"[step] {notes[-1]}", flush=True)
    shape = preflight.model_shape(tuned.path)
    ctx = preflight.context_length(shape, prof)
    bench_mod = pipeline.stage("bench")
    # the bench runs on this host: the profile's device figures (bandwidth, budgets, KV type) feed its
    # predictions and gate, while GPU offload and GPU providers stay off (this host's CPU runs it)
    bench_cfg = stage_config("bench", bench_mod.Config(), prof, on_device=False, max_context=shape.max_positions)
    bench = bench_mod.run(tuned, bench_cfg, work / "bench", data=data_art, exports=exports)
    records = json.loads((bench.path / REPORT_JSON).read_text())
    by_variant = {e.variant: e for e in ests}
    for r in records:  # device-side figures where the bench gave none (it predicts from real file bytes)
        est = by_variant.get(f"{r['format']}:{r['quant']}")
        if est is not None:
            r.setdefault("predicted_footprint_mb", round(est.total_gb * 1024, 1))
            r.setdefault("predicted_decode_tok_s", est.predicted_decode_tok_s)
    from edgeft.bench.select import select

    chosen = select(records, prof)
    variant = f"{chosen['format']}:{chosen['quant']}"
    src_art, chosen_v = _locate(exports, bench_mod, chosen["name"])
    model_src = Path(chosen_v.path)
    lora_src = Path(chosen_v.lora) if chosen_v.lora else None
    print(f"[select] {chosen['name']} for {prof.name}: {chosen.get('rouge_l')} rouge_l "
          f"({chosen.get('accuracy_kept')} of tuned), {chosen['size_bytes']} bytes", flush=True)
    spec = {
        "bundle_version": BUNDLE_VERSION,
        "profile": dataclasses.asdict(prof),
        "variant": {"name": chosen["name"], "format": chosen["format"], "quant": chosen["quant"],
                    "path": f"{BUNDLE_MODEL_DIR}/{model_src.name}" if model_src.is_file() else BUNDLE_MODEL_DIR,
                    # export_gguf.adapter=true: the base GGUF plus the LoRA llama.cpp applies at run time
                    **({"lora": f"{BUNDLE_MODEL_DIR}/{lora_src.name}"} if lora_src else {})},
        "runtime": {"threads": prof.threads, "n_ctx": ctx, "n_gpu_layers": prof.n_gpu_layers,
                    "onnx_provider": prof.onnx_provider, "kv_cache_type": prof.kv_cache_type,
                    "max_new_tokens": cfg.max_new_tokens},
        "selected": chosen,
        "preflight": {"chosen": preflight.as_dict(by_variant[variant]),
                      "ladder": [preflight.as_dict(preflight.estimate(preflight.model_shape(tuned.path), v, prof))
                                 for v in profiles.ladder(prof)],
                      "notes": notes},
        "manual": MANUAL_FILE if (data_art.path / MANUAL_FILE).is_file() else None,
        # the retriever settings the model was tuned with (data.retrieval_k): `edgeft ask` answers grounded
        "retrieval": retrieval,
        "source": {"tuned_id": tuned.id, "tuned_path": str(tuned.path.resolve()), "bench_id": bench.id,
                   "export_id": src_art.id},
        "built_on": host.describe(),
        "example_question": _example_question(data_art),
    }

    def payload(staging: Path) -> dict:
        model_dir = staging / BUNDLE_MODEL_DIR
        model_dir.mkdir()
        if model_src.is_file():  # gguf: the one file, plus the tokenizer files beside it in the artifact
            shutil.copy2(model_src, model_dir / model_src.name)
            if lora_src is not None:
                shutil.copy2(lora_src, model_dir / lora_src.name)
            for f in src_art.path.iterdir():
                if f.is_file() and f.suffix != ".gguf" and f.name != MANIFEST_NAME:
                    shutil.copy2(f, model_dir / f.name)
        else:  # onnx: the type dir runs standalone (graph, external data, config, tokenizer)
            shutil.copytree(model_src, model_dir, dirs_exist_ok=True)
        if spec["manual"]:
            shutil.copy2(data_art.path / MANUAL_FILE, staging / MANUAL_FILE)
        if retrieval is not None:
            shutil.copy2(data_art.path / RETRIEVAL_FILE, staging / RETRIEVAL_FILE)
        for name in (REPORT_JSON, REPORT_MD):
            shutil.copy2(bench.path / name, staging / name)
        (staging / BUNDLE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        from edgeft.bundle.readme import readme, runner

        (staging / BUNDLE_README).write_text(readme(spec, records))
        (staging / BUNDLE_RUNNER).write_text(runner())
        os.chmod(staging / BUNDLE_RUNNER, 0o755)
        sums = [f"{artifact.sha256_file(f)}  {f.relative_to(staging).as_posix()}" for f in sorted(staging.rglob("*"))
                if f.is_file()]
        (staging / BUNDLE_SUMS).write_text("\n".join(sums) + "\n")  # run.sh checks these before any Python
        return {"variant": chosen["name"], "profile": prof.name}

    inputs = {"bench_id": bench.id, "variant": chosen["name"], "profile": dataclasses.asdict(prof),
              "data_id": data_art.id}
    return artifact.build(out, kind=KIND_BUNDLE, stage=STAGE, params={"profile": prof.name}, parent=src_art,
                          payload=payload, inputs=inputs)


def resolve_source(src: Path, data: Path | None = None) -> tuple[Artifact, Artifact, Path]:
    """The tuned hf artifact, the data artifact (eval split and manual) and the run dir behind `src`.

    `src` is a run dir (its bench's reference, else merge/, else train/) or an hf artifact dir; the
    data artifact is `data`, else the run's data/ dir.
    """
    if not src.is_dir():
        raise UserError(f"--from: {src} does not exist; pass a run dir (e.g. runs/demo) or an hf artifact dir")
    if (src / MANIFEST_NAME).is_file():
        tuned, run_dir = artifact.load(src, kind=KIND_HF), src.parent
    else:
        run_dir, tuned = src, None
        cands = [artifact.load(d.parent, verify=False) for d in sorted(src.glob(f"*/{MANIFEST_NAME}"))]
        cands = [a for a in cands if a.kind == KIND_HF]
        benched = ((artifact.read_manifest(src / "bench") or {}).get("parent") or {}).get("id")
        # the model the run benched (the end of its chain), else merge/, else train/
        order = [a for a in cands if a.id == benched] + [a for n in _TUNED_DIRS for a in cands if a.path.name == n]
        if order:
            tuned = artifact.load(order[0].path, kind=KIND_HF)
        if tuned is None:
            raise UserError(f"--from: {src} holds no finished tuned model ({'/, '.join(_TUNED_DIRS)}/ with an hf "
                            "manifest); run `edgeft run` first or pass the hf artifact dir")
    data_dir = data or run_dir / "data"
    if not (data_dir / MANIFEST_NAME).is_file():
        raise UserError(f"--data: no data artifact at {data_dir} (the eval split and manual of the run); "
                        "pass --data RUN/data")
    data_art = artifact.load(data_dir, kind=KIND_DATA)
    if not (data_art.path / EVAL_FILE).is_file():
        raise UserError(f"{data_art.path}: no {EVAL_FILE} to bench on; rerun the data stage with an eval split")
    return tuned, data_art, run_dir


def _retrieval(data_art: Artifact) -> dict | None:
    """The data artifact's retrieval settings (a model tuned on grounded prompts), None for closed-book data."""
    from edgeft.runtime.grounding import Spec

    path = data_art.path / RETRIEVAL_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: corrupt (not JSON); rerun the data stage") from None
    spec = Spec.from_dict(d, str(path))
    if not (data_art.path / MANUAL_FILE).is_file():
        raise UserError(f"{path}: the model was tuned with retrieval but {data_art.path} holds no {MANUAL_FILE} to "
                        "retrieve from; rerun the data stage with data.manual set")
    return spec.to_dict()


def _example_question(data_art: Artifact) -> str:
    """The first eval question, for the README's run example."""
    from edgeft.records import read_jsonl

    for rec in read_jsonl(data_art.path / EVAL_FILE):
        if isinstance(rec.get("grounding"), dict) and rec["grounding"].get("question"):
            return rec["grounding"]["question"]  # a grounded record's user turn also holds the passages
        for m in rec.get("messages", []):
            if m.get("role") == "user":
                return m["content"]
    return "your question"


def _locate(exports: list[Artifact], bench_mod, name: str):
    """The export artifact and the bench Variant (model path, LoRA) of a bench variant name."""
    for art in exports:
        for v in bench_mod.export_variants(art):
            if v.name == name:
                return art, v
    raise UserError(f"select chose {name!r}, which is not one of the built variants; "
                    "check edgeft.bench.select's formats")
