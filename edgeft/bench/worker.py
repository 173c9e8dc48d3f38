"""Measure one variant in its own process, so peak RSS and load time are that variant's alone.

python -m edgeft.bench.worker VARIANT_JSON SAMPLES_JSON REF_NPZ OUT_JSON [--save-ref]
Imports numpy and the one runtime the variant needs (torch only for torch variants).
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgeft.bench import metrics as M


def open_runtime(variant: dict, threads: int, n_ctx: int):
    """The runtime for a variant's format."""
    fmt, path = variant["format"], variant["path"]
    if fmt == "torch":
        from edgeft.runtime.hf import HFRuntime
        return HFRuntime(path, n_threads=threads)
    if fmt == "gguf":
        from edgeft.runtime.gguf import GGUFRuntime
        return GGUFRuntime(path, n_threads=threads, n_ctx=n_ctx)
    if fmt == "onnx":
        from edgeft.runtime.onnx import OnnxRuntime
        return OnnxRuntime(path, n_threads=threads)
    raise ValueError(f"unknown variant format {fmt!r}")


def measure(variant: dict, samples: dict, ref_path: Path, save_ref: bool) -> dict:
    """Generate on every sample, score it, and compare teacher-forced logits with the reference."""
    cfg = samples["config"]
    t0 = time.perf_counter()
    rt = open_runtime(variant, cfg["threads"], cfg["n_ctx"])
    load_s = time.perf_counter() - t0
    items = samples["items"]
    for _ in range(cfg["warmup"]):
        rt.generate(items[0]["prompt_ids"], 4)
    ttft, dec_tok, dec_s, scores, gens = [], 0, 0.0, {k: [] for k in ("em", "f1", "rl", "kf")}, []
    for it in items:
        g = rt.generate(it["prompt_ids"], cfg["max_new_tokens"])
        text = samples_decode(samples, g.tokens)
        gens.append(g.tokens)
        ttft.append(g.ttft_s)
        dec_tok += max(len(g.tokens) - 1, 0)
        dec_s += g.decode_s
        scores["em"].append(M.exact_match(text, it["answer"]))
        scores["f1"].append(M.token_f1(text, it["answer"]))
        scores["rl"].append(M.rouge_l(text, it["answer"]))
        if it.get("key"):
            scores["kf"].append(M.key_fact(text, it["key"]))
    top1, logps = [], []
    for it in items:
        s, e = it["answer_span"]
        lg = rt.logits(it["full_ids"])[s - 1:e - 1]
        top1.append(lg.argmax(-1))
        logps.append(M.log_softmax(lg).astype(np.float32))
    rt.close()
    record = {
        "name": variant["name"], "format": variant["format"], "quant": variant["quant"],
        "size_bytes": int(getattr(rt, "size_bytes", 0)),
        "ttft_ms": round(1000 * statistics.median(ttft), 2),
        "decode_tok_s": round(dec_tok / dec_s, 1) if dec_s > 0 else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "load_s": round(load_s, 3),
        "exact_match": _mean(scores["em"]), "token_f1": _mean(scores["f1"]), "rouge_l": _mean(scores["rl"]),
        "key_fact": _mean(scores["kf"]) if scores["kf"] else None,
    }
    if save_ref:
        np.savez(ref_path, top1=np.concatenate(top1), logp=np.concatenate(logps),
                 gens=np.array(json.dumps(gens)))
        record.update(top1_agreement=1.0, kld=0.0, greedy_match=1.0)
    else:
        ref = np.load(ref_path)
        record["top1_agreement"] = round(float((np.concatenate(top1) == ref["top1"]).mean()), 4)
        record["kld"] = round(max(0.0, M.kl_divergence(ref["logp"].astype(np.float64),
                                              np.concatenate(logps))), 5)
        ref_gens = json.loads(str(ref["gens"]))
        record["greedy_match"] = round(sum(a == b for a, b in zip(gens, ref_gens)) / len(gens), 4)
    return record


def peak_rss_mb() -> float:
    """This process's peak RSS, MiB. VmHWM resets at exec; ru_maxrss would carry the parent's peak over."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def samples_decode(samples: dict, ids: list[int]) -> str:
    """Decode with the shared tokenizer (loaded once per process)."""
    global _FMT
    if _FMT is None:
        from edgeft.runtime.prompt import PromptFormatter
        _FMT = PromptFormatter(samples["tokenizer_dir"])
    return _FMT.decode(ids)


_FMT = None


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4) if xs else 0.0


def main(argv: list[str]) -> int:
    """Entry point of the worker process."""
    variant = json.loads(argv[0])
    samples = json.loads(Path(argv[1]).read_text())
    record = measure(variant, samples, Path(argv[2]), "--save-ref" in argv)
    Path(argv[3]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
