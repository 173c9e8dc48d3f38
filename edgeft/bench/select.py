"""Gate and ladder: pick the smallest deployable variant that keeps the accuracy and fits the memory.

The accuracy budget is a share of the reference (the tuned model's) rouge_l; the memory budget is the
profile's `memory_budget_gb`, checked against the variant's measured peak RSS or, where the record
has none (a variant not measured on this machine), its predicted footprint. Torch-free.
"""

from __future__ import annotations

from edgeft.errors import UserError

REFERENCE_NAME = "tuned"  # the record every other variant's accuracy is measured against
DEPLOYABLE = ("gguf", "onnx")  # formats that run on a device; torch variants stay on the host
METRIC = "rouge_l"  # the accuracy the budget is a share of


def select(records: list[dict], profile, *, reference: float | None = None,
           formats: tuple[str, ...] = DEPLOYABLE) -> dict:
    """The smallest variant within `profile`'s accuracy and memory budgets (a copy of its record).

    `reference` overrides the tuned model's rouge_l (a bundle on a device has no torch record).
    Raises UserError naming the closest miss and by how much when no variant qualifies.
    """
    acc_budget = float(_get(profile, "accuracy_budget"))
    mem_budget_mb = float(_get(profile, "memory_budget_gb")) * 1024
    ref = reference_score(records) if reference is None else float(reference)
    need = acc_budget * ref
    cands = [r for r in records if r.get("format") in formats]
    if not cands:
        raise UserError(f"select: no {'/'.join(formats)} variant among {len(records)} records; "
                        "export GGUF or ONNX variants and bench them first")
    scored = []
    for r in cands:
        acc = r.get(METRIC)
        mem = memory_mb(r)
        acc_short = max(0.0, (need - acc) / need) if acc is not None and need > 0 else (
            1.0 if acc is None else 0.0)
        mem_over = max(0.0, (mem - mem_budget_mb) / mem_budget_mb) if mem is not None else 0.0
        scored.append((r, acc, mem, acc_short, mem_over))
    ok = [s for s in scored if s[3] == 0.0 and s[4] == 0.0]
    if ok:
        r, acc, mem, _, _ = min(ok, key=lambda s: (s[0].get("size_bytes") or 0,
                                                 -(s[0].get("decode_tok_s") or 0.0), s[0]["name"]))
        out = dict(r)
        out.update(accuracy_kept=round(acc / ref, 4) if ref > 0 else 1.0, memory_mb=mem,
                   memory_budget_mb=round(mem_budget_mb, 1), accuracy_needed=round(need, 4))
        return out
    r, acc, mem, acc_short, mem_over = min(scored, key=lambda s: (s[3] + s[4], s[0].get("size_bytes") or 0))
    misses = []
    if acc_short > 0:
        got = "none" if acc is None else f"{acc:.4f}"
        misses.append(f"{METRIC} {got} < {need:.4f} needed ({acc_budget:.0%} of tuned {ref:.4f}; "
                      f"short by {need - (acc or 0.0):.4f}, {acc_short:.1%})")
    if mem_over > 0:
        misses.append(f"memory {mem:.1f} MiB > budget {mem_budget_mb:.1f} MiB "
                      f"(over by {mem - mem_budget_mb:.1f} MiB, {mem_over:.1%})")
    name = _get(profile, "name")  # a device profile has one; the bench stage's config carries only the budgets
    within = f"profile '{name}' budgets" if name else "the profile's budgets"
    raise UserError(f"select: no variant within {within}; closest miss {r['name']}: {' and '.join(misses)}; relax "
                    "profile.accuracy_budget / profile.memory_budget_gb or retrain")


def reference_score(records: list[dict]) -> float:
    """The tuned model's rouge_l from the records (the record named 'tuned', or one marked reference)."""
    for r in records:
        if r.get("name") == REFERENCE_NAME or r.get("reference"):
            if r.get(METRIC) is None:
                break
            return float(r[METRIC])
    raise UserError(f"select: no '{REFERENCE_NAME}' record with {METRIC} among the bench records; "
                    "bench with the tuned model or pass its score as the reference")


def memory_mb(record: dict) -> float | None:
    """What a variant needs in memory, MiB: measured peak RSS, else the predicted footprint, else its size."""
    for key in ("peak_rss_mb", "predicted_footprint_mb"):
        v = record.get(key)
        if v is not None and v > 0:
            return float(v)
    size = record.get("size_bytes")
    return size / 2**20 if size else None


def _get(profile, key: str, default=None):
    if isinstance(profile, dict):
        return profile.get(key, default)
    return getattr(profile, key, default)
