"""The GGUF parity gate: llama.cpp (in a subprocess) against the HF tokenizer and PyTorch FP32.

A malformed GGUF can abort the process that loads it, so every file is loaded in a fresh
interpreter. Every file must load and generate; on the gate file (F16, else the first float file,
else the first) llama.cpp's tokenization must equal the HF tokenizer's and its logits must stay
within the type's tolerance of PyTorch FP32, with greedy tokens differing only at near-ties. A
LoRA adapter file, when given, is applied over every file at run time (the shipped pair).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from edgeft import host
from edgeft.errors import StageFailure
from edgeft.parity_stats import Agreement

# Gate tolerance: max |logit - torch| / max |torch logit| for the gate file (F16 KV cache, as deployed).
# Observed on the tiny test Llama: f32 1.1e-3, f16 1.9e-3, bf16 1.4e-2; a q/k permutation bug gives ~1.
_REL_TOL = {"f32": 0.01, "f16": 0.02, "bf16": 0.08}
# Tokenization samples: digits, punctuation, newlines, tabs, non-ASCII. None starts with a space:
# HF's fast Metaspace drops one "▁" of leading whitespace where SentencePiece and llama.cpp keep it.
GATE_TEXTS = ("Hello world", "Fault code E-1024: replace the pump.\nTorque 45 Nm, every 12000 km.",
              "Step 1:\tcheck the valve\n\nStep 2: café ✓ 日本", "x = (a + b) * 3.14;")
GATE_PROMPTS = ("The quick brown fox", "Question: what is the torque?\nAnswer:")
_GATE_NEW_TOKENS = 24  # greedy tokens per prompt: long enough for the demo's answers to reach EOS
_CHILD_TIMEOUT_S = 900


def parity_gate(hf_dir: Path, files: dict[str, Path], tmp: Path, lora: Path | None = None,
                evals: list[dict] | None = None, min_top1: dict[str, float] | None = None, threads: int = 1,
                explain: Callable[[str], str] | None = None) -> dict:
    """Load every file in a subprocess; check the gate file's tokenization and logits against HF/torch.

    `hf_dir` is the reference model (the merged one when `lora` is applied over the files). `evals`
    ({"prompt": text, "ids": prompt ids, "full": prompt + answer ids, "start": first answer index})
    adds, per eval conversation: llama.cpp's tokenization of the prompt text, and teacher-forced
    top-1 agreement and KL(torch || llama.cpp) on the answer tokens (as the bench measures them) of
    every file, held to `min_top1[type]`; `explain(type)` adds what is known of why a type fell short."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    evals = evals or []
    # greedy paths on the fixed prompts and every eval prompt, checked where torch was decisive
    prompts = [tok(p).input_ids for p in GATE_PROMPTS] + [e["ids"] for e in evals]
    keep = keep_rows(prompts)
    results = run_child(files, prompts, tmp, lora, evals, keep, threads)
    gate_type = next((t for t in ("f16", "f32", "bf16") if t in files), next(iter(files)))
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    report: dict = {"gate_file": files[gate_type].name, "files": {}}
    for t, res in results.items():
        report["files"][t] = _compare_logits(model, prompts, keep, res, tmp / f"logits-{t}.npz")
    problems = _tokenization_problems(tok, results[gate_type])
    if evals:
        problems += _eval_tokenization_problems(evals, results[gate_type])
        report["eval_prompts"] = len(evals)
        for t, res in results.items():  # generation must end at EOS as torch's does (the bench counts on it)
            report["files"][t]["eval_eos_stops"] = sum(res["stopped"][len(GATE_PROMPTS):])
        for t, stats in _teacher_forced(model, evals, list(results), tmp).items():
            report["files"][t].update(stats)
        for t in results:
            need = (min_top1 or {}).get(t)
            got = report["files"][t]["tf_top1_agreement"]
            if need is not None and got < need:
                problems.append(f"{files[t].name}: teacher-forced top-1 agreement {got:.4f} < {need} on "
                                f"{len(evals)} eval conversations (KL {report['files'][t]['tf_kld']:.4g})"
                                f"{explain(t) if explain else ''}; use a wider type, export_gguf.imatrix=true, "
                                "or lower export_gguf.min_top1_*")
    report["tokenization_match"] = not any("tokeniz" in p for p in problems)
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


def _eval_tokenization_problems(evals: list[dict], res: dict) -> list[str]:
    for e, llama in zip(evals, res["eval_tokens"]):
        if llama != e["ids"]:
            return [f"tokenization of eval prompt {e['prompt']!r} differs from the HF tokenizer: HF {e['ids']}, "
                    f"llama.cpp {llama}"]
    return []


def keep_rows(prompts: list[list[int]]) -> list[int]:
    """Per greedy prompt, the first logits row the child keeps: every row of the fixed gate prompts, and of an
    eval prompt only the rows that choose generated tokens (its whole prompt's rows at a 49k vocabulary
    would be ~50 MB a prompt, gigabytes a file, for rows the teacher-forced check covers anyway)."""
    return [0 if i < len(GATE_PROMPTS) else len(p) - 1 for i, p in enumerate(prompts)]


def _teacher_forced(model, evals: list[dict], types: list[str], tmp: Path) -> dict[str, dict]:
    """Per file: top-1 agreement (with its 95% lower bound) and mean KL(torch || llama.cpp) over the answer
    positions of the eval conversations; one torch pass per conversation, reduced at once (edgeft.parity_stats).
    The child saved only those rows."""
    import torch

    stats = {t: Agreement() for t in types}
    with ExitStack() as stack:
        saved = {t: stack.enter_context(np.load(tmp / f"tf-{t}.npz")) for t in types}
        for i, e in enumerate(evals):
            with torch.no_grad():
                ref = model(torch.tensor([e["full"]])).logits[0].float().numpy()
            s, end = e["start"] - 1, len(e["full"]) - 1  # the rows that predict the answer
            for t in types:
                stats[t].add(ref[s:end], saved[t][f"arr_{i}"], label=f"eval {i}")
            del ref
    out = {}
    for t, a in stats.items():
        out[t] = {"tf_top1_agreement": a.top1 if a.positions else 1.0, "tf_kld": a.kld if a.positions else 0.0,
                  "tf_positions": a.positions, "tf_top1_lower95": a.lower_bound(), "tf_prompts": a.prompts}
    return out


def _compare_logits(model, prompts: list[list[int]], keep: list[int], res: dict, npz: Path) -> dict:
    """llama.cpp logits and greedy path vs torch fp32 teacher-forced on the same ids (the rows from keep[i])."""
    import torch

    worst, scale, agree, total, decisive = 0.0, 0.0, 0, 0, []
    with np.load(npz) as saved:
        for i, (prompt, greedy) in enumerate(zip(prompts, res["greedy"])):
            seq = prompt + greedy
            with torch.no_grad():
                ref = model(torch.tensor([seq])).logits[0].float().numpy()[keep[i]:]
            got = saved[f"arr_{i}"]
            err = float(np.abs(got - ref).max())
            worst, scale = max(worst, err), max(scale, float(np.abs(ref).max()))
            rows = ref[len(prompt) - 1 - keep[i]:len(seq) - 1 - keep[i]]  # the rows that chose each generated token
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


def run_child(files: dict[str, Path], prompts: list[list[int]], tmp: Path,
              lora: Path | None = None, evals: list[dict] | None = None, keep: list[int] | None = None,
              threads: int = 1) -> dict[str, dict]:
    """Run _child_main in a fresh interpreter; a crash names the file that was loading."""
    job = {"files": {t: str(p) for t, p in files.items()}, "texts": list(GATE_TEXTS), "prompts": prompts,
           "keep": keep or [0] * len(prompts), "threads": threads, "max_new": _GATE_NEW_TOKENS, "out": str(tmp),
           "lora": str(lora) if lora else None, "eval_texts": [e["prompt"] for e in evals or []],
           "eval_full": [e["full"] for e in evals or []], "eval_start": [e["start"] for e in evals or []]}
    code = "from edgeft.gguf.parity import child_main; child_main()"
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
                           f"({host.describe_exit(proc.returncode)}):\n{tail}")
    return results


def child_main() -> None:
    """Subprocess side of the gate: per file, tokenize the texts, generate greedily, save logits."""
    from edgeft.runtime.gguf import GGUFRuntime

    job = json.loads(sys.stdin.read())
    n_ctx = max([len(p) + job["max_new"] for p in job["prompts"]] + [len(f) for f in job["eval_full"]])
    for t, path in job["files"].items():
        print(json.dumps({"loading": t}), flush=True)
        with GGUFRuntime(path, n_threads=job["threads"], n_ctx=n_ctx, lora_path=job["lora"]) as rt:
            gens = [rt.generate(p, job["max_new"]) for p in job["prompts"]]
            greedy = [g.tokens for g in gens]
            out = Path(job["out"])
            savez_streaming(out / f"logits-{t}.npz", (rt.logits(p + g)[k:] for p, g, k in
                                                      zip(job["prompts"], greedy, job["keep"])))
            # teacher-forced: only the rows that predict the answer tokens
            savez_streaming(out / f"tf-{t}.npz", (rt.logits(f)[s - 1:len(f) - 1] for f, s in
                                                  zip(job["eval_full"], job["eval_start"])))
            print(json.dumps({"type": t, "greedy": greedy, "stopped": [g.stopped_at_eos for g in gens],
                              "tokens": [rt.tokenize(s, add_bos=False) for s in job["texts"]],
                              "tokens_special": [rt.tokenize(s, add_bos=True) for s in job["texts"]],
                              "eval_tokens": [rt.tokenize(s, add_bos=True) for s in job["eval_texts"]]}),
                  flush=True)


def savez_streaming(path: Path, arrays) -> int:
    """np.savez of an iterable, one array in memory at a time (np.load reads it as arr_0, arr_1, ...)."""
    n = 0
    with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
        for n, a in enumerate(arrays, 1):
            with zf.open(f"arr_{n - 1}.npy", "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.asarray(a), allow_pickle=False)
    return n
