"""Grounded answers through `edgeft ask`, and a revised manual without retraining. Measures, never asserts.

Part 1 asks a retrieval-tuned bundle the eval questions of its data artifact through the device code
path (edgeft.device.ask.Asker, grounded mode), per split: key-fact accuracy and rouge_l on trained and
on held-out facts, abstention on unanswerable questions (the runtime's pre-check and the model's own
abstentions counted apart, and the model's own abstention again with the pre-check off), false abstention on answerable ones, citation correctness (the cited
passage holds the key fact) and the share of answers the runtime could not verify.

Part 2 changes the value of --revise facts in the manual (a torque, an interval or a part number; values
only, same shape), replaces the manual in a copy of the bundle with `edgeft revise-manual`'s code
(edgeft.device.revise), and asks those facts' eval questions again: the share answering with the new
value (and the share still giving the old one), next to the same questions before the revision.

    python benchmarks/grounded_ask.py dist/x86-grounded runs/smollm2-grounded/data --n 40 --revise 20 \
        --out runs/benchmarks/grounded_ask.json

--smoke: a tiny random-weight grounded bundle (benchmarks.common.build_smoke_bundle(grounded=True)), 2
questions per split, 2 revised facts: every code path in seconds; its figures say nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeft import host
from edgeft.bench import metrics as M
from edgeft.device.ask import Asker
from edgeft.device.bundle import open_bundle
from edgeft.device.revise import revise
from edgeft.records import read_jsonl
from edgeft.runtime import grounding as G

SPLITS = ("trained", "heldout", "unanswerable")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="a retrieval-tuned bundle dir (not with --smoke)")
    ap.add_argument("data", type=Path, nargs="?", help="its data artifact dir (eval.jsonl; not with --smoke)")
    ap.add_argument("--n", type=int, default=None, help="questions per split (default 40, --smoke 2)")
    ap.add_argument("--revise", type=int, default=None, help="facts whose value is changed (default 20, --smoke 2)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/benchmarks/grounded_ask.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny random-weight bundle under --work: measures nothing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-grounded-ask"),
                    help="scratch dir: the revised bundle copy (and --smoke's run); removed afterwards")
    args = ap.parse_args()
    started = time.time()
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        if args.smoke:
            if args.bundle or args.data:
                ap.error("--smoke builds its own bundle: pass no BUNDLE or DATA")
            from benchmarks.common import build_smoke_bundle

            args.n, args.revise = args.n or 2, args.revise or 2
            args.bundle, args.data = build_smoke_bundle(args.work / "smoke", grounded=True)
        elif args.bundle is None or args.data is None:
            ap.error("BUNDLE and DATA are required (or --smoke)")
        args.n, args.revise = args.n or 40, args.revise if args.revise is not None else 20
        measure(args, started)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


def measure(args, started: float) -> None:
    """Part 1 and part 2; prints and writes JSON."""
    recs = [r for r in read_jsonl(args.data / "eval.jsonl") if r.get("grounding")]
    if not recs:
        sys.exit(f"{args.data}: no grounded eval records; the bundle's run was not tuned with data.retrieval_k")
    picked = []
    for split in SPLITS:  # args.n per split, spread evenly over it
        rs = [r for r in recs if r.get("split") == split]
        picked += [rs[int(j * len(rs) / args.n)] for j in range(min(args.n, len(rs)))]
    asker = Asker(open_bundle(args.bundle), threads=args.threads)
    if asker.retrieval != "grounded":
        sys.exit(f"{args.bundle}: not a retrieval-tuned bundle (ask mode {asker.retrieval})")
    rows = [_row(r, asker.ask(r["grounding"]["question"])) for r in picked]
    # the model's own abstention on unanswerable questions, the runtime's identifier pre-check turned off
    model_only = [_row(r, asker.ask(r["grounding"]["question"], precheck=False)) for r in picked
                  if r.get("split") == "unanswerable"]
    manual = asker.bundle.manual_text()
    variant = asker.bundle.spec["variant"]["name"]
    asker.close()
    out = {"bundle": str(args.bundle), "variant": variant, "cpu": host.cpu_model(),
           "splits": summarise(rows),
           "unanswerable_without_precheck": {"questions": len(model_only),
                                             "model_abstention": _mean([r["status"] == G.ABSTAINED
                                                                        for r in model_only])},
           "revision": revision(args, recs, manual)}
    if args.smoke:
        out.update(smoke=True, model="tiny random-weight Llama: figures are noise, the run exercises the code path")
    out["wall_s"] = round(time.time() - started, 1)
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


def _row(rec: dict, ans) -> dict:
    """One asked question: what was shown and how it counts."""
    key, ref = rec.get("key"), G.split_citation(rec["answer"])[0]
    shown = "" if ans.judgement.abstained else ans.text
    cited_ok = None
    if rec.get("split") != "unanswerable" and ans.status in (G.ANSWERED, G.UNVERIFIED) and ans.hit is not None:
        cited_ok = bool(key) and M.normalize(key) in M.normalize(f"{ans.hit.passage.heading} {ans.hit.passage.text}")
    return {"split": rec.get("split"), "status": ans.status, "key_fact": M.key_fact(shown, key) if key else None,
            "rouge_l": M.rouge_l(shown, ref), "cited_ok": cited_ok, "seconds": ans.seconds,
            "recall": rec["grounding"].get("oracle_retrieved")}


def summarise(rows: list[dict]) -> dict:
    """Per split: accuracy, abstention, citation and verification shares."""
    out = {}
    for split in SPLITS:
        rs = [r for r in rows if r["split"] == split]
        if not rs:
            continue
        s = {"questions": len(rs), "status": {st: sum(r["status"] == st for r in rs)
                                              for st in (G.ANSWERED, G.UNVERIFIED, G.ABSTAINED, G.NOT_IN_MANUAL)}}
        abst = [r["status"] in (G.ABSTAINED, G.NOT_IN_MANUAL) for r in rs]
        if split == "unanswerable":
            s["abstention"] = _mean(abst)
            s["runtime_abstention"] = _mean([r["status"] == G.NOT_IN_MANUAL for r in rs])
            s["model_abstention_when_asked"] = _mean([r["status"] == G.ABSTAINED for r in rs
                                                      if r["status"] != G.NOT_IN_MANUAL])
        else:
            s["key_fact"] = _mean([r["key_fact"] for r in rs if r["key_fact"] is not None])
            s["rouge_l"] = _mean([r["rouge_l"] for r in rs])
            s["false_abstention"] = _mean(abst)
            s["citation_correct"] = _mean([r["cited_ok"] for r in rs if r["cited_ok"] is not None])
            s["recall_at_k"] = _mean([r["recall"] for r in rs if r["recall"] is not None])
        s["unverified"] = _mean([r["status"] == G.UNVERIFIED for r in rs])
        s["median_answer_s"] = round(sorted(r["seconds"] for r in rs)[len(rs) // 2], 3)
        out[split] = s
    return out


_VALUE = re.compile(r"(?<![A-Za-z0-9])\d+")  # a number, not the digits of a model name (VX750-2786-97)


def changed_facts(recs: list[dict], manual: str, n: int, seed: int) -> list[tuple[dict, str, str, int]]:
    """Up to `n` answerable facts with a numeric key, each with its new key and the manual line (0-based)
    stating it: (record, old key, new key, line). One line and one key per fact; digits redrawn, same shape."""
    lines = manual.splitlines()
    rng = random.Random(seed)
    by_key: dict[str, dict] = {}
    for r in recs:
        if r.get("split") in ("trained", "heldout") and r.get("key") and _VALUE.search(r["key"]):
            by_key.setdefault(r["key"], r)
    keys = sorted(by_key)
    rng.shuffle(keys)
    out, used = [], set()
    g = G.Grounder(manual, "manual.txt", G.Spec())
    for key in keys:
        rec = by_key[key]
        o = G.oracle(g.index, rec["grounding"]["question"], rec["answer"], key)
        if o is None or g.index.passages[o].line - 1 in used or lines.count(lines[g.index.passages[o].line - 1]) > 1:
            continue
        line = g.index.passages[o].line - 1
        new = _VALUE.sub(lambda m: _redraw(m.group(), rng), key)
        if new == key or new in manual or lines[line].count(key) != 1:
            continue
        out.append((rec, key, new, line))
        used.add(line)
        if len(out) == n:
            break
    return out


def _redraw(digits: str, rng: random.Random) -> str:
    """Other digits of the same length, no leading zero unless the original had one."""
    while True:
        new = "".join(str(rng.randrange(10)) for _ in digits)
        if new != digits and (digits[0] == "0" or new[0] != "0"):
            return new


def revision(args, recs: list[dict], manual: str) -> dict:
    """Change facts' values in a copy of the bundle's manual, revise the copy, ask again."""
    facts = changed_facts(recs, manual, args.revise, args.seed)
    if not facts:
        return {"facts": 0, "note": "no fact with a numeric key value found in the eval split"}
    lines = manual.splitlines()
    for _, old, new, line in facts:
        lines[line] = lines[line].replace(old, new)
    copy = args.work / "bundle"
    shutil.copytree(args.bundle, copy)
    new_manual = args.work / "manual-revised.txt"
    new_manual.write_text("\n".join(lines) + "\n")
    before = _ask_all(copy, facts, args.threads)
    revise(copy, new_manual)
    after = _ask_all(copy, facts, args.threads)
    olds, news = [o for _, o, _, _ in facts], [w for _, _, w, _ in facts]
    return {"facts": len(facts), "before_old_value": _mean(map(M.key_fact, before, olds)),
            "after_new_value": _mean(map(M.key_fact, after, news)),
            "after_old_value": _mean(map(M.key_fact, after, olds)),
            "examples": [{"question": r["grounding"]["question"], "old": o, "new": w, "answer_after": a}
                         for (r, o, w, _), a in list(zip(facts, after))[:3]]}


def _ask_all(bundle: Path, facts: list, threads: int | None) -> list[str]:
    asker = Asker(open_bundle(bundle), threads=threads)
    try:
        return [("" if (a := asker.ask(r["grounding"]["question"])).judgement.abstained else a.text)
                for r, *_ in facts]
    finally:
        asker.close()


def _mean(xs) -> float | None:
    xs = [float(x) for x in xs]
    return round(sum(xs) / len(xs), 4) if xs else None


if __name__ == "__main__":
    main()
