"""Latency protocol: warm-up, then repeated timed runs at fixed prompt lengths; medians with spread.

- TTFT and prefill: `generate(prompt, 1)` on a prompt of exactly L tokens (real eval text, repeated
  to length), so prefill tok/s = L / TTFT is measured apart from decoding, at each length.
- Decode: `generate(prompt, n, ignore_eos=True)` after the shortest prompt: exactly n tokens, so
  every repeat times the same work; tok/s = (n - 1) / decode seconds (the first token is TTFT's).
- GGUF: llama.cpp's own counters (llama_perf_context) are read around the same runs and recorded
  beside ours; their ratio shows how much the Python loop adds on top of llama_decode.
Torch-free: the runtime object is passed in.
"""

from __future__ import annotations

import numpy as np


def fill_prompt(source: list[list[int]], n: int, bos_id: int | None) -> list[int]:
    """Exactly `n` ids: BOS (when the model has one) then real prompt ids repeated to length."""
    flat = [t for ids in source for t in ids if t != bos_id]
    if not flat:
        raise ValueError("no prompt ids to build a timing prompt from")
    head = [bos_id] if bos_id is not None else []
    body = (flat * (n // len(flat) + 1))[: n - len(head)]
    return head + body


def spread(xs: list[float]) -> dict:
    """Median, quartiles, min and max of repeated measurements."""
    a = np.asarray(xs, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "min": float(a.min()),
            "max": float(a.max()), "n": int(a.size)}


def measure(rt, source: list[list[int]], lengths: list[int], decode_tokens: int, warmup: int,
            repeats: int, bos_id: int | None) -> dict:
    """Time prefill at every length and fixed-length decode after the shortest; per-run lists and spreads."""
    has_perf = hasattr(rt, "perf")
    prompts = {n: fill_prompt(source, n, bos_id) for n in lengths}
    short = prompts[min(lengths)]
    for _ in range(warmup):
        rt.generate(short, min(decode_tokens, 8), ignore_eos=True)
    out = {"lengths": {}}
    for n, ids in prompts.items():
        ttft, llama_prefill = [], []
        for _ in range(repeats):
            if has_perf:
                rt.perf(reset=True)
            ttft.append(rt.generate(ids, 1, ignore_eos=True).ttft_s)
            if has_perf:
                p = rt.perf()
                if p["n_p_eval"] and p["t_p_eval_ms"] > 0:
                    llama_prefill.append(p["n_p_eval"] / (p["t_p_eval_ms"] / 1000))
        row = {"ttft_ms": spread([1000 * t for t in ttft]), "prefill_tok_s": spread([n / t for t in ttft])}
        if llama_prefill:
            row["prefill_tok_s_llama"] = spread(llama_prefill)
        out["lengths"][str(n)] = row
    dec, llama_dec = [], []
    for _ in range(repeats):
        if has_perf:
            rt.perf(reset=True)
        g = rt.generate(short, decode_tokens, ignore_eos=True)
        dec.append(g.decode_tok_s)
        if has_perf:
            p = rt.perf()
            if p["n_eval"] and p["t_eval_ms"] > 0:
                llama_dec.append(p["n_eval"] / (p["t_eval_ms"] / 1000))
    out["decode_tok_s"] = spread(dec)
    out["decode_context"] = len(short) + decode_tokens / 2  # mean cached positions while decoding
    if llama_dec:
        out["decode_tok_s_llama"] = spread(llama_dec)
    return out


def prompt_lengths(requested: tuple[int, ...], n_ctx: int, decode_tokens: int) -> list[int]:
    """Prefill lengths to time: the requested ones (or n_ctx/8 and n_ctx/2), each fitting the context."""
    lengths = list(requested) or [max(8, n_ctx // 8), max(16, n_ctx // 2)]
    cap = n_ctx - decode_tokens
    if cap < 2:
        raise ValueError(f"context {n_ctx} leaves no room for {decode_tokens} decode tokens")
    return sorted({min(max(2, n), cap) for n in lengths})
