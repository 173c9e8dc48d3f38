"""Write bench records as report.json, report.csv, report.md and the two Pareto plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from edgeft.bench import grounded
from edgeft.constants import REPORT_CSV, REPORT_FIELDS, REPORT_JSON, REPORT_MD

# Flat extras worth a column when present; nested ones (latency, spreads) stay in report.json.
EXTRA_FIELDS = ("key_fact", "greedy_match", "threads", "decode_tok_s_llama", "decode_vs_llama", "bytes_per_token",
                "predicted_footprint_mb")


def columns(records: list[dict], extra: tuple[str, ...] = EXTRA_FIELDS) -> list[str]:
    """Report fields first, then the flat extra ones present."""
    return list(REPORT_FIELDS) + [f for f in extra if any(f in r for r in records)]


def write(records: list[dict], out: Path, selection: str = "", notes: list[str] = ()) -> str:
    """Write the report files into `out`; returns the markdown table (what the CLI prints)."""
    cols = columns(records)
    (out / REPORT_JSON).write_text(json.dumps(records, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns(records, EXTRA_FIELDS + grounded.CSV_FIELDS), extrasaction="ignore",
                       lineterminator="\n")
    w.writeheader()
    w.writerows(records)
    (out / REPORT_CSV).write_text(buf.getvalue())
    md = markdown(records, cols)
    parts = [md]
    if selection:
        parts.append(f"\n{selection}\n")
    if any(f in r for r in records for f in grounded.FIELDS):
        parts.append("\n" + grounded_table(records))
    parts.append("\n" + spread_table(records))
    plots = _plots(records, out)
    if plots:
        parts.append("\n" + "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n")
    for n in list(notes) + reference_note(records) + threads_note(records) + llama_agreement(records) \
            + cut_note(records):
        parts.append(f"\n{n}\n")
    (out / REPORT_MD).write_text("".join(parts))
    return md + (f"\n{selection}\n" if selection else "")


def markdown(records: list[dict], cols: list[str] | None = None) -> str:
    """A GitHub markdown table of the records."""
    cols = cols or columns(records)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in records:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def grounded_table(records: list[dict]) -> str:
    """Grounded answers as `edgeft ask` shows them: accuracy per split, abstention, citations, recall, TTFT."""
    counts = next((r["eval_splits"] for r in records if r.get("eval_splits")), {})
    tokens = next((r["grounded_prompt_tokens"] for r in records if r.get("grounded_prompt_tokens")), None)
    lines = ["Grounded answers (" + ", ".join(f"{n} {s}" for s, n in counts.items()) + " eval questions; "
             "answers judged as `edgeft ask` shows them):", "",
             "| name | " + " | ".join(grounded.FIELDS) + " |", "|---|" + "---|" * len(grounded.FIELDS)]
    for r in records:
        lines.append(f"| {r['name']} | " + " | ".join(_cell(r.get(c)) for c in grounded.FIELDS) + " |")
    lines += ["", "key_fact/rouge_l: the shown answer (citation mark dropped; an abstention shows none) on trained "
              "and held-out facts. abstention: unanswerable questions refused, by the runtime's identifier "
              "pre-check or the model; model_abstention: by the model itself; false_abstention: answerable "
              "questions refused. citation_correct: answered answerable questions citing a passage that holds "
              "the key fact; unverified: answers shown without a supporting citation. recall_at_k: answerable "
              "questions whose passage was retrieved. grounded_ttft_ms: median first-token time over the "
              "measured grounded prompts" + (f" (median {tokens} tokens)." if tokens else ".")]
    return "\n".join(lines) + "\n"


def cut_note(records: list[dict]) -> list[str]:
    """Lines on eval prompts longer than the context leaves room for: passages dropped, or the end cut."""
    def most(key: str) -> int:
        return max((r.get(key) or 0 for r in records), default=0)

    out = []
    if most("prompts_fitted"):
        out.append(f"prompts: {most('prompts_fitted')} grounded eval prompts left no room for the answer in n_ctx; "
                   "their last passages were dropped, as `edgeft ask` does.")
    if most("prompts_cut"):
        out.append(f"prompts: {most('prompts_cut')} eval prompts were cut at the end to fit n_ctx - max_new_tokens "
                   "(a grounded prompt loses its question there); raise bench.n_ctx or lower data.retrieval_k / "
                   "retrieval_words.")
    return out


def spread_table(records: list[dict]) -> str:
    """Latency per prompt length: median [q1, q3] over the timed repeats."""
    lines = ["Latency, median [q1, q3] over repeats after warm-up:", "",
             "| name | prompt tokens | ttft_ms | prefill_tok_s | decode_tok_s (min-max) |", "|---|---|---|---|---|"]
    for r in records:
        lat = r.get("latency") or {}
        dec = lat.get("decode_tok_s")
        for i, (n, row) in enumerate((lat.get("lengths") or {}).items()):
            d = f"{_s(dec)} ({_cell(dec['min'])}-{_cell(dec['max'])})" if dec and i == 0 else ""
            lines.append(f"| {r['name']} | {n} | {_s(row['ttft_ms'])} | {_s(row['prefill_tok_s'])} | {d} |")
    return "\n".join(lines) + "\n"


def reference_note(records: list[dict]) -> list[str]:
    """Which row the agreement columns are measured against (its own cells are '-': not measured)."""
    ref = next((r["name"] for r in records if r.get("agreement_reference")), None)
    return [f"top1_agreement, kld and greedy_match are measured against **{ref}** (the reference row, '-')."] \
        if ref else []


def threads_note(records: list[dict]) -> list[str]:
    """One line when the profile asked for more threads than this machine has cores (a build-host bench)."""
    capped = {(r["threads_requested"], r["threads"]) for r in records
              if r.get("threads_requested") and r.get("threads") and r["threads"] < r["threads_requested"]}
    return [f"threads: the profile asks for {asked}, this machine has {used} usable cores, so every runtime ran "
            f"{used} threads; bench on the device itself for its latency figures." for asked, used in sorted(capped)]


def llama_agreement(records: list[dict], tolerance: float = 0.05) -> list[str]:
    """One line on how our GGUF decode figures compare with llama.cpp's own counters (llama_perf_context)."""
    pairs = [(r["name"], r["decode_vs_llama"]) for r in records if r.get("decode_vs_llama")]
    if not pairs:
        return []
    off = [f"{n} {v:.3f}" for n, v in pairs if abs(v - 1) > tolerance]
    head = ("GGUF decode tok/s vs llama.cpp's own timings (ours / llama_perf_context): "
            + ", ".join(f"{n} {v:.3f}" for n, v in pairs) + ".")
    if not off:
        return [head + f" All within {tolerance:.0%}."]
    return [head + f" Outside {tolerance:.0%}: {', '.join(off)} (ours is wall time per token including the "
            "Python loop and logits copy; llama.cpp counts only inside llama_decode, which dominates less on "
            "tiny models)."]


def _s(d: dict) -> str:
    return f"{_cell(d['median'])} [{_cell(d['q1'])}, {_cell(d['q3'])}]"


def _plots(records: list[dict], out: Path) -> list[Path]:
    try:
        from edgeft.bench import plots
    except ImportError:  # matplotlib is a host package; a device bench writes the tables alone
        return []
    return plots.write(records, out)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)
