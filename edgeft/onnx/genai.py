"""The `genai` route of export_onnx: the onnxruntime-genai model builder as a pinned converter.

The builder (fused QKV and gate/up, GroupQueryAttention, MatMulNBits) needs transformers 5, which
cannot share the main environment with optimum-onnx, so it runs as a subprocess in its own venv
(`make genai-env` creates `.venv-genai`; EDGEFT_GENAI_PYTHON points elsewhere). Its output runs
under `onnxruntime_genai` in the main env (`edgeft.runtime.onnx_genai.GenaiRuntime`).

Two traps, handled here: the builder treats any Linear whose out_features equals the vocab size as
the LM head (such dims are refused), and transformers 5 re-saves SentencePiece tokenizers wrongly
(the builder's tokenizer files are replaced by the hf artifact's own; the gate checks the ids).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from edgeft import shapes
from edgeft.constants import TOKENIZER_FILES
from edgeft.errors import StageFailure, UserError
from edgeft.runtime.onnx import CONFIG_FILE, MODEL_FILE

GENAI_ARCHS = ("llama", "mistral", "qwen2")  # model_types checked: builder fp32 greedy == torch (tiny configs)
GENAI_TYPES = ("fp32", "int4")  # builder precisions this route offers (CPU)
GENAI_PYTHON_ENV = "EDGEFT_GENAI_PYTHON"  # env var: the converter venv's python, instead of .venv-genai
_VENV = Path(__file__).resolve().parents[2] / ".venv-genai"  # made by `make genai-env`
_BUILDER = "onnxruntime_genai.models.builder"
_CONVERTER_PKGS = ("onnxruntime-genai", "transformers", "torch", "onnxruntime", "onnx")
# files the builder writes beside the model that transformers 5 produced: replaced by the hf artifact's own
_BUILDER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "tokenizer.model", "chat_template.jinja", "added_tokens.json")


def converter_python() -> Path:
    """The converter venv's python; a UserError telling how to create it when it is missing."""
    env = os.environ.get(GENAI_PYTHON_ENV)
    py = Path(env) if env else _VENV / "bin" / "python"
    if not py.is_file():
        where = f"{GENAI_PYTHON_ENV}={env}" if env else str(_VENV)
        raise UserError(f"export_onnx.route=genai needs the onnxruntime-genai builder env ({where} not "
                        "found): run `make genai-env` once (a separate venv with transformers 5, ~2 GB), "
                        "or use export_onnx.route=optimum")
    return py


def converter_versions(py: Path) -> dict:
    """Versions of the converter env's packages (recorded in the artifact's inputs and manifest)."""
    code = ("import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in "
            f"{list(_CONVERTER_PKGS)!r}}} | {{'python': sys.version.split()[0]}}))")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UserError(f"{py}: the genai converter env is broken ({_last_line(proc)}); delete "
                        f"{_VENV} and run `make genai-env` again")
    return json.loads(proc.stdout)


def check_model_dims(hf_dir: Path) -> None:
    """Refuse configs where a non-head Linear has vocab_size outputs: the builder takes it for the LM head."""
    cfg = json.loads((hf_dir / CONFIG_FILE).read_text())
    vocab = cfg.get("vocab_size")
    try:
        d = shapes.head_dim(cfg)
        q_dim, kv_dim = shapes.n_heads(cfg) * d, shapes.kv_heads(cfg) * d
    except (KeyError, TypeError, ZeroDivisionError):  # no attention shape: the builder says what is missing
        q_dim = kv_dim = 0
    dims = {"intermediate_size": cfg.get("intermediate_size"), "hidden_size": cfg.get("hidden_size"),
            "num_attention_heads * head_dim": q_dim, "num_key_value_heads * head_dim": kv_dim}
    clash = [k for k, v in dims.items() if v == vocab]
    if clash:
        raise UserError(f"{hf_dir / CONFIG_FILE}: {clash[0]} equals vocab_size ({vocab}); the "
                        "onnxruntime-genai builder would take that Linear for the LM head and export a "
                        "wrong model; use export_onnx.route=optimum for this model")


def build(hf_dir: Path, out: Path, type_name: str, cfg) -> dict:
    """Run the builder for one type into `out` (a standalone type dir); returns what was applied."""
    py = converter_python()
    cache = out.parent / f".genai-cache-{type_name}"
    opts = {"hf_token": "false", "filename": MODEL_FILE}
    if type_name == "int4":
        opts.update(block_size=cfg.int4_block_size, is_symmetric=str(cfg.int4_symmetric).lower(),
                    accuracy_level=cfg.int4_accuracy_level,
                    op_types_to_quantize="MatMul/Gather" if cfg.int4_embeddings else "MatMul")
    cmd = [str(py), "-m", _BUILDER, "-i", str(hf_dir), "-o", str(out), "-p", type_name, "-e", "cpu",
           "-c", str(cache), "--extra_options", *(f"{k}={v}" for k, v in opts.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)  # the converter must see only its own venv
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out / MODEL_FILE).is_file():
        raise StageFailure(f"onnxruntime-genai builder failed for {type_name} (exit {proc.returncode}): "
                           f"{_last_line(proc)}; command: {' '.join(cmd)}")
    for name in _BUILDER_TOKENIZER_FILES:  # transformers 5's re-saved tokenizer: never ship it
        (out / name).unlink(missing_ok=True)
    for name in (CONFIG_FILE, *TOKENIZER_FILES):
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / name)
    quant = ({"algo": "rtn", "block_size": cfg.int4_block_size, "symmetric": cfg.int4_symmetric,
              "accuracy_level": cfg.int4_accuracy_level,
              "embeddings": "int4 rtn" if cfg.int4_embeddings else "fp32"} if type_name == "int4" else {})
    import onnxruntime_genai

    return {"route": "genai", "runtime": "edgeft.runtime.onnx_genai.GenaiRuntime",
            "runtime_version": onnxruntime_genai.__version__, "builder": _BUILDER,
            "converter_versions": converter_versions(py), "quant": quant}


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr or proc.stdout or "").strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"

