"""Export an hf artifact to ONNX: one standalone model dir per type, each gated against PyTorch.

Two routes (`route`):
- `optimum` (broad): optimum-onnx fp32 (`text-generation-with-past`, TorchScript exporter, KV cache
  as inputs/outputs), then derived types: fp16 by onnxruntime's float16 converter (norms' square
  and mean kept fp32), int8 as 8-bit MatMulNBits after SmoothQuant-style smoothing (the tied LM head and the
  embedding included; edgeft.onnx.quant.quantize_int8), int4 as MatMulNBits (RTN or HQQ). Runs under
  `edgeft.runtime.onnx.OnnxRuntime`. optimum's own fp16 export left most gemma weights fp32.
- `genai` (fast): the onnxruntime-genai model builder (fused QKV and gate/up, GroupQueryAttention,
  MatMulNBits) run as a pinned converter in its own venv (`make genai-env`; it needs transformers
  5); runs under `edgeft.runtime.onnx_genai.GenaiRuntime`. See `edgeft.onnx.genai`.

Every type dir holds the model (external data past the 2 GB protobuf limit), config.json and the
hf artifact's own tokenizer files. Each model passes onnx.checker (by path) and opens in
onnxruntime, then the parity gate (`edgeft.onnx.parity`): tokenizer ids equal to the HF
tokenizer on every prompt (all eval prompts of the fine-tune data found through the lineage, plus
fixed texts) and the EOS the runtime stops on; on a sample of `parity_samples` eval prompts (plus the
fixed texts), fp32 greedy equal to torch and, for every type, teacher-forced top-1 agreement >= the
type's minimum, recorded with its one-sided 95% lower bound and the KL divergence. A failed check
fails the export with a diagnosis. The gate's memory does not depend on the vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact, variants
from edgeft.artifact import Artifact
from edgeft.config import opt
from edgeft.constants import EVAL_FILE, KIND_HF, KIND_ONNX, TOKENIZER_FILES
from edgeft.errors import StageFailure, UserError
from edgeft.onnx import genai as onnx_genai
from edgeft.onnx import parity as onnx_parity
from edgeft.onnx import quant as Q
from edgeft.parity_stats import CONFIDENCE
from edgeft.records import read_jsonl
from edgeft.runtime.onnx import CONFIG_FILE, MODEL_FILE, OnnxRuntime
from edgeft.runtime.prompt import PromptFormatter
from edgeft.training import hf_io

STAGE = "export_onnx"
VALID_TYPES = variants.quants("onnx")  # fp32, fp16, int8, int4: also the order they are produced in
ROUTES = ("optimum", "genai")
# model_type values whose optimum-onnx text-generation export was checked with OnnxRuntime
# (greedy tokens equal to PyTorch, max|logit diff| <= 5e-5, tiny random configs, optimum-onnx 0.1.0);
# llama, qwen2, qwen3 and gemma3_text (sliding-window layers included) stay checked by tests/test_families.py
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                   "granite", "olmo", "olmo2", "smollm3", "stablelm", "cohere", "glm", "nemotron")
_PROTOBUF_LIMIT = 2 << 30  # bytes: larger graphs must keep their weights in external data
_NBITS_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits needs a power of two >= 16


def _bar(quant: str) -> float:
    return variants.get("onnx", quant).min_top1  # each variant's default parity bar lives in edgeft.variants


@dataclass(frozen=True)
class Config:
    types: tuple[str, ...] = opt(("fp32", "int8"), "subdirs to write, from fp32, fp16, int8, int4; set by the device "
                                                   "profile (profile.onnx)")
    route: str = opt("optimum", "optimum (broad: SUPPORTED_ARCHS) | genai (builder: fused, GQA; GENAI_ARCHS); set by "
                                "the device profile (profile.onnx_route)")
    int8_block_size: int = opt(16, "weights per fp32 scale of the 8-bit MatMulNBits / GatherBlockQuantized (16, the "
                                   "least: SmolLM2 top-1 0.993 with smoothing, 32 measured 0.98-0.99)")
    int8_accuracy_level: int = opt(4, "4 = activations int8 per block at run time (SmolLM2 decode 1.7x fp32); 0 = "
                                      "fp32 activations, exact but onnxruntime has no fast 8-bit kernel (0.18x)")
    int8_embeddings: bool = opt(True, "the token embedding too (8-bit GatherBlockQuantized)")
    int8_smooth_alpha: float = opt(0.5, "SmoothQuant strength: activation outliers moved into the 8-bit weights per "
                                        "input channel (0 = off; SmolLM2 KL 9e-4 -> 3e-4)")
    int8_float_head: bool = opt(False, "keep the LM head's weights fp32 (untied): fewer near-tie flips (SmolLM2 "
                                       "0.995 vs 0.993) for 1.4x the size")
    int8_calibration_prompts: int = opt(64, "eval prompts outside the parity sample whose activations set "
                                            "int8_smooth_alpha's scales")
    int4_algo: str = opt("rtn", "rtn (round to nearest) | hqq (half-quadratic, asymmetric; optimum route)")
    int4_block_size: int = opt(32, "weights per MatMulNBits scale; K not a multiple is zero-padded")
    int4_symmetric: bool = opt(True, "no zero points: smaller; rtn only (hqq is always asymmetric)")
    int4_accuracy_level: int = opt(4, "4 = int8 activations on CPU (fastest); 0 = fp32 activations")
    int4_embeddings: bool = opt(True, "the token embedding too (GatherBlockQuantized, RTN), as llama.cpp's K-quants do")
    parity_new_tokens: int = opt(16, "greedy tokens compared per parity prompt")
    parity_samples: int = opt(128, "eval prompts (spread over eval.jsonl) run through the greedy and teacher-forced "
                                   "checks, 0 = all; ~15 answer positions each: at 128 a measured 0.995 top-1 has "
                                   "a 95% lower bound near 0.99 (the bound is recorded)")
    min_top1_fp16: float = opt(_bar("fp16"), "teacher-forced top-1 agreement with torch below which export fails "
                                              "(demo: 0.999)")
    min_top1_int8: float = opt(_bar("int8"), "teacher-forced top-1 agreement with torch the int8 model must reach, "
                                              "else export fails")
    min_top1_int4: float = opt(_bar("int4"), "teacher-forced top-1 agreement with torch the int4 model must reach, "
                                              "else export fails")


def run(src: Artifact, cfg: Config, out: Path, *, data: Artifact | None = None) -> Artifact:
    """Export `src` (kind hf) to an onnx artifact at `out`; `data` (else found via lineage) gives eval prompts."""
    if src.kind != KIND_HF:
        raise UserError(f"{src.path}: export_onnx needs an '{KIND_HF}' artifact (a merged or trained "
                        f"model), got '{src.kind}'; pass the output of train or merge")
    types = validate(cfg)
    model_type = _check_arch(src.path, cfg.route)
    if cfg.route == "genai":
        onnx_genai.check_model_dims(src.path)
        converter = onnx_genai.converter_python()  # refuse before writing anything
    data = data if data is not None else _find_data(src)
    return artifact.build(out, kind=KIND_ONNX, stage=STAGE, params=cfg, parent=src,
                          payload=lambda staging: _export_all(src.path, cfg, types, staging, data),
                          inputs={"model_type": model_type, "parity_data": data.id if data else None,
                                  **({"converter": onnx_genai.converter_versions(converter)}
                                     if cfg.route == "genai" else {})})


def validate(cfg: Config) -> tuple[str, ...]:
    """The requested types in production order; a bad value is a UserError naming the key."""
    if isinstance(cfg.types, str) or not cfg.types:
        raise UserError(f"export_onnx.types must be a non-empty list drawn from {list(VALID_TYPES)}, "
                        f"got {cfg.types!r}")
    unknown = [t for t in cfg.types if t not in VALID_TYPES]
    if unknown:
        raise UserError(f"export_onnx.types: unknown {unknown}; valid types are {list(VALID_TYPES)}")
    if cfg.route not in ROUTES:
        raise UserError(f"export_onnx.route={cfg.route!r}: use one of {list(ROUTES)}")
    if cfg.route == "genai" and set(cfg.types) - set(onnx_genai.GENAI_TYPES):
        raise UserError(f"export_onnx.types {list(cfg.types)} with route=genai: the builder route makes "
                        f"{list(onnx_genai.GENAI_TYPES)}; use route=optimum for fp16/int8")
    if cfg.int4_algo not in Q.INT4_ALGOS:
        raise UserError(f"export_onnx.int4_algo={cfg.int4_algo!r}: use one of {list(Q.INT4_ALGOS)}")
    if cfg.route == "genai" and cfg.int4_algo != "rtn":
        raise UserError(f"export_onnx.int4_algo={cfg.int4_algo!r} with route=genai: the builder "
                        "quantizes with rtn; use route=optimum for hqq")
    if cfg.int8_block_size not in _NBITS_BLOCKS:
        raise UserError(f"export_onnx.int8_block_size={cfg.int8_block_size}: MatMulNBits needs one of "
                        f"{list(_NBITS_BLOCKS)}")
    if not 0.0 <= cfg.int8_smooth_alpha < 1.0 or cfg.int8_calibration_prompts < 1:
        raise UserError(f"export_onnx.int8_smooth_alpha={cfg.int8_smooth_alpha} must be in [0, 1) and "
                        f"int8_calibration_prompts={cfg.int8_calibration_prompts} >= 1")
    if cfg.int8_accuracy_level not in (0, 4):
        raise UserError(f"export_onnx.int8_accuracy_level={cfg.int8_accuracy_level}: use 0 (fp32 activations) "
                        "or 4 (int8 activations per block)")
    if cfg.int4_block_size not in _NBITS_BLOCKS:
        raise UserError(f"export_onnx.int4_block_size={cfg.int4_block_size}: MatMulNBits needs one of "
                        f"{list(_NBITS_BLOCKS)}")
    if cfg.int4_accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"export_onnx.int4_accuracy_level={cfg.int4_accuracy_level}: use 0-4 "
                        "(4 = int8 activations, 0 = unset)")
    if cfg.parity_new_tokens < 1 or cfg.parity_samples < 0:
        raise UserError("export_onnx.parity_new_tokens must be >= 1 and parity_samples >= 0 "
                        "(0 = all)")
    for key in ("min_top1_fp16", "min_top1_int8", "min_top1_int4"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise UserError(f"export_onnx.{key}={getattr(cfg, key)}: use a fraction in [0, 1]")
    return tuple(t for t in VALID_TYPES if t in cfg.types)


def _check_arch(hf_dir: Path, route: str) -> str:
    """config.json's model_type, refused unless the route supports it."""
    cfg_path = hf_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir}: no {CONFIG_FILE}; the hf artifact is incomplete, rerun its stage")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    archs = onnx_genai.GENAI_ARCHS if route == "genai" else SUPPORTED_ARCHS
    if model_type not in archs:
        other = ("; route=optimum supports " + ", ".join(SUPPORTED_ARCHS)) if route == "genai" else ""
        raise UserError(f"{cfg_path}: model_type {model_type!r} is not supported by the ONNX export "
                        f"route={route}; supported: {', '.join(archs)}{other} (or export GGUF instead)")
    return model_type


def _find_data(src: Artifact) -> Artifact | None:
    return hf_io.run_data(src, EVAL_FILE)


def _export_all(hf_dir: Path, cfg: Config, types: tuple[str, ...], staging: Path,
                data: Artifact | None) -> dict:
    """Write every type dir under `staging` and return the metrics (per type: size, seconds, parity)."""
    records = read_jsonl(data.path / EVAL_FILE) if data else None
    prompts = onnx_parity.build_prompts(hf_dir, records)  # all of them: the tokenizer check is cheap
    sample = onnx_parity.sample_prompts(prompts, cfg.parity_samples)
    base = staging / ("fp32" if "fp32" in types else ".fp32-base")
    t0 = time.perf_counter()
    if cfg.route == "genai":
        route_info = onnx_genai.build(hf_dir, base, "fp32", cfg)
    else:
        optimum_export(hf_dir, base)
        route_info = {"route": "optimum", "runtime": "edgeft.runtime.onnx.OnnxRuntime"}
    fp32_s = time.perf_counter() - t0
    Q.check_graph(base)
    with onnx_parity.TorchModel(hf_dir) as reference:
        rt = _open_runtime(base, cfg.route)
        try:
            tokenizer = _check_tokenizers(base, prompts, rt)
            refs = onnx_parity.torch_references(reference, sample, rt, cfg.parity_new_tokens)
        finally:
            rt.close()
        gate = _gate(base, refs, reference, "fp32", cfg, 0.0)  # raises unless greedy matches
        calibration = _calibrate(reference, prompts, sample, cfg) if "int8" in types else None
    large = Q.model_bytes(base) > _PROTOBUF_LIMIT // 2  # headroom: quantizers also store scales
    per_type = {}
    for t in types:
        if t == "fp32":
            per_type[t] = {"size_bytes": Q.model_bytes(base), "export_s": round(fp32_s, 3), **gate}
            continue
        out = staging / t
        t0 = time.perf_counter()
        extra = {}
        if cfg.route == "genai":
            extra = onnx_genai.build(hf_dir, out, t, cfg)["quant"]
        elif t == "fp16":
            Q.convert_fp16(base, out, large)
        elif t == "int8":
            extra = {**Q.quantize_int8(base, out, block_size=cfg.int8_block_size,
                                       accuracy_level=cfg.int8_accuracy_level, embeddings=cfg.int8_embeddings,
                                       large=large, keep_float=("lm_head",) if cfg.int8_float_head else (),
                                       absmax=calibration["absmax"], smooth_alpha=cfg.int8_smooth_alpha),
                     "calibration": {k: v for k, v in calibration.items() if k != "absmax"}}
        elif t == "int4":
            extra = Q.quantize_int4(base, out, algo=cfg.int4_algo, block_size=cfg.int4_block_size,
                                    symmetric=cfg.int4_symmetric, accuracy_level=cfg.int4_accuracy_level,
                                    embeddings=cfg.int4_embeddings, large=large)
        seconds = time.perf_counter() - t0  # from the fp32 graph (optimum) or the hf dir (genai)
        Q.check_graph(out)
        with onnx_parity.TorchModel(hf_dir) as reference:  # not held while quantizing: peak memory
            per_type[t] = {"size_bytes": Q.model_bytes(out), "export_s": round(seconds, 3),
                           **({"quant": extra} if extra else {}),
                           **_gate(out, refs, reference, t, cfg, variants.bar(variants.get("onnx", t), cfg))}
    evals = [p for p in prompts if p.label.startswith("eval:")]
    metrics = {"route": route_info, "types": per_type, "parity_samples": cfg.parity_samples,
               "parity_prompts": len(refs), "parity_eval_prompts": sum(p.label.startswith("eval:") for p in sample),
               "parity_eval_available": len(evals), "parity_positions": gate["positions"],
               "parity_confidence": CONFIDENCE, "parity_data": str(data.path) if data else None,
               "tokenizer_prompts_checked": tokenizer["prompts_checked"], "tokenizer": tokenizer}
    if "fp32" not in types:  # the gate ran on the base graph the quantized types came from
        shutil.rmtree(base)
        metrics["fp32_gate"] = {"export_s": round(fp32_s, 3), **gate}
    return metrics


def _calibrate(reference, prompts: list, sample: list, cfg: Config) -> dict:
    """Per Linear input channel, max |activation| on calibration prompts (for int8's smoothing)."""
    if cfg.route != "optimum" or cfg.int8_smooth_alpha <= 0:
        return {"absmax": None, "prompts": 0}
    from edgeft.onnx.smooth import input_absmax

    calib, disjoint = onnx_parity.calibration_prompts(prompts, sample, cfg.int8_calibration_prompts)
    return {"absmax": input_absmax(reference.model, [p.ids for p in calib]), "prompts": len(calib),
            "disjoint_from_parity_sample": disjoint}


def _check_tokenizers(model_dir: Path, prompts: list, rt) -> dict:
    """The device tokenizer(s) shipped in `model_dir` must give the HF tokenizer's ids on every prompt (chat
    template and BOS rule included), and the runtime must stop on the tokenizer's EOS."""
    fmt = PromptFormatter(model_dir)
    n = onnx_parity.check_tokenizer(
        prompts, lambda p: fmt.prompt_ids(list(p.messages)) if p.messages else fmt.encode(p.text),
        f"{model_dir.name}/tokenizer.json (edgeft.runtime.prompt)")
    if hasattr(rt, "encode"):  # GenaiRuntime: onnxruntime-genai's own tokenizer, what its users call
        onnx_parity.check_tokenizer(prompts, lambda p: rt.encode(p.text), f"{model_dir.name} onnxruntime_genai")
    if fmt.eos_id is not None and fmt.eos_id not in rt.eos_ids:
        raise StageFailure(f"{model_dir}: the tokenizer's EOS {fmt.eos_token!r} (id {fmt.eos_id}) is not among the "
                           f"ids the runtime stops on {sorted(rt.eos_ids)} (config.json / generation_config.json "
                           "eos_token_id): answers would run on past the end of turn; fix eos_token_id in the hf "
                           "artifact")
    return {"prompts_checked": n, "chat_template": fmt.has_chat_template, "bos_added": fmt.add_bos,
            "eos_token": fmt.eos_token, "eos_ids": sorted(rt.eos_ids)}


def _gate(model_dir: Path, refs: list, reference, type_name: str, cfg: Config, min_top1: float) -> dict:
    """Run the parity gate through the runtime this route's models are deployed with, against `reference`."""
    rt = _open_runtime(model_dir, cfg.route)
    fix = (f"; try int4_algo=hqq, a smaller int4_block_size, int4_accuracy_level=0 or int4_symmetric=false, "
           f"or lower export_onnx.min_top1_{type_name} if this model tolerates it" if type_name == "int4" else
           f"; try int8_float_head=true, another int8_smooth_alpha, int8_accuracy_level=0 (fp32 activations, "
           f"slow on CPU), or lower export_onnx.min_top1_{type_name}"
           if type_name == "int8" else
           "; fp16 overflows or loses range somewhere in this graph: deploy fp32 or int8, or lower "
           "export_onnx.min_top1_fp16" if type_name == "fp16" else "")
    try:
        return onnx_parity.gate(rt, refs, reference.logits, type_name, cfg.parity_new_tokens, min_top1,
                                model_dir, fix)
    finally:
        rt.close()


def _open_runtime(model_dir: Path, route: str):
    """The runtime a route's models are deployed with; one thread: the gate runs many short calls."""
    if route == "genai":
        from edgeft.runtime.onnx_genai import GenaiRuntime
        return GenaiRuntime(model_dir, n_threads=1)
    return OnnxRuntime(model_dir, n_threads=1)


def optimum_export(hf_dir: Path, out: Path) -> None:
    """optimum-onnx fp32 export of the local model dir (offline), then the tokenizer files beside it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    # TracerWarnings by the hundred and a torch_dtype deprecation inside optimum: the gate is the check
    with warnings.catch_warnings(), Q.quiet("transformers"):
        warnings.simplefilter("ignore")
        main_export(str(hf_dir), output=str(out), task="text-generation-with-past", dtype="fp32",
                    device="cpu", library_name="transformers", local_files_only=True,
                    do_validation=False)
    if not (out / MODEL_FILE).is_file():
        raise StageFailure(f"optimum-onnx wrote no {MODEL_FILE} in {out} (files: "
                           f"{sorted(p.name for p in out.iterdir())})")
    for name in (CONFIG_FILE, *TOKENIZER_FILES):  # ours win over what the exporter re-saved
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
