"""Retrieval-augmented fine-tuning data (RAFT-style), held-out facts and unanswerable questions. Torch-free.

Every question gets the top-k passages of the retriever the bundle ships (edgeft.runtime.grounding).
In training, every answerable question sees the passage that answers it (put in place of the last hit
when retrieval missed it) and learns to answer from it and cite it. A share `negatives` of them is
also asked a second time with only distractors (that passage removed from the ranking) and learns to
say the manual does not cover it, as do the generated unanswerable questions. The pairs are
contrastive on purpose: the same question, answered with its passage and refused without it, is only
learnable by reading the passages. (Showing a share of questions *only* without their passage, as
RAFT's recipe does, taught SmolLM2 to refuse those questions themselves: with one phrasing per fact,
20% distractor-only gave 15% false abstention on trained facts with the passage retrieved.) Eval questions get the plain top-k, as on the
device, and record whether the answering passage was retrieved (recall@k).

A fact is a distinct answer: holding a fact out removes every phrasing of it from tuning, while its
passage stays in the manual. An unanswerable question is an answerable one with an identifier (a code,
a model or part number) changed to one the manual does not contain, same shape ('E964' -> 'E318').
"""

from __future__ import annotations

import random
import re

from edgeft.runtime import grounding as G
from edgeft.runtime.retrieval import tokenize

SPLIT_TRAINED, SPLIT_HELDOUT, SPLIT_UNANSWERABLE = "trained", "heldout", "unanswerable"
_WORD = re.compile(r"[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*")


def question_of(rec: dict) -> str | None:
    """The last user turn of a chat record (None for raw text)."""
    users = [m["content"] for m in rec.get("messages", ()) if m["role"] == "user"]
    return users[-1] if users else None


def hold_out_facts(train: list[dict], evals: list[dict], share: float, seed: int
                   ) -> tuple[list[dict], list[dict]]:
    """Drop a share of the facts (distinct answers) from train; tag eval records trained (their answer is
    tuned on) or heldout (it is not: held out here, or never in train, as after data.eval_fraction's split)."""
    answers = sorted({r["answer"] for r in train + evals if "answer" in r})
    held = set(random.Random(seed).sample(answers, round(share * len(answers)))) if share > 0 else set()
    kept = [r for r in train if r.get("answer") not in held]
    tuned = {r.get("answer") for r in kept}  # an eval answer never tuned on (split by answer) is held out too
    tagged = [{**r, "split": SPLIT_TRAINED if r.get("answer") in tuned else SPLIT_HELDOUT} for r in evals]
    return kept, tagged


def limit_phrasings(records: list[dict], n: int) -> list[dict]:
    """At most `n` records per fact (distinct answer), first ones kept; n = 0 keeps all."""
    if n <= 0:
        return records
    seen: dict[str, int] = {}
    out = []
    for r in records:
        a = r.get("answer")
        seen[a] = seen.get(a, 0) + 1
        if a is None or seen[a] <= n:
            out.append(r)
    return out


def unanswerable(records: list[dict], manual_text: str, share: float, seed: int) -> list[dict]:
    """About `share` x len(records) questions the manual cannot answer: an identifier of an answerable
    question changed to one of the same shape found nowhere in the manual. Questions without an
    identifier are skipped, so fewer may come back."""
    rng = random.Random(seed)
    manual_tokens = set(tokenize(manual_text))
    pool = [r for r in records if question_of(r) and G.identifiers(question_of(r))]
    rng.shuffle(pool)
    out: list[dict] = []
    want = round(share * len(records))
    for rec in pool:
        if len(out) >= want:
            break
        q = question_of(rec)
        words = [w for w in dict.fromkeys(_WORD.findall(q)) if G.identifiers(w)]
        word = rng.choice(words)
        fake = _fabricate(word, manual_tokens, rng)
        if fake is None:
            continue
        question = re.sub(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", fake, q)
        out.append({"messages": [{"role": "user", "content": question},
                                 {"role": "assistant", "content": G.ABSTAIN}],
                    "answer": G.ABSTAIN, "split": SPLIT_UNANSWERABLE, "source_question": q})
    return out


def _fabricate(word: str, manual_tokens: set[str], rng: random.Random) -> str | None:
    """`word` with its digits redrawn until none of its digit-bearing tokens is in the manual."""
    for _ in range(50):
        fake = "".join(str(rng.randrange(10)) if c.isdigit() else c for c in word)
        toks = [t for t in tokenize(fake) if any(c.isdigit() for c in t)]
        if fake != word and toks and not any(t in manual_tokens for t in toks):
            return fake
    return None


def ground(records: list[dict], grounder: G.Grounder, negatives: float, seed: int, train: bool) -> list[dict]:
    """Each question record as its grounded chat: top-k passages in the prompt, citing target or ABSTAIN.

    Train records get their answering passage and, for a share `negatives`, a second distractor-only copy
    that abstains (an answerable one no passage holds is left out: there is nothing to ground it in); eval
    records keep the retriever's own top-k. Records without a question (raw text) pass through unchanged."""
    rng = random.Random(seed)
    k = grounder.spec.k
    passages = grounder.index.passages
    out = []

    def chat(rec: dict, q: str, hits: list, reply: str, **meta) -> dict:
        msgs = grounder.messages(q, hits) + [{"role": "assistant", "content": reply}]
        meta = {"question": q, "passages": [[h.passage.line, h.passage.part] for h in hits], **meta}
        return {**{k2: v for k2, v in rec.items() if k2 != "messages"}, "messages": msgs, "grounding": meta}

    for rec in records:
        q = question_of(rec)
        if q is None:
            out.append(rec)
            continue
        answerable = rec.get("split") != SPLIT_UNANSWERABLE
        ranking = grounder.index.search(q, k=len(passages))
        o = G.oracle(grounder.index, q, rec["answer"], rec.get("key")) if answerable else None
        if not answerable:
            out.append(chat(rec, q, ranking[:k], G.ABSTAIN, oracle_retrieved=None))
        elif not train:
            cite = next((i for i, h in enumerate(ranking[:k], 1) if o is not None and h.passage == passages[o]), None)
            # an answer whose passage was not retrieved keeps the reference answer (scored by its key)
            reply = G.target(rec["answer"], cite) if cite else rec["answer"].strip()
            out.append(chat(rec, q, ranking[:k], reply, oracle_retrieved=cite is not None if o is not None else None))
        elif o is not None:
            hits = ranking[:k]
            if all(h.passage != passages[o] for h in hits):
                hit = next((h for h in ranking if h.passage == passages[o]), G.Hit(passages[o], 0.0))
                hits = hits[: k - 1] + [hit]
            cite = next(i for i, h in enumerate(hits, 1) if h.passage == passages[o])
            out.append(chat(rec, q, hits, G.target(rec["answer"], cite), oracle_retrieved=True))
            if rng.random() < negatives:
                hits = [h for h in ranking if h.passage != passages[o]][:k]
                out.append(chat(rec, q, hits, G.ABSTAIN, oracle_retrieved=False, negative=True))
    return out
