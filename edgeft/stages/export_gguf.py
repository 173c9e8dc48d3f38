"""Export stage: an hf artifact -> a gguf artifact with one `model-<type>.gguf` per requested type.

F32/F16/BF16/Q8_0 are written by edgeft.gguf.writer; K-quants and Q4_0 come from llama.cpp's own
quantizer run on the F16 file, optionally weighted by an importance matrix computed on the fine-tune
data (edgeft.gguf.imatrix). With `adapter: true` the stage ships the base model's files plus the
LoRA as `adapter-f32.gguf`, which llama.cpp applies at run time (edgeft.gguf.lora), instead of a
merged model; its input is then the train stage's adapter artifact (or a merge of one, whose parent
is used). Every .gguf gets an Ollama Modelfile beside it. The tokenizer files ride along so the
device can tokenize. The parity gate (edgeft.gguf.parity) checks every file through llama.cpp
against PyTorch, with the adapter applied when there is one.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact, variants
from edgeft.artifact import Artifact
from edgeft.config import opt
from edgeft.constants import ADAPTER_DIR, EVAL_FILE, KIND_ADAPTER, KIND_GGUF, KIND_HF, TOKENIZER_FILES, TRAIN_FILE
from edgeft.errors import StageFailure, UserError
from edgeft.gguf import imatrix as gguf_imatrix
from edgeft.gguf import lora as gguf_lora
from edgeft.gguf import modelfile as gguf_modelfile
from edgeft.gguf import parity as gguf_parity
from edgeft.gguf import retention as gguf_retention
from edgeft.gguf import writer as gguf_writer
from edgeft.training import hf_io

STAGE = "export_gguf"
VALID_TYPES = variants.quants("gguf")
_LLAMA_QUANTS = tuple(t for t in VALID_TYPES if variants.get("gguf", t).llama_ftype)  # made by llama.cpp's quantizer
ADAPTER_FILE = "adapter-f32.gguf"  # the LoRA of an adapter export
IMATRIX_FILE = "imatrix.gguf"  # llama.cpp's imatrix format: also usable with llama-quantize --imatrix
_IMATRIX_MAX_TOKENS = 512  # per calibration conversation
_FLOAT_TYPES = ("F32", "F16", "BF16")  # GGUF tensor types that are not a quantization grid


def _bar(quant: str) -> float:
    return variants.get("gguf", quant).min_top1  # each variant's default parity bar lives in edgeft.variants


@dataclass(frozen=True)
class Config:
    """What export_gguf builds."""

    types: tuple[str, ...] = opt(("f16", "q8_0", "q4_k_m"), "files to build, one per type (f32, f16, bf16, q8_0, "
                                                            "q6_k, q5_k_m, q4_k_m, q4_1, q4_0); set by the device "
                                                            "profile (profile.gguf)")
    threads: int = opt(2, "llama.cpp threads of the quantizer and the parity gate (llama.cpp's results do not depend "
                          "on them); set by the device profile (profile.threads)")
    imatrix: bool = opt(False, "weigh q4_0/q4_1/K-quant rounding by activations on the fine-tune data (chat template)")
    imatrix_samples: int = opt(256, "training conversations the importance matrix is computed on")
    adapter: bool = opt(False, "ship the base files + adapter-f32.gguf (llama.cpp LoRA) instead of a merged model")
    parity_samples: int = opt(64, "eval conversations (from the run's data) for tokenization + teacher-forced checks")
    min_top1_q8_0: float = opt(_bar("q8_0"), "teacher-forced top-1 agreement with torch the q8_0 file must reach")
    min_top1_quant: float = opt(_bar("q4_k_m"), "the same for llama.cpp-quantized files (q4_0, q4_1, K-quants)")


def run(src: Artifact, cfg: Config, out: Path, *, data: Artifact | None = None) -> Artifact:
    """Convert `src` to GGUF files of `cfg.types` (+ the LoRA with cfg.adapter), gate them, publish at `out`."""
    types = validate(cfg)
    adapter_art = _adapter_source(src) if cfg.adapter else None
    if adapter_art is not None:
        gguf_lora.check(adapter_art.path / ADAPTER_DIR)  # DoRA, per-module ranks...: refused before any work
    if adapter_art is None and src.kind != KIND_HF:
        raise UserError(f"{src.path}: artifact kind is '{src.kind}', {STAGE} needs {KIND_HF}; "
                        "pass the output of train or merge (or set export_gguf.adapter=true for an adapter)")
    if adapter_art is None:
        gguf_writer.model_spec(src.path)  # an architecture or setting llama.cpp cannot run: refused before any work
    if cfg.imatrix and not any(t in _LLAMA_QUANTS for t in types):
        raise UserError(f"export_gguf.imatrix=true but no type uses it; add one of {', '.join(_LLAMA_QUANTS)}")
    data = data if data is not None else _find_data(adapter_art or src)
    if cfg.imatrix:
        if data is None:
            raise UserError(f"export_gguf.imatrix=true: no data artifact found for {src.path} (the run dir's "
                            "data/ with the id its train stage recorded); run it through the pipeline")
    parent = adapter_art or src

    def payload(staging: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix=artifact.scratch_prefix(out), dir=staging.parent) as tmp_s:
            tmp = Path(tmp_s)
            if adapter_art is not None:
                model_dir, reference, adapter_info = _adapter_models(adapter_art, tmp, staging)
            else:
                model_dir, reference, adapter_info = src.path, src.path, None
            imatrix = None
            if cfg.imatrix:
                # activations of the model as deployed: the merged one when the LoRA rides along
                imatrix = _imatrix(reference, data, cfg.imatrix_samples, staging)
            files, metrics = _build_files(model_dir, types, cfg.threads, staging, tmp, imatrix)
            for name in ("config.json", *TOKENIZER_FILES):
                if (reference / name).is_file():
                    shutil.copy2(reference / name, staging / name)
            lora = staging / ADAPTER_FILE if adapter_info else None
            ctx = gguf_writer.model_spec(model_dir)[1]["ctx"]
            metrics["modelfiles"] = {t: gguf_modelfile.write(p, reference, ctx, lora) for t, p in files.items()}
            if adapter_info:
                metrics["adapter"] = adapter_info
            if imatrix:
                metrics["imatrix"] = imatrix[2]
            evals = _eval_conversations(reference, data, cfg.parity_samples) if data is not None else []
            min_top1 = {t: variants.bar(variants.get("gguf", t), cfg) for t in files}
            min_top1 = {t: v for t, v in min_top1.items() if v is not None}
            explain = None if adapter_info else _tune_explainer(src, model_dir, files)
            metrics["parity"] = gguf_parity.parity_gate(reference, files, tmp, lora, evals, min_top1,
                                                        threads=cfg.threads, explain=explain)
        return metrics

    inputs = {"data_id": data.id} if cfg.imatrix else None
    return artifact.build(out, kind=KIND_GGUF, stage=STAGE, params=cfg, parent=parent, payload=payload,
                          inputs=inputs)


def gguf_file(art: Artifact, gguf_type: str) -> Path:
    """Path of the `gguf_type` file inside a gguf artifact."""
    path = art.path / variants.get("gguf", gguf_type).file
    if not path.is_file():
        built = sorted((art.metrics.get("files") or {}))
        raise UserError(f"{art.path}: no {gguf_type} GGUF; built: {', '.join(built) or 'none'}")
    return path


def validate(cfg: Config) -> tuple[str, ...]:
    """The requested types, checked; bad values are UserErrors naming the key."""
    types = tuple(cfg.types)
    bad = [t for t in types if t not in VALID_TYPES]
    if bad or not types:
        raise UserError(f"export_gguf.types: {', '.join(map(repr, bad)) or 'empty'} invalid; "
                        f"valid types: {', '.join(VALID_TYPES)}")
    if len(set(types)) != len(types):
        raise UserError(f"export_gguf.types lists a type twice: {list(types)}")
    if cfg.threads < 1:
        raise UserError(f"export_gguf.threads must be >= 1, got {cfg.threads}")
    if cfg.imatrix_samples < 1:
        raise UserError(f"export_gguf.imatrix_samples must be >= 1, got {cfg.imatrix_samples}")
    for key in ("min_top1_q8_0", "min_top1_quant"):
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"export_gguf.{key} must be in [0, 1], got {getattr(cfg, key)}")
    return types


def _build_files(hf_dir: Path, types: tuple[str, ...], threads: int, staging: Path, tmp: Path,
                 imatrix: tuple | None = None) -> tuple[dict[str, Path], dict]:
    """Write every requested file; the F16 base of llama.cpp's quantizer goes to `tmp` unless requested."""
    files, per_file, n_params = {}, {}, 0
    base = staging / variants.get("gguf", "f16").file if "f16" in types else tmp / "base-f16.gguf"
    if "f16" not in types and any(t in _LLAMA_QUANTS for t in types):
        n_params = gguf_writer.convert(hf_dir, base, "f16", name=hf_dir.name)["n_params"]
    for t in sorted(types, key=lambda t: t in _LLAMA_QUANTS):  # ours first: the quantizer reads the F16
        path = staging / variants.get("gguf", t).file
        if t not in _LLAMA_QUANTS:
            info = gguf_writer.convert(hf_dir, path, t, name=hf_dir.name)
            n_params = info["n_params"]
        else:
            _llama_quantize(base, path, t, threads, imatrix)
            info = {}
        files[t] = path
        per_file[t] = _describe(path, t, info)
    for t, meta in per_file.items():
        meta["bits_per_weight"] = round(meta["size_bytes"] * 8 / n_params, 3)
    return files, {"files": per_file, "n_params": n_params}


def _llama_quantize(src: Path, dst: Path, gguf_type: str, threads: int, imatrix: tuple | None = None) -> None:
    import llama_cpp

    # llama-cpp-python prints every llama.cpp log line until its logger level is set; the per-tensor
    # choices it would print are recorded in the metrics instead
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, variants.get("gguf", gguf_type).llama_ftype)
    if imatrix is not None:
        arr, _keep = gguf_imatrix.quantize_params_array(imatrix[0], imatrix[1])
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    # llama.cpp writes a line per tensor that falls back to another type (every row of a model whose width
    # is not a multiple of 256, for K-quants): kept in a log beside the output, summed up in one line here
    log_file = dst.with_name(dst.name + ".quantize.log")
    with _stderr_to(log_file):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = log_file.read_text(errors="replace")
    log_file.unlink()
    if rc != 0 or not dst.is_file():
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise StageFailure(f"llama.cpp quantization {src.name} -> {gguf_type} failed (code {rc}):\n{tail}")
    fallbacks = sum("falling back" in line for line in text.splitlines())
    if fallbacks:
        print(f"[gguf] {gguf_type}: {fallbacks} tensors fell back to another type (their rows are not a multiple "
              "of the type's block; listed in the manifest's files.*.fallbacks)", flush=True)


@contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (C libraries' stderr) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as f:
            os.dup2(f.fileno(), 2)
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def _describe(path: Path, gguf_type: str, info: dict) -> dict:
    """Size, tensor types, and the 2-D tensors not stored in the type's nominal format."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    counts: dict[str, int] = {}
    other: dict[str, str] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if len(t.shape) > 1 and t.tensor_type.name != variants.get("gguf", gguf_type).tensor_type:
            other[t.name] = t.tensor_type.name
    return {"file": path.name, "size_bytes": path.stat().st_size, "tensor_types": counts,
            # writer files: why a tensor fell back; llama.cpp files: its per-tensor mix and fallbacks
            "fallbacks": info.get("fallbacks", other)}




def _adapter_source(src: Artifact) -> Artifact:
    """The adapter artifact to export: `src` itself, or the adapter a merge artifact was made from."""
    if src.kind == KIND_ADAPTER:
        return artifact.load(src.path, kind=KIND_ADAPTER)
    parent = artifact.parent_of(src) if src.kind == KIND_HF else None
    if parent is not None and parent.kind == KIND_ADAPTER:
        return artifact.load(parent.path, kind=KIND_ADAPTER)
    raise UserError(f"{src.path}: export_gguf.adapter=true needs a LoRA adapter artifact (train with "
                    f"train.method=lora or qlora) or a merge of one; got a '{src.kind}' from {src.stage}")


def _adapter_models(adapter_art: Artifact, tmp: Path, staging: Path) -> tuple[Path, Path, dict]:
    """(base dir the GGUF files are made from, merged reference dir, adapter info); writes the LoRA GGUF.

    QLoRA adapters were trained on the NF4-dequantized base, so that (not the original) is the base
    shipped, as merge does; the reference is the merged model, checked by merge's own verification."""
    import torch

    from edgeft.stages.merge import Config as MergeConfig
    from edgeft.training import merging

    train_cfg = adapter_art.params["config"]
    base_dir = hf_io.resolve_model(adapter_art.inputs["base_model"])
    adapter_dir = adapter_art.path / ADAPTER_DIR
    trained_on = adapter_art.metrics.get("device", "cpu")
    merged, checks = merging.merge(base_dir, adapter_dir, train_cfg, MergeConfig(dtype="float32"),
                                 adapter_art.inputs.get("base_weights_sha256"), trained_on)
    reference = tmp / "merged"
    merged.save_pretrained(reference, safe_serialization=True)
    hf_io.copy_tokenizer(adapter_art.path, reference)
    if train_cfg["method"] == "qlora":
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        merging.load_dequantized(merging.load_nf4(base_dir, train_cfg, trained_on)[0], base)
        model_dir = tmp / "base-dequantized"
        base.save_pretrained(model_dir, safe_serialization=True)
        hf_io.copy_tokenizer(adapter_art.path, model_dir)
    else:
        model_dir = base_dir
    info = gguf_lora.convert_adapter(adapter_dir, model_dir, staging / ADAPTER_FILE)
    info.update(file=ADAPTER_FILE, method=train_cfg["method"], base=str(base_dir),
                merge_max_abs_diff=checks["merge_max_abs_diff"])
    return model_dir, reference, info


def _find_data(src: Artifact) -> Artifact | None:
    return hf_io.run_data(src, TRAIN_FILE)


def _tune_explainer(src: Artifact, model_dir: Path, files: dict[str, Path]):
    """explain(type) for the parity gate's failure: the share of the tune's weight change the file keeps
    (edgeft.gguf.retention), when `src` is a tune with its base's tensors (a merge, a full or freeze train) and
    that base is a local dir (a hub id is never fetched to explain a failure); None otherwise."""
    base = str(src.inputs.get("base_model") or "")
    if src.kind != KIND_HF or src.stage not in ("merge", "train") or not base or not Path(base).is_dir():
        return None
    base_dir = Path(base)
    base = artifact.read_manifest(base_dir) or {}
    source = {t for t in ((base.get("metrics") or {}).get("source_quant_types") or {}) if t not in _FLOAT_TYPES}

    def explain(gguf_type: str) -> str:
        try:
            kept = gguf_retention.tune_retained(model_dir, base_dir, files[gguf_type])
        except (UserError, OSError, ValueError, KeyError):  # an unreadable base: the gate's own finding stands
            return ""
        if kept is None:
            return ""
        note = (f"; it keeps {kept['share']:.0%} of what the tune changed in the weights (1 = all; least: "
                f"{kept['min_share']:.0%} in {kept['min_tensor']})")
        if source and abs(kept["share"] - 1) > 0.1:
            note += (f": the base was imported from a {'/'.join(sorted(source))} GGUF and the tune moved its weights "
                     "by less than this type's rounding step, so rounding undoes or inflates it; ship the tune "
                     "beside the base (export_gguf.adapter=true: llama.cpp adds it at run time)")
        return note

    return explain


def _eval_conversations(model_dir: Path, data: Artifact, n: int) -> list[dict]:
    """Up to `n` eval conversations: the prompt text and ids, and the ids with the reference answer."""
    from edgeft.records import read_jsonl
    from edgeft.runtime.prompt import PromptFormatter

    fmt = PromptFormatter(model_dir)
    out = []
    for rec in read_jsonl(data.path / EVAL_FILE)[:n]:
        msgs = rec.get("messages")
        if not msgs or msgs[-1]["role"] != "assistant":
            continue
        prompt = fmt.render(msgs[:-1], add_generation_prompt=True)
        ids, full = fmt.encode(prompt), fmt.encode(fmt.render(msgs))
        start = len(ids) if full[:len(ids)] == ids else 1  # a merge across the boundary: score every position
        if start < len(full):
            out.append({"prompt": prompt, "ids": ids, "full": full, "start": start})
    return out


def _imatrix(model_dir: Path, data: Artifact, n: int, staging: Path) -> tuple:
    """(sums, counts, info): the importance matrix of `model_dir` on `n` chat-rendered training records."""
    from edgeft.records import read_jsonl
    from edgeft.runtime.prompt import PromptFormatter

    fmt = PromptFormatter(model_dir)
    records = read_jsonl(data.path / TRAIN_FILE)
    random.Random(0).shuffle(records)
    seqs = []
    for rec in records[:n]:
        ids = fmt.encode(fmt.render(rec["messages"]) if "messages" in rec else rec.get("text", ""))
        if len(ids) > 1:
            seqs.append(ids[:_IMATRIX_MAX_TOKENS])
    if not seqs:
        raise UserError(f"{data.path / TRAIN_FILE}: no records to compute the importance matrix on")
    sums, counts = gguf_imatrix.compute(model_dir, seqs)
    arch = gguf_writer.MODEL_ARCH_NAMES[gguf_writer.model_spec(model_dir)[0].arch]
    gguf_imatrix.save(staging / IMATRIX_FILE, sums, counts, arch, str(data.path / TRAIN_FILE), len(seqs))
    info = {"file": IMATRIX_FILE, "sequences": len(seqs), "tokens": sum(map(len, seqs)), "tensors": len(sums),
            "data_id": data.id}
    return sums, counts, info
