"""Retrieval-augmented fine-tuning data (RAFT-style), held-out facts and unanswerable questions. Torch-free.

Every question gets the top-k passages of the retriever the bundle ships (edgeft.runtime.grounding).
In training, a share `oracle` of the answerable questions is sure to see the passage that answers it
(put in place of the last hit when retrieval missed it) and learns to answer from it and cite it; the
rest see only distractors (that passage removed from the ranking) and learn to say the manual does not
cover it, as do the generated unanswerable questions. Eval questions get the plain top-k, as on the
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


def ground(records: list[dict], grounder: G.Grounder, oracle_share: float, seed: int, train: bool) -> list[dict]:
    """Each question record as its grounded chat: top-k passages in the prompt, citing target or ABSTAIN.

    Train records follow the oracle/distractor mix (an answerable one no passage holds is left out: there
    is nothing to ground it in); eval records keep the retriever's own top-k. Records without a question
    (raw text) pass through unchanged."""
    rng = random.Random(seed)
    out = []
    for rec in records:
        q = question_of(rec)
        if q is None:
            out.append(rec)
            continue
        answerable = rec.get("split") != SPLIT_UNANSWERABLE
        ranking = grounder.index.search(q, k=len(grounder.index.passages))
        o = G.oracle(grounder.index, q, rec["answer"], rec.get("key")) if answerable else None
        if train and answerable and o is None:  # no passage holds the answer: nothing to ground it in
            continue
        positions = [h.passage for h in ranking]
        want_oracle = answerable and o is not None and (not train or rng.random() < oracle_share)
        k = grounder.spec.k
        if train and want_oracle:
            hits = ranking[:k]
            if grounder.index.passages[o] not in positions[:k]:
                hit = next(h for h in ranking if h.passage == grounder.index.passages[o]) \
                    if grounder.index.passages[o] in positions else G.Hit(grounder.index.passages[o], 0.0)
                hits = hits[: k - 1] + [hit]
        elif train:
            hits = [h for h in ranking if o is None or h.passage != grounder.index.passages[o]][:k]
        else:
            hits = ranking[:k]
        cite = next((i for i, h in enumerate(hits, 1) if o is not None and h.passage == grounder.index.passages[o]),
                    None)
        if not answerable or (not want_oracle and train):
            cite = None
        # an eval answer whose passage was not retrieved keeps the reference answer (scored by its key)
        reply = rec["answer"].strip() if not train and answerable and cite is None else G.target(rec["answer"], cite)
        msgs = grounder.messages(q, hits) + [{"role": "assistant", "content": reply}]
        meta = {"question": q, "passages": [[h.passage.line, h.passage.part] for h in hits],
                "oracle_retrieved": cite is not None if answerable and o is not None else None}
        out.append({**{k2: v for k2, v in rec.items() if k2 != "messages"}, "messages": msgs, "grounding": meta})
    return out
