"""Grounded answers in the bench: each eval question scored as `edgeft ask` would show it. Torch-free.

The data stage tags every eval record with its split (a trained fact, a held-out fact, a question the
manual cannot answer) and, with retrieval, stores the passages its retriever put in the prompt. The
bench rebuilds that retriever from the manual and the recorded settings (`Retrieval`), refuses to go on
when it no longer retrieves the stored passages, and judges every greedy answer with the runtime's own
`Grounder.judge`, as `edgeft ask` does (edgeft.device.ask): the identifier pre-check (and a question that
retrieves nothing) abstains without looking at the model's text, an over-long prompt drops its last
passages, an answer is shown without its citation mark, an abstention shows ABSTAIN. The figures
(`score`) per variant:

  key_fact_/rouge_l_/token_f1_{trained,heldout}  accuracy of the shown answer on each split
  abstention          unanswerable questions the user sees refused (pre-check or the model)
  model_abstention    unanswerable questions the model itself refused (before the pre-check)
  false_abstention    answerable questions refused
  citation_correct    answered answerable questions whose cited passage holds the key fact (without a
                      key: the reference answer's key tokens)
  unverified          answers shown (all splits) the runtime could not tie to their cited passage
  recall_at_k         answerable questions whose answering passage was retrieved
  grounded_ttft_ms    median time to first token over the measured grounded prompts
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

from edgeft.bench import latency as L
from edgeft.bench import metrics as M
from edgeft.constants import MANUAL_FILE, RETRIEVAL_FILE
from edgeft.errors import StageFailure, UserError
from edgeft.runtime import grounding as G
from edgeft.runtime.retrieval import Hit, Passage

# The data stage's split names (edgeft.training.raft; the bench imports no training code).
TRAINED, HELDOUT, UNANSWERABLE = "trained", "heldout", "unanswerable"
# Flat record keys, in the column order of the report's "Grounded answers" table.
FIELDS = ("key_fact_trained", "key_fact_heldout", "rouge_l_trained", "rouge_l_heldout", "abstention",
          "model_abstention", "false_abstention", "citation_correct", "unverified", "recall_at_k", "grounded_ttft_ms")
CSV_FIELDS = FIELDS + ("token_f1_trained", "token_f1_heldout", "grounded_prompt_tokens")


@dataclass(frozen=True)
class Retrieval:
    """The manual and retriever settings a model was tuned with: what rebuilds its `Grounder`."""

    manual: str  # the manual text retrieved from
    source: str  # its file name, for citations
    spec: G.Spec

    @cached_property
    def grounder(self) -> G.Grounder:
        """The manual indexed with the recorded settings (built once)."""
        return G.Grounder(self.manual, self.source, self.spec)

    def to_json(self) -> dict:
        return {"manual": self.manual, "source": self.source, "spec": self.spec.to_dict()}

    @classmethod
    def from_json(cls, d: dict) -> Retrieval:
        return cls(d["manual"], d["source"], G.Spec.from_dict(d["spec"], "bench samples"))


def from_data_dir(path: Path) -> Retrieval | None:
    """The retrieval a data artifact was grounded with (its retrieval.json and manual.txt); None without one."""
    path = Path(path)
    spec_path = path / RETRIEVAL_FILE
    if not spec_path.is_file():
        return None
    try:
        raw = json.loads(spec_path.read_text())
    except ValueError as e:
        raise UserError(f"{spec_path}: not JSON ({e}); rerun the data stage") from None
    spec = G.Spec.from_dict(raw, str(spec_path))
    manual = path / MANUAL_FILE
    if not manual.is_file():
        raise UserError(f"{path}: has {RETRIEVAL_FILE} but no {MANUAL_FILE} to retrieve from; rerun the data stage")
    return Retrieval(manual.read_text(encoding="utf-8", errors="replace"), MANUAL_FILE, spec)


def from_bundle(bundle) -> Retrieval | None:
    """The retrieval a (verified) bundle ships: bundle.json "retrieval" and its manual; None when it has none."""
    raw = bundle.spec.get("retrieval")
    if raw is None:
        return None
    where = f"{bundle.path}/bundle.json"
    manual = bundle.manual_text()
    if manual is None:
        raise UserError(f"{where}: has retrieval settings but no manual to retrieve from; rebuild the bundle")
    return Retrieval(manual, bundle.spec["manual"], G.Spec.from_dict(raw, where))


def item_grounding(rec: dict, retrieval: Retrieval | None, n: int) -> dict:
    """The question, the hits (as JSON) and recall of eval record `n`; the hits are retrieved again and must
    be the passages the data stage stored, in its prompt."""
    g = rec["grounding"]
    out = {"question": g["question"], "hits": None, "oracle_retrieved": g.get("oracle_retrieved")}
    if retrieval is None:
        return out
    grounder = retrieval.grounder
    hits = grounder.retrieve(g["question"])
    now = [[h.passage.line, h.passage.part] for h in hits]
    stored = [list(p) for p in g.get("passages", [])]
    prompt = grounder.messages(g["question"], hits)
    if now != stored or rec["messages"][:-1] != prompt:
        what = f"passages {now} instead of the stored {stored}" if now != stored else "other passage text"
        raise StageFailure(f"bench: eval record {n} ({g['question'][:60]!r}): the retriever now gives {what}; "
                           f"the manual or the retriever settings ({RETRIEVAL_FILE}) changed since the data stage. "
                           "Bench with the data artifact and manual the model was tuned on, or rerun the data stage")
    out["hits"] = [{**asdict(h.passage), "score": h.score} for h in hits]
    return out


def hits_of(item: dict) -> list[Hit]:
    """An item's retrieved passages, back from JSON."""
    return [Hit(Passage(**{k: v for k, v in h.items() if k != "score"}), h["score"])
            for h in item["grounding"]["hits"]]


def fit(fmt, retrieval: Retrieval, grounding: dict, room: int) -> list[int]:
    """Prompt ids of a grounded question as `edgeft ask` fits it into the context (Grounder.fit);
    `grounding["hits"]` keeps the passages used. Still too long with one passage: the caller cuts it."""
    ids, hits = retrieval.grounder.fit(fmt, grounding["question"], hits_of({"grounding": grounding}), room)
    grounding["hits"] = grounding["hits"][:len(hits)]
    return ids


def stratified(splits: list, n: int) -> list[int]:
    """Indices of `n` records whose splits are `splits`: each split kept in proportion (largest remainder, at
    least one each when n allows) and spread evenly within it; deterministic, in eval order. One split: the
    even spread over all records. n = 0 or n >= len(splits): all of them."""
    if not n or len(splits) <= n:
        return list(range(len(splits)))
    groups: dict = {}
    for i, s in enumerate(splits):
        groups.setdefault(s, []).append(i)
    exact = {s: n * len(ix) / len(splits) for s, ix in groups.items()}
    quota = {s: int(q) for s, q in exact.items()}
    for s in sorted(groups, key=lambda s: exact[s] - quota[s], reverse=True)[: n - sum(quota.values())]:
        quota[s] += 1
    if n >= len(groups):
        for s in groups:
            if quota[s] == 0:  # a small split still measured once, taken from the largest
                quota[max(quota, key=quota.get)] -= 1
                quota[s] = 1
    return sorted(ix[int(j * len(ix) / quota[s])] for s, ix in groups.items() for j in range(quota[s]))


def score(items: list[dict], texts: list[str], ttft_s: list[float] = (),
          retrieval: Retrieval | None = None) -> dict:
    """The grounded-answer figures of one variant from its greedy answers `texts` to `items` ({} when the
    eval has neither splits nor grounded prompts); `ttft_s` the first-token time of each answer."""
    if not any("split" in it or "grounding" in it for it in items):
        return {}
    grounder = retrieval.grounder if retrieval is not None else None
    rows = [_judge(it, t.strip(), grounder) for it, t in zip(items, texts, strict=True)]
    out: dict = {"eval_splits": {s: sum(r["split"] == s for r in rows) for s in (TRAINED, HELDOUT, UNANSWERABLE)}}
    for s in (TRAINED, HELDOUT):
        mine = [r for r in rows if r["split"] == s]
        out[f"key_fact_{s}"] = _mean([M.key_fact(r["shown"], r["key"]) for r in mine if r["key"]])
        out[f"rouge_l_{s}"] = _mean([M.rouge_l(r["shown"], r["reference"]) for r in mine])
        out[f"token_f1_{s}"] = _mean([M.token_f1(r["shown"], r["reference"]) for r in mine])
    refuse = [r for r in rows if not r["answerable"]]
    answerable = [r for r in rows if r["answerable"]]
    out["abstention"] = _mean([r["abstained"] for r in refuse])
    out["model_abstention"] = _mean([r["model_abstained"] for r in refuse])
    out["false_abstention"] = _mean([r["abstained"] for r in answerable])
    judged = [r for r in rows if r["status"] is not None]
    if judged:
        out["citation_correct"] = _mean([r["cited_ok"] for r in judged if r["answerable"] and not r["abstained"]])
        out["unverified"] = _mean([r["status"] == G.UNVERIFIED for r in judged if not r["abstained"]])
        out["answer_status"] = {s: sum(r["status"] == s for r in judged)
                                for s in (G.ANSWERED, G.UNVERIFIED, G.ABSTAINED, G.NOT_IN_MANUAL)}
    grounded = [i for i, it in enumerate(items) if "grounding" in it]
    if grounded:
        found = [items[i]["grounding"]["oracle_retrieved"] for i in grounded]
        out["recall_at_k"] = _mean([f for f in found if f is not None])
        out["grounded_prompt_tokens"] = round(L.spread([len(items[i]["prompt_ids"]) for i in grounded])["median"])
        if ttft_s:
            ms = L.spread([1000 * ttft_s[i] for i in grounded])  # one timed first forward per prompt
            out["grounded_ttft_ms"] = round(ms["median"], 3)
            out["grounded_ttft_ms_iqr"] = [round(ms["q1"], 3), round(ms["q3"], 3)]
    return out


def _judge(it: dict, text: str, grounder: G.Grounder | None) -> dict:
    """What the user is shown for one item, and how it is counted."""
    reference = G.split_citation(it["answer"])[0]
    split = it.get("split")
    answerable = split in (TRAINED, HELDOUT) or (split is None and not G.is_abstention(reference))
    row = {"split": split, "answerable": answerable, "reference": reference, "key": it.get("key"),
           "model_abstained": G.is_abstention(text), "status": None, "cited_ok": None}
    hits = (it.get("grounding") or {}).get("hits")
    if grounder is None or hits is None:  # no runtime check: the model's text is the answer
        return {**row, "shown": text, "abstained": row["model_abstained"]}
    hs, question = hits_of(it), it["grounding"]["question"]
    j = grounder.judge(question, hs, text)  # the pre-check first, as `edgeft ask` does
    row.update(shown=j.text, abstained=j.abstained, status=j.status)
    if answerable and not j.abstained:
        row["cited_ok"] = j.cited is not None and _holds(j.cited, row["key"], reference)
    return row


def _holds(hit: Hit, key: str | None, reference: str) -> bool:
    """The cited passage holds the key fact (or, without a key, the reference answer's key tokens)."""
    if key:
        return bool(M.key_fact(f"{hit.passage.heading} {hit.passage.text}", key))
    return not G.unsupported_tokens(reference, hit)


def missing_note(records: list[dict], retrieval: Retrieval | None) -> list[str]:
    """A report line when the eval prompts are grounded but no retrieval settings came with them."""
    if retrieval is not None or not any("grounding" in r for r in records):
        return []
    return [("grounded answers: the eval prompts hold retrieved passages, but no retrieval settings came with "
             f"them ({RETRIEVAL_FILE}), so the runtime's checks (pre-check, citation) were not applied; pass the "
             "data artifact dir as --eval, or a bundle built with retrieval")]


def _mean(xs: list) -> float | None:
    return round(sum(float(x) for x in xs) / len(xs), 4) if xs else None
