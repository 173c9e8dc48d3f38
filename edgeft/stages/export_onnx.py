"""Export an hf artifact to ONNX: one standalone model dir per type, each checked against PyTorch.

fp32 comes from optimum-onnx (`text-generation-with-past`, TorchScript exporter, KV cache as
inputs/outputs); the other types are derived from that graph: fp16 by onnxruntime's float16
converter (weights, activations and KV cache in fp16, the RMSNorm square/mean kept in fp32), int8
by dynamic quantization, int4 as MatMulNBits (round to nearest per block). optimum's own fp16
export was measured too: half the logit error on llama (0.012 vs 0.027), but on gemma it leaves
most weights fp32 (0.92x the fp32 size) and emits fp32 KV outputs, so the converter is the one path.

Every type dir holds `model.onnx` (weights in `model.onnx*` external data files past the 2 GB
protobuf limit), config.json and the tokenizer files, so `edgeft.runtime.onnx.OnnxRuntime` runs it
alone on the device. The parity gate runs greedy decoding and teacher-forced logits through that
same runtime: fp32 must reproduce PyTorch's greedy tokens (a near-tie flip is recorded, not
failed); the other types record their top-1 agreement.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft import artifact
from edgeft.artifact import Artifact
from edgeft.constants import KIND_HF, KIND_ONNX, TOKENIZER_FILES
from edgeft.errors import StageFailure, UserError
from edgeft.runtime.onnx import CONFIG_FILE, MODEL_FILE, OnnxRuntime, eos_ids

STAGE = "export_onnx"
VALID_TYPES = ("fp32", "fp16", "int8", "int4")  # also the order they are produced in
# model_type values whose optimum-onnx text-generation export was checked with OnnxRuntime
# (greedy tokens equal to PyTorch, max|logit diff| <= 5e-5, tiny random configs, optimum-onnx 0.1.0)
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text",
                   "granite", "olmo", "olmo2", "smollm3", "stablelm", "cohere", "glm", "nemotron")
PARITY_TEXTS = ("The quick brown fox jumps over", "Question: How do I reset the unit?\nAnswer:",
                "1, 2, 3, 4,")  # plus one chat-template prompt when the tokenizer has a template
_PROTOBUF_LIMIT = 2 << 30  # bytes: larger graphs must keep their weights in external data
_INT4_BLOCKS = (16, 32, 64, 128, 256)  # MatMulNBits needs a power of two >= 16
_TIE_REL = 1e-4  # top-2 gap / top logit below which fp32 may flip (noise seen: ~2e-6)


@dataclass(frozen=True)
class Config:
    types: tuple[str, ...] = ("fp32", "int8")  # subdirs to write, from VALID_TYPES
    int8_per_channel: bool = True  # scale per output column: top-1 0.86 vs 0.85 per-tensor (tiny model)
    int8_reduce_range: bool = True  # 7-bit weights: without VNNI (AVX2) 8-bit u8s8 saturates, top-1 0.78
    int4_block_size: int = 32  # weights per MatMulNBits scale; K not a multiple is zero-padded
    int4_symmetric: bool = True  # no zero points: smaller, and RTN symmetric matched asymmetric here
    int4_accuracy_level: int = 4  # 4 = int8 activations on CPU (fastest); 0 = fp32 activations
    parity_new_tokens: int = 16  # greedy tokens compared per parity prompt


@dataclass(frozen=True)
class _Reference:
    prompt: list[int]
    tokens: list[int]  # torch greedy continuation, EOS excluded
    logits: np.ndarray  # torch teacher-forced logits over prompt + tokens, float32


def run(src: Artifact, cfg: Config, out: Path) -> Artifact:
    """Export `src` (kind hf) to an onnx artifact at `out` with one model dir per type in `cfg.types`."""
    if src.kind != KIND_HF:
        raise UserError(f"{src.path}: export_onnx needs an '{KIND_HF}' artifact (a merged or trained "
                        f"model), got '{src.kind}'; pass the output of train or merge")
    types = validate(cfg)
    model_type = _check_arch(src.path)
    return artifact.build(out, kind=KIND_ONNX, stage=STAGE, params=cfg, parent=src,
                          payload=lambda staging: _export_all(src.path, cfg, types, staging),
                          inputs={"model_type": model_type})


def validate(cfg: Config) -> tuple[str, ...]:
    """The requested types in production order; a bad value is a UserError naming the key."""
    if isinstance(cfg.types, str) or not cfg.types:
        raise UserError(f"export_onnx.types must be a non-empty list drawn from {list(VALID_TYPES)}, "
                        f"got {cfg.types!r}")
    unknown = [t for t in cfg.types if t not in VALID_TYPES]
    if unknown:
        raise UserError(f"export_onnx.types: unknown {unknown}; valid types are {list(VALID_TYPES)}")
    if cfg.int4_block_size not in _INT4_BLOCKS:
        raise UserError(f"export_onnx.int4_block_size={cfg.int4_block_size}: MatMulNBits needs one of "
                        f"{list(_INT4_BLOCKS)}")
    if cfg.int4_accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"export_onnx.int4_accuracy_level={cfg.int4_accuracy_level}: use 0-4 "
                        "(4 = int8 activations, 0 = unset)")
    if cfg.parity_new_tokens < 1:
        raise UserError("export_onnx.parity_new_tokens must be >= 1")
    return tuple(t for t in VALID_TYPES if t in cfg.types)


def _check_arch(hf_dir: Path) -> str:
    """config.json's model_type, refused unless in SUPPORTED_ARCHS."""
    cfg_path = hf_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir}: no {CONFIG_FILE}; the hf artifact is incomplete, rerun its stage")
    model_type = json.loads(cfg_path.read_text()).get("model_type")
    if model_type not in SUPPORTED_ARCHS:
        raise UserError(f"{cfg_path}: model_type {model_type!r} is not supported by the ONNX export; "
                        f"supported: {', '.join(SUPPORTED_ARCHS)} (or export GGUF instead)")
    return model_type


def _export_all(hf_dir: Path, cfg: Config, types: tuple[str, ...], staging: Path) -> dict:
    """Write every type dir under `staging` and return the metrics (per type: size, seconds, parity)."""
    base = staging / ("fp32" if "fp32" in types else ".fp32-base")
    t0 = time.perf_counter()
    _optimum_export(hf_dir, base)
    fp32_s = time.perf_counter() - t0
    refs = _torch_references(hf_dir, base, cfg.parity_new_tokens)
    _check_graph(base)
    gate = _parity(base, refs, "fp32", cfg.parity_new_tokens)  # raises unless greedy matches
    large = _model_bytes(base) > _PROTOBUF_LIMIT // 2  # headroom: quantizers also store scales
    per_type = {}
    for t in types:
        if t == "fp32":
            per_type[t] = {"size_bytes": _model_bytes(base), "export_s": round(fp32_s, 3), **gate}
            continue
        out = staging / t
        t0 = time.perf_counter()
        if t == "fp16":
            _convert_fp16(base, out, large)
        elif t == "int8":
            _quantize_int8(base, out, cfg, large)
        elif t == "int4":
            _quantize_int4(base, out, cfg, large)
        seconds = time.perf_counter() - t0  # from the fp32 graph, excluding its export
        _check_graph(out)
        per_type[t] = {"size_bytes": _model_bytes(out), "export_s": round(seconds, 3),
                       **_parity(out, refs, t, cfg.parity_new_tokens)}
    metrics = {"types": per_type, "parity_prompts": len(refs),
               "parity_positions": sum(len(r.logits) for r in refs)}
    if "fp32" not in types:  # the gate ran on the base graph the quantized types came from
        shutil.rmtree(base)
        metrics["fp32_gate"] = {"export_s": round(fp32_s, 3), **gate}
    return metrics


def _optimum_export(hf_dir: Path, out: Path) -> None:
    """optimum-onnx fp32 export of the local model dir (offline), then the tokenizer files beside it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from optimum.exporters.onnx import main_export

    # TracerWarnings by the hundred and a torch_dtype deprecation inside optimum: the gate is the check
    with warnings.catch_warnings(), _quiet("transformers"):
        warnings.simplefilter("ignore")
        main_export(str(hf_dir), output=str(out), task="text-generation-with-past", dtype="fp32",
                    device="cpu", library_name="transformers", local_files_only=True,
                    do_validation=False)
    if not (out / MODEL_FILE).is_file():
        raise StageFailure(f"optimum-onnx wrote no {MODEL_FILE} in {out} (files: "
                           f"{sorted(p.name for p in out.iterdir())})")
    for name in (CONFIG_FILE, *TOKENIZER_FILES):
        if (hf_dir / name).is_file() and not (out / name).exists():
            shutil.copy2(hf_dir / name, out / name)


def _convert_fp16(base: Path, out: Path, large: bool) -> None:
    """fp16 everywhere (IO and KV cache included) except the norms' square and mean (they can overflow)."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    _copy_sidecars(base, out)
    # a path, not a ModelProto: the converter then runs shape inference on disk, fine past 2 GB
    model = convert_float_to_float16(str(base / MODEL_FILE), keep_io_types=False,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Pow", "ReduceMean"])
    OnnxModel(model).topological_sort()  # the casts around blocked ops are appended out of order
    onnx.save(model, str(out / MODEL_FILE), save_as_external_data=large,
              all_tensors_to_one_file=True, location=MODEL_FILE + "_data")


def _quantize_int8(base: Path, out: Path, cfg: Config, large: bool) -> None:
    """Dynamic int8: weights quantized offline, activations per tensor at run time (MatMul, Gather)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _copy_sidecars(base, out)
    with _quiet(""):  # a root-logger hint to pre-process: measured, no accuracy change for int8 here
        quantize_dynamic(base / MODEL_FILE, out / MODEL_FILE, weight_type=QuantType.QInt8,
                         per_channel=cfg.int8_per_channel, reduce_range=cfg.int8_reduce_range,
                         use_external_data_format=large)


def _quantize_int4(base: Path, out: Path, cfg: Config, large: bool) -> None:
    """Weight-only int4 (round to nearest, per block) as com.microsoft MatMulNBits nodes."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)

    _copy_sidecars(base, out)
    algo = DefaultWeightOnlyQuantConfig(block_size=cfg.int4_block_size,
                                        is_symmetric=cfg.int4_symmetric,
                                        accuracy_level=cfg.int4_accuracy_level,
                                        op_types_to_quantize=("MatMul",))
    with _quiet("onnxruntime.quantization.matmul_nbits_quantizer"):  # one INFO line per node
        quant = MatMulNBitsQuantizer(onnx.load(str(base / MODEL_FILE)), algo_config=algo)
        quant.process()
        quant.model.save_model_to_file(str(out / MODEL_FILE), use_external_data_format=large)


@contextmanager
def _quiet(logger_name: str):
    """Raise one logger to ERROR for the duration (quantizers log progress at INFO/WARNING)."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _copy_sidecars(base: Path, out: Path) -> None:
    """config.json and tokenizer files from the fp32 dir: every type dir runs standalone."""
    out.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():
        if p.is_file() and not p.name.startswith(MODEL_FILE):
            shutil.copy2(p, out / p.name)


def _check_graph(model_dir: Path) -> None:
    """onnx.checker on the file path (the only form that works past 2 GB with external data)."""
    import onnx

    try:
        onnx.checker.check_model(str(model_dir / MODEL_FILE))
    except onnx.checker.ValidationError as e:
        raise StageFailure(f"{model_dir / MODEL_FILE}: fails onnx.checker: {e}") from None


def _model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob(MODEL_FILE + "*") if p.is_file())


def _torch_references(hf_dir: Path, fp32_dir: Path, n_new: int) -> list[_Reference]:
    """Prompts from the tokenizer, torch fp32 greedy continuations and teacher-forced logits."""
    import torch
    from jinja2.exceptions import TemplateError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tok(text).input_ids for text in PARITY_TEXTS]
    if tok.chat_template:
        try:
            prompts.append(tok.apply_chat_template(
                [{"role": "user", "content": "What does error code E4 mean?"}],
                add_generation_prompt=True, tokenize=True))
        except TemplateError:  # templates that insist on a system turn or other roles
            pass
    eos = eos_ids(fp32_dir)  # the stop rule the device runtime uses
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    refs = []
    with torch.no_grad():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens: list[int] = []
            while len(tokens) < n_new:
                nxt = int(out.logits[0, -1].argmax())
                if nxt in eos:
                    break
                tokens.append(nxt)
                out = model(torch.tensor([[nxt]]), past_key_values=out.past_key_values, use_cache=True)
            logits = model(torch.tensor([ids + tokens])).logits[0].float().numpy()
            refs.append(_Reference(list(ids), tokens, logits))
    del model
    return refs


def _parity(model_dir: Path, refs: list[_Reference], type_name: str, n_new: int) -> dict:
    """Greedy and teacher-forced comparison with torch; fp32 must match greedy unless at a near-tie."""
    rt = OnnxRuntime(model_dir)
    greedy_ok, ties, agree, max_diff = 0, 0, [], 0.0
    try:
        for i, ref in enumerate(refs):
            logits = rt.logits(ref.prompt + ref.tokens)
            diff = np.abs(logits - ref.logits).max(axis=-1)
            max_diff = max(max_diff, float(diff.max()))
            agree.append(logits.argmax(-1) == ref.logits.argmax(-1))
            got = rt.generate(ref.prompt, n_new).tokens
            if got == ref.tokens:
                greedy_ok += 1
                continue
            if type_name != "fp32":
                continue
            k = next((j for j, (a, b) in enumerate(zip(got, ref.tokens)) if a != b),
                     min(len(got), len(ref.tokens)))
            row = len(ref.prompt) + k - 1  # the logits row that chose new token k
            ours = got[k] if k < len(got) else None  # None: the ONNX model stopped at EOS
            runner_up = int(np.argsort(ref.logits[row])[-2])
            top = float(ref.logits[row].max())
            margin = top - float(ref.logits[row, runner_up])
            took_runner_up = ours == runner_up if ours is not None else runner_up in rt.eos_ids
            if took_runner_up and margin <= _TIE_REL * max(1.0, abs(top)):
                ties += 1  # fp32 rounding can flip a near-tie; the rest of this prompt diverges
                continue
            theirs = ref.tokens[k] if k < len(ref.tokens) else "EOS"
            raise StageFailure(
                f"{model_dir}: fp32 ONNX greedy tokens differ from PyTorch on parity prompt {i} at "
                f"new token {k}: torch {theirs} vs onnx {'EOS' if ours is None else ours}; torch "
                f"top-2 margin {margin:.3g} (not a near-tie), max|logit diff| {float(diff[row]):.3g} "
                f"at that position. The exported graph computes something else: check config.json "
                f"(rope_scaling, sliding_window, attention settings) against what optimum-onnx "
                f"supports for this model_type, or export GGUF instead")
    finally:
        rt.close()
    metrics = {"greedy_match": round(greedy_ok / len(refs), 4),
               "top1_agreement": round(float(np.concatenate(agree).mean()), 4),
               "max_abs_logit_diff": float(f"{max_diff:.4g}")}
    if type_name == "fp32":
        metrics["greedy_near_tie_flips"] = ties
    return metrics
