"""Export stage: an hf artifact -> a gguf artifact with one `model-<type>.gguf` per requested type.

F32/F16/BF16/Q8_0 are written by edgeft.gguf_writer; K-quants and Q4_0 come from llama.cpp's own
quantizer run on the F16 file. The tokenizer files ride along so the device can tokenize. A light
parity gate runs llama.cpp in a subprocess (a malformed GGUF can abort the process that loads it):
every file must load and generate; on the gate file (F16, else the first float file, else the
first) llama.cpp's tokenization must equal the HF tokenizer's and its logits must stay within the
type's tolerance of PyTorch FP32, with greedy tokens differing only at near-ties.
"""

from __future__ import annotations

import ctypes
import json
import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft import artifact, gguf_writer
from edgeft.artifact import Artifact
from edgeft.constants import KIND_GGUF, KIND_HF, TMP_PREFIX, TOKENIZER_FILES
from edgeft.errors import StageFailure, UserError

STAGE = "export_gguf"
# llama.cpp quantizer targets, by llama_ftype constant name in llama_cpp
_LLAMA_FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                 "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
_NOMINAL = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
            "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
VALID_TYPES = gguf_writer.OUT_TYPES + tuple(_LLAMA_FTYPES)
# Gate tolerance: max |logit - torch| / max |torch logit| for the gate file (F16 KV cache, as deployed).
# Observed on the tiny test Llama: f32 1.1e-3, f16 1.9e-3, bf16 1.4e-2; a q/k permutation bug gives ~1.
_REL_TOL = {"f32": 0.01, "f16": 0.02, "bf16": 0.08}
# Tokenization samples: digits, punctuation, newlines, tabs, non-ASCII. None starts with a space:
# HF's fast Metaspace drops one "▁" of leading whitespace where SentencePiece and llama.cpp keep it.
GATE_TEXTS = ("Hello world", "Fault code E-1024: replace the pump.\nTorque 45 Nm, every 12000 km.",
              "Step 1:\tcheck the valve\n\nStep 2: café ✓ 日本", "x = (a + b) * 3.14;")
GATE_PROMPTS = ("The quick brown fox", "Question: what is the torque?\nAnswer:")
_GATE_NEW_TOKENS = 16
_CHILD_TIMEOUT_S = 900


@dataclass(frozen=True)
class Config:
    """What export_gguf builds."""

    types: tuple[str, ...] = ("f16", "q8_0", "q4_k_m")  # files to build, one per type (VALID_TYPES)
    threads: int = 2  # llama.cpp quantizer threads (the gate runs on one: it checks, it does not time)


def run(src: Artifact, cfg: Config, out: Path) -> Artifact:
    """Convert an hf artifact to GGUF files of `cfg.types`, gate them against PyTorch, publish at `out`."""
    if src.kind != KIND_HF:
        raise UserError(f"{src.path}: artifact kind is '{src.kind}', {STAGE} needs {KIND_HF}; "
                        "pass the output of train or merge")
    types = validate(cfg)

    def payload(staging: Path) -> dict:
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=staging.parent) as tmp:
            files, metrics = _build_files(src.path, types, cfg.threads, staging, Path(tmp))
            for name in ("config.json", *TOKENIZER_FILES):
                if (src.path / name).is_file():
                    shutil.copy2(src.path / name, staging / name)
            metrics["parity"] = _parity_gate(src.path, files, Path(tmp))
        return metrics

    return artifact.build(out, kind=KIND_GGUF, stage=STAGE, params=cfg, parent=src, payload=payload)


def gguf_file(art: Artifact, gguf_type: str) -> Path:
    """Path of the `gguf_type` file inside a gguf artifact."""
    path = art.path / f"model-{gguf_type}.gguf"
    if not path.is_file():
        built = sorted(p.stem.removeprefix("model-") for p in art.path.glob("model-*.gguf"))
        raise UserError(f"{art.path}: no {gguf_type} GGUF; built: {', '.join(built) or 'none'}")
    return path


def validate(cfg: Config) -> tuple[str, ...]:
    types = tuple(cfg.types)
    bad = [t for t in types if t not in VALID_TYPES]
    if bad or not types:
        raise UserError(f"export_gguf.types: {', '.join(map(repr, bad)) or 'empty'} invalid; "
                        f"valid types: {', '.join(VALID_TYPES)}")
    if len(set(types)) != len(types):
        raise UserError(f"export_gguf.types lists a type twice: {list(types)}")
    if cfg.threads < 1:
        raise UserError(f"export_gguf.threads must be >= 1, got {cfg.threads}")
    return types


def _build_files(hf_dir: Path, types: tuple[str, ...], threads: int, staging: Path,
                 tmp: Path) -> tuple[dict[str, Path], dict]:
    """Write every requested file; the F16 base of llama.cpp's quantizer goes to `tmp` unless requested."""
    files, per_file, n_params = {}, {}, 0
    base = staging / "model-f16.gguf" if "f16" in types else tmp / "base-f16.gguf"
    if "f16" not in types and any(t in _LLAMA_FTYPES for t in types):
        n_params = gguf_writer.convert(hf_dir, base, "f16", name=hf_dir.name)["n_params"]
    for t in sorted(types, key=lambda t: t in _LLAMA_FTYPES):  # ours first: the quantizer reads the F16
        path = staging / f"model-{t}.gguf"
        if t in gguf_writer.OUT_TYPES:
            info = gguf_writer.convert(hf_dir, path, t, name=hf_dir.name)
            n_params = info["n_params"]
        else:
            _llama_quantize(base, path, t, threads)
            info = {}
        files[t] = path
        per_file[t] = _describe(path, t, info)
    for t, meta in per_file.items():
        meta["bits_per_weight"] = round(meta["size_bytes"] * 8 / n_params, 3)
    return files, {"files": per_file, "n_params": n_params}


def _llama_quantize(src: Path, dst: Path, gguf_type: str, threads: int) -> None:
    import llama_cpp

    # llama-cpp-python prints every llama.cpp log line until its logger level is set; the per-tensor
    # choices it would print are recorded in the metrics instead
    log = logging.getLogger("llama-cpp-python")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = getattr(llama_cpp, _LLAMA_FTYPES[gguf_type])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise StageFailure(f"llama.cpp quantization {src.name} -> {gguf_type} failed (code {rc})")


def _describe(path: Path, gguf_type: str, info: dict) -> dict:
    """Size, tensor types, and the 2-D tensors not stored in the type's nominal format."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    counts: dict[str, int] = {}
    other: dict[str, str] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if len(t.shape) > 1 and t.tensor_type.name != _NOMINAL[gguf_type]:
            other[t.name] = t.tensor_type.name
    return {"file": path.name, "size_bytes": path.stat().st_size, "tensor_types": counts,
            # writer files: why a tensor fell back; llama.cpp files: its per-tensor mix and fallbacks
            "fallbacks": info.get("fallbacks", other)}


def _parity_gate(hf_dir: Path, files: dict[str, Path], tmp: Path) -> dict:
    """Load every file in a subprocess; check the gate file's tokenization and logits against HF/torch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [tok(p).input_ids for p in GATE_PROMPTS]
    results = _run_child(files, prompts, tmp)
    gate_type = next((t for t in ("f16", "f32", "bf16") if t in files), next(iter(files)))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report: dict = {"gate_file": files[gate_type].name, "files": {}}
    for t, res in results.items():
        report["files"][t] = _compare_logits(model, prompts, res, tmp / f"logits-{t}.npz")
    problems = _tokenization_problems(tok, results[gate_type])
    report["tokenization_match"] = not problems
    g, tol = report["files"][gate_type], _REL_TOL.get(gate_type)
    if tol is not None and g["rel_logit_diff"] > tol:
        problems.append(f"logits differ from torch fp32 by {g['rel_logit_diff']:.3g} relative "
                        f"(tolerance {tol}): a tensor layout or metadata problem "
                        "(rope, q/k permutation, norms)")
    if tol is not None and g["decisive_mismatches"]:
        problems.append(f"greedy tokens differ from torch fp32 where torch was decisive: "
                        f"{g['decisive_mismatches'][:3]}")
    if problems:
        raise StageFailure(f"GGUF parity gate failed on {files[gate_type].name}: " + "; ".join(problems))
    return report


def _tokenization_problems(tok, res: dict) -> list[str]:
    """llama.cpp ids vs the HF tokenizer's, without and with special tokens (BOS/EOS flags)."""
    for i, text in enumerate(GATE_TEXTS):
        for hf, llama in ((tok(text, add_special_tokens=False).input_ids, res["tokens"][i]),
                          (tok(text).input_ids, res["tokens_special"][i])):
            if hf != llama:
                return [f"tokenization of {text!r} differs from the HF tokenizer: HF {hf}, llama.cpp {llama} "
                        "(check add_bos/add_eos, the space prefix and the SentencePiece normalizer)"]
    return []


def _compare_logits(model, prompts: list[list[int]], res: dict, npz: Path) -> dict:
    """llama.cpp logits and greedy path vs torch fp32 teacher-forced on the same ids."""
    import torch

    worst, scale, agree, total, decisive = 0.0, 0.0, 0, 0, []
    with np.load(npz) as saved:
        for i, (prompt, greedy) in enumerate(zip(prompts, res["greedy"])):
            seq = prompt + greedy
            with torch.no_grad():
                ref = model(torch.tensor([seq])).logits[0].float().numpy()
            got = saved[f"arr_{i}"]
            err = float(np.abs(got - ref).max())
            worst, scale = max(worst, err), max(scale, float(np.abs(ref).max()))
            rows = ref[len(prompt) - 1:len(seq) - 1]  # the rows that chose each generated token
            for j, token in enumerate(greedy):
                best = int(rows[j].argmax())
                total += 1
                agree += best == token
                # a greedy difference is explained by numerics only where torch's margin is within 2x err
                if best != token and rows[j, best] - rows[j, token] > 2 * err:
                    decisive.append({"prompt": i, "position": j, "torch": best, "llama_cpp": token})
    return {"max_abs_logit_diff": worst, "rel_logit_diff": worst / scale if scale else 0.0,
            "top1_agreement": agree / total if total else 1.0, "greedy_tokens": total,
            "decisive_mismatches": decisive}


def _run_child(files: dict[str, Path], prompts: list[list[int]], tmp: Path) -> dict[str, dict]:
    """Run _child_main in a fresh interpreter; a crash names the file that was loading."""
    job = {"files": {t: str(p) for t, p in files.items()}, "texts": list(GATE_TEXTS),
           "prompts": prompts, "max_new": _GATE_NEW_TOKENS, "out": str(tmp)}
    code = "from edgeft.stages.export_gguf import _child_main; _child_main()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True,
                              text=True, timeout=_CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StageFailure(f"the llama.cpp parity check did not finish in {_CHILD_TIMEOUT_S} s") from None
    results, loading = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            msg = json.loads(line)
            if "loading" in msg:
                loading = msg["loading"]
            else:
                results[msg["type"]] = msg
    if proc.returncode != 0 or len(results) != len(files):
        tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
        raise StageFailure(f"llama.cpp could not load or run {files.get(loading, loading)} "
                           f"(exit code {proc.returncode}):\n{tail}")
    return results


def _child_main() -> None:
    """Subprocess side of the gate: per file, tokenize the texts, generate greedily, save logits."""
    from edgeft.runtime.gguf import GGUFRuntime

    job = json.loads(sys.stdin.read())
    n_ctx = max(len(p) for p in job["prompts"]) + job["max_new"]
    for t, path in job["files"].items():
        print(json.dumps({"loading": t}), flush=True)
        with GGUFRuntime(path, n_threads=1, n_ctx=n_ctx) as rt:
            greedy = [rt.generate(p, job["max_new"]).tokens for p in job["prompts"]]
            logits = [rt.logits(p + g) for p, g in zip(job["prompts"], greedy)]
            np.savez(Path(job["out"]) / f"logits-{t}.npz", *logits)
            print(json.dumps({"type": t, "greedy": greedy,
                              "tokens": [rt.tokenize(s, add_bos=False) for s in job["texts"]],
                              "tokens_special": [rt.tokenize(s, add_bos=True) for s in job["texts"]]}),
                  flush=True)
