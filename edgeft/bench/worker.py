"""Measure one variant in its own process, so peak RSS and load time are that variant's alone.

python -m edgeft.bench.worker VARIANT_JSON SAMPLES_JSON REF_NPZ OUT_JSON [--save-ref]
Imports numpy and the one runtime the variant needs (torch only for torch variants).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from edgeft import rss
from edgeft.bench import footprint, grounded
from edgeft.bench import latency as L
from edgeft.bench import metrics as M


def usable_threads(requested: int) -> int:
    """The profile's thread count, capped at the cores this process may run on.

    A profile describes its device (a Jetson's 6 cores); benched on a smaller build host, more threads
    than cores only time the oversubscription. The record keeps both counts and the report says so.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested, cores))


def open_runtime(variant: dict, cfg: dict):
    """The runtime for a variant's format."""
    fmt, path, threads = variant["format"], variant["path"], cfg["threads"]
    if fmt == "torch":
        from edgeft.runtime.hf import HFRuntime
        return HFRuntime(path, n_threads=threads)
    if fmt == "gguf":
        from edgeft.runtime.gguf import GGUFRuntime
        return GGUFRuntime(path, n_threads=threads, n_ctx=cfg["n_ctx"], n_gpu_layers=cfg.get("n_gpu_layers", 0),
                           kv_type=cfg.get("kv_cache_type", "f16"), lora_path=variant.get("lora") or None)
    if fmt == "onnx":
        from edgeft.runtime.onnx import OnnxRuntime
        return OnnxRuntime(path, n_threads=threads, provider=cfg.get("onnx_provider", "CPUExecutionProvider"))
    raise ValueError(f"unknown variant format {fmt!r}")


def measure(variant: dict, samples: dict, ref_path: Path, save_ref: bool) -> dict:
    """Latency, then generation on every sample, perplexity, and teacher-forced agreement with the reference."""
    requested = samples["config"]["threads"]
    cfg = {**samples["config"], "threads": usable_threads(requested)}
    t0 = time.perf_counter()
    rt = open_runtime(variant, cfg)
    load_s = time.perf_counter() - t0
    items = samples["items"]
    lat = L.measure(rt, [it["prompt_ids"] for it in items], samples["prompt_lengths"], cfg["decode_tokens"],
                    cfg["warmup"], cfg["repeats"], samples.get("bos_id"))
    scores, gens, texts, ttft = {k: [] for k in ("em", "f1", "rl", "kf")}, [], [], []
    prompts = [it["prompt_ids"] for it in items]
    if hasattr(rt, "generate_batch"):  # torch: batched greedy (memory-bound decode), first tokens timed alone
        results = rt.generate_batch(prompts, cfg["max_new_tokens"])
    else:
        results = (rt.generate(p, cfg["max_new_tokens"]) for p in prompts)
    for it, g in zip(items, results):
        text = samples_decode(samples, g.tokens)
        gens.append(g.tokens)
        texts.append(text)
        ttft.append(g.ttft_s)  # the prompt's own first forward (the KV cache starts empty every generate)
        scores["em"].append(M.exact_match(text, it["answer"]))
        scores["f1"].append(M.token_f1(text, it["answer"]))
        scores["rl"].append(M.rouge_l(text, it["answer"]))
        if it.get("key"):
            scores["kf"].append(M.key_fact(text, it["key"]))
    rss_mb = rss.peak_mb()  # load + latency + generation: what serving needs (the logit checks below hold more)
    top1, logps = [], []
    for it in items:
        s, e = it["answer_span"]
        lg = rt.logits(it["full_ids"])[s - 1:e - 1]
        top1.append(lg.argmax(-1))
        logps.append(M.log_softmax(lg).astype(np.float32))
    nll = [M.token_nll(rt.logits(ids), ids) for ids in samples.get("ppl_items", [])]
    kv_bytes = {"gguf": 4 if cfg.get("kv_cache_type") == "f32" else 2, "torch": 4}.get(variant["format"]) \
        or np.dtype(getattr(rt, "past_dtype", np.float32)).itemsize
    size_bytes = int(getattr(rt, "size_bytes", 0))
    rt.close()
    fp = footprint.of_variant(variant["format"], variant["path"], kv_bytes)
    first, last = (lat["lengths"][str(n)] for n in (min(samples["prompt_lengths"]), max(samples["prompt_lengths"])))
    dec = lat["decode_tok_s"]
    record = {
        "name": variant["name"], "format": variant["format"], "quant": variant["quant"],
        "size_bytes": size_bytes, "params": fp.params,
        "ttft_ms": round(first["ttft_ms"]["median"], 3),
        "prefill_tok_s": round(last["prefill_tok_s"]["median"], 1),
        "decode_tok_s": round(dec["median"], 1),
        "peak_rss_mb": rss_mb,
        "load_s": round(load_s, 3),
        "exact_match": _mean(scores["em"]), "token_f1": _mean(scores["f1"]), "rouge_l": _mean(scores["rl"]),
        "perplexity": round(float(np.exp(np.concatenate(nll).mean())), 4) if nll else None,
        "predicted_decode_tok_s": round(fp.predicted_tok_s(cfg["bandwidth_gbs"], lat["decode_context"]), 1),
        "key_fact": _mean(scores["kf"]) if scores["kf"] else None,
        "ttft_ms_iqr": [round(first["ttft_ms"]["q1"], 3), round(first["ttft_ms"]["q3"], 3)],
        "prefill_tok_s_iqr": [round(last["prefill_tok_s"]["q1"], 1), round(last["prefill_tok_s"]["q3"], 1)],
        "decode_tok_s_iqr": [round(dec["q1"], 1), round(dec["q3"], 1)],
        "decode_tok_s_minmax": [round(dec["min"], 1), round(dec["max"], 1)],
        "bytes_per_token": int(fp.bytes_per_token(lat["decode_context"])),
        "predicted_footprint_mb": round(fp.memory_mb(cfg["n_ctx"]), 1),
        "threads": cfg["threads"], "threads_requested": requested,
        "latency": lat,
    }
    retrieval = grounded.Retrieval.from_json(samples["retrieval"]) if samples.get("retrieval") else None
    record.update(grounded.score(items, texts, ttft, retrieval))  # nothing when the eval has no splits
    for key in ("prompts_cut", "prompts_fitted"):  # over-long prompts: cut at the end / passages dropped
        if samples.get(key):
            record[key] = samples[key]
    if "decode_tok_s_llama" in lat:
        llama = lat["decode_tok_s_llama"]["median"]
        record["decode_tok_s_llama"] = round(llama, 1)
        record["decode_vs_llama"] = round(dec["median"] / llama, 4)
    if save_ref:
        np.savez(ref_path, top1=np.concatenate(top1), logp=np.concatenate(logps),
                 gens=np.array(json.dumps(gens)))
        # the reference is what the others are measured against: nothing measured, so nothing claimed
        record.update(agreement_reference=True, top1_agreement=None, kld=None, greedy_match=None)
    else:
        ref = np.load(ref_path)
        record["top1_agreement"] = round(float((np.concatenate(top1) == ref["top1"]).mean()), 4)
        record["kld"] = round(max(0.0, M.kl_divergence(ref["logp"].astype(np.float64),
                                              np.concatenate(logps))), 5)
        ref_gens = json.loads(str(ref["gens"]))
        record["greedy_match"] = round(sum(a == b for a, b in zip(gens, ref_gens)) / len(gens), 4)
    return record


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
