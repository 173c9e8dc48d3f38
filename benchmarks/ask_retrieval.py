"""Does putting the retrieved manual passage into the prompt help `edgeft ask`? Measures, never asserts.

Runs a bundle's model over the eval questions of a data artifact three ways through the same device
code path (edgeft.device.ask.Asker): retrieval off (the baseline), `cite` (the closed-book answer with
the top passage cited beside it) and `prompt` (the passage in a system turn). `cite` does not change the
answer, so its accuracy is not a result: it is measured only to check that (`same_answer_as_off`), and
what it is judged by is citation correctness, the share of questions whose cited passage holds the
answer's key fact. Prints key-fact accuracy, exact match and rouge_l of `off` and `prompt`, the ratio
of `prompt` to `off`, and the citation correctness of both retrieval modes; writes JSON.

    python benchmarks/ask_retrieval.py dist/jetson runs/demo/data --n 120 --out runs/benchmarks/ask_retrieval.json

--smoke (no BUNDLE, DATA): builds a tiny bundle itself under --work (the benchmarks' tiny RANDOM-WEIGHT Llama,
GGUF q8_0, profile tiny, answers capped at 16 tokens; benchmarks.common.build_smoke_bundle) with the embedded
demo data, and asks 4 questions: every code path in seconds; its accuracies say nothing.

    python benchmarks/ask_retrieval.py --smoke [--work DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeft.bench import metrics as M
from edgeft.device.ask import Asker
from edgeft.device.bundle import open_bundle
from edgeft.records import read_jsonl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="?", help="bundle dir (not with --smoke)")
    ap.add_argument("data", type=Path, nargs="?", help="data artifact dir (eval.jsonl; not with --smoke)")
    ap.add_argument("--n", type=int, default=None, help="eval questions (spread over the split; default 120, "
                                                        "--smoke 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/benchmarks/ask_retrieval.json"))
    ap.add_argument("--smoke", action="store_true",
                    help="build a tiny random-weight bundle under --work and ask 4 questions: measures nothing")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgeft-bench-ask-retrieval"),
                    help="--smoke: scratch dir for the tiny run and bundle (removed afterwards)")
    args = ap.parse_args()
    started = time.time()
    if args.smoke:
        if args.bundle or args.data:
            ap.error("--smoke builds its own bundle: pass no BUNDLE or DATA")
        from benchmarks.common import build_smoke_bundle

        args.n = args.n or 4
        work = args.work / "smoke"
        shutil.rmtree(work, ignore_errors=True)
        try:
            args.bundle, args.data = build_smoke_bundle(work)
            measure(args, started)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    if args.bundle is None or args.data is None:
        ap.error("BUNDLE and DATA are required (or --smoke)")
    args.n = args.n or 120
    measure(args, started)


def measure(args, started: float) -> None:
    """Ask args.n eval questions of args.data in each retrieval mode through args.bundle; print and write JSON."""
    recs = [r for r in read_jsonl(args.data / "eval.jsonl") if r.get("key")]
    step = max(1, len(recs) // args.n)
    recs = recs[::step][: args.n]
    bundle = open_bundle(args.bundle)
    results, answers = {}, {}
    for mode in ("off", "cite", "prompt"):
        asker = Asker(bundle, retrieval=mode, threads=args.threads)
        scores = {"key_fact": [], "exact_match": [], "rouge_l": [], "passage_has_key": []}
        t0 = time.perf_counter()
        for r in recs:
            q = next(m["content"] for m in r["messages"] if m["role"] == "user")
            ans = asker.ask(q)
            answers.setdefault(mode, []).append(ans.text)
            scores["key_fact"].append(M.key_fact(ans.text, r["key"]))
            scores["exact_match"].append(M.exact_match(ans.text, r["answer"]))
            scores["rouge_l"].append(M.rouge_l(ans.text, r["answer"]))
            if mode != "off":
                scores["passage_has_key"].append(float(ans.hit is not None and r["key"] in ans.hit.passage.text))
        asker.close()
        results[mode] = {k: round(sum(v) / len(v), 4) for k, v in scores.items() if v}
        results[mode]["seconds"] = round(time.perf_counter() - t0, 2)
    base = results["off"]
    for k in ("key_fact", "exact_match", "rouge_l"):
        results["prompt"][f"{k}_vs_off"] = round(results["prompt"][k] / base[k], 3) if base[k] else None
    cite = results["cite"]
    cite["same_answer_as_off"] = round(sum(a == b for a, b in zip(answers["cite"], answers["off"])) / len(recs), 4)
    for k in ("key_fact", "exact_match", "rouge_l"):  # the closed-book answers again: not a retrieval result
        cite.pop(k)
    out = {"bundle": str(args.bundle), "variant": bundle.spec["variant"]["name"], "questions": len(recs),
           "results": results}
    if args.smoke:
        out.update(smoke=True, model="tiny random-weight Llama (benchmarks.common.SMOKE_MODEL), GGUF q8_0: "
                                     "accuracies are noise, the run exercises the code path only",
                   wall_s=round(time.time() - started, 1))
    print(json.dumps(out, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
