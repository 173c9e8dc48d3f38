"""Grounded answers in the bench: judged as `edgeft ask` shows them, per split; stored passages checked;
stratified sampling. The figures come from hand-made answers to a three-line manual, counted by hand."""

from __future__ import annotations

import csv
import json

import pytest

from edgeft.bench import grounded, report
from edgeft.bench.harness import Config, build_samples
from edgeft.errors import StageFailure
from edgeft.runtime import grounding as G

MANUAL = ("VX-200 - Fault codes\n"
          "Fault code E101 on the VX-200 means low oil pressure. Remedy: check the oil level.\n"
          "Fault code E202 on the VX-200 means belt slip detected. Remedy: retension the drive belt.\n"
          "\n"
          "VX-200 - Torque specifications\n"
          "Tighten the pulley clamp bolt on the VX-200 to 65 Nm.\n")
SPEC = G.Spec(k=2)
E101 = "Fault code E101 on the VX-200 means low oil pressure. Remedy: check the oil level."
E202 = "Fault code E202 on the VX-200 means belt slip detected. Remedy: retension the drive belt."


def _record(question: str, answer: str, key: str | None, split: str, retrieval: grounded.Retrieval) -> dict:
    """An eval record as the data stage writes it (training.raft.ground): its prompt from the retriever."""
    g = retrieval.grounder
    hits = g.retrieve(question)
    cite = next((i for i, h in enumerate(hits, 1) if key and key in h.passage.text), None)
    reply = G.ABSTAIN if split == "unanswerable" else G.target(answer, cite)
    rec = {"messages": g.messages(question, hits) + [{"role": "assistant", "content": reply}],
           "answer": answer, "split": split,
           "grounding": {"question": question, "passages": [[h.passage.line, h.passage.part] for h in hits],
                         "oracle_retrieved": None if split == "unanswerable" else cite is not None}}
    if key:
        rec["key"] = key
    return rec


def _item(rec: dict, retrieval, n: int = 1) -> dict:
    """The harness item of a record (the fields `score` reads; prompt ids stand in for the tokenized prompt)."""
    return {"answer": rec["messages"][-1]["content"], "key": rec.get("key"), "split": rec["split"],
            "prompt_ids": list(range(40 + n)), "grounding": grounded.item_grounding(rec, retrieval, n)}


def _cite(item: dict, text: str) -> int:
    """The 1-based number of the retrieved passage whose text is `text`."""
    return next(i for i, h in enumerate(grounded.hits_of(item), 1) if h.passage.text == text)


@pytest.fixture
def retrieval():
    return grounded.Retrieval(MANUAL, "manual.txt", SPEC)


@pytest.fixture
def items(retrieval):
    recs = [_record("What does fault code E101 mean on the VX-200?", "E101 means low oil pressure.",
                    "low oil pressure", "trained", retrieval),
            _record("What does fault code E202 mean on the VX-200?", "E202 means belt slip detected.",
                    "belt slip detected", "heldout", retrieval),
            _record("What does fault code E202 mean on the VX-200 pump?", "E202 means belt slip detected.",
                    "belt slip detected", "heldout", retrieval),
            _record("What does fault code E999 mean on the VX-200?", G.ABSTAIN, None, "unanswerable", retrieval),
            _record("What does fault code E101 mean on the VX-200 unit?", "E101 means low oil pressure.",
                    "low oil pressure", "trained", retrieval)]
    return [_item(r, retrieval, n) for n, r in enumerate(recs, 1)]


def test_items_carry_the_retrieved_hits_as_json(items, retrieval):
    it = items[0]
    assert json.loads(json.dumps(it)) == it  # what the worker reads back from samples.json
    assert grounded.hits_of(it) == retrieval.grounder.retrieve(it["grounding"]["question"])
    assert grounded.Retrieval.from_json(json.loads(json.dumps(retrieval.to_json()))) == retrieval


def test_scores_count_what_the_runtime_shows(items, retrieval):
    texts = [
        f"E101 means low oil pressure. [{_cite(items[0], E101)}]",  # right, cites its passage
        # a real answer citing the E101 passage: the runtime cannot tie 'e202' to it (unverified)
        f"E202 means belt slip detected. [{_cite(items[1], E101)}]",
        # every word is in the cited passage, so the runtime verifies it, but that passage lacks the key fact
        f"The VX-200 fault code. [{_cite(items[2], E101)}]",
        "E999 means low oil pressure. [1]",  # the model answers; the pre-check refuses without reading it
        G.ABSTAIN,  # a false abstention on a trained fact
    ]
    s = grounded.score(items, texts, [0.010, 0.020, 0.030, 0.040, 0.050], retrieval)
    assert s["eval_splits"] == {"trained": 2, "heldout": 2, "unanswerable": 1}
    assert s["abstention"] == 1.0 and s["model_abstention"] == 0.0  # the pre-check's doing, not the model's
    assert s["answer_status"] == {G.ANSWERED: 2, G.UNVERIFIED: 1, G.ABSTAINED: 1, G.NOT_IN_MANUAL: 1}
    assert s["false_abstention"] == 0.25  # 1 of 4 answerable
    assert s["key_fact_trained"] == 0.5 and s["key_fact_heldout"] == 0.5  # shown text holds the key
    assert s["citation_correct"] == pytest.approx(1 / 3, abs=1e-4)  # of 3 answered answerable: only the first
    assert s["unverified"] == pytest.approx(1 / 3, abs=1e-4)  # of 3 answers shown
    assert s["recall_at_k"] == 1.0
    assert s["grounded_ttft_ms"] == 30.0 and s["grounded_ttft_ms_iqr"] == [20.0, 40.0]
    assert s["grounded_prompt_tokens"] == 43
    assert s["rouge_l_trained"] == 0.5  # the exact answer (1.0) and the abstention (0.0)


def test_the_same_answers_without_the_runtime_checks_count_the_model_alone(items, retrieval):
    """No retrieval settings: the model's text is what is shown, so the unanswerable one counts as answered."""
    texts = ["E101 means low oil pressure. [1]", "x", "y", "E999 means low oil pressure. [1]", G.ABSTAIN]
    bare = [{**it, "grounding": {**it["grounding"], "hits": None}} for it in items]
    s = grounded.score(bare, texts, [], None)
    assert s["abstention"] == 0.0 and s["model_abstention"] == 0.0 and s["false_abstention"] == 0.25
    assert "citation_correct" not in s and "grounded_ttft_ms" not in s and s["recall_at_k"] == 1.0
    assert grounded.score([{k: v for k, v in it.items() if k not in ("split", "grounding")} for it in items],
                          texts) == {}  # an eval without splits or grounding: no grounded figures


def test_a_citation_number_the_prompt_lacks_is_unverified_and_not_correct(items, retrieval):
    texts = ["E101 means low oil pressure. [7]", "E202 means belt slip detected.", G.ABSTAIN, G.ABSTAIN,
             G.ABSTAIN]
    s = grounded.score(items, texts, [0.01] * 5, retrieval)
    assert s["citation_correct"] == 0.0 and s["unverified"] == 1.0 and s["key_fact_trained"] == 0.5


@pytest.mark.parametrize("edit, what", [
    (lambda m: "Read this manual before any service.\n\n" + m, r"passages \[\[.*\]\] instead of the stored"),
    (lambda m: m.replace("low oil pressure", "high oil pressure"), "other passage text"),
])
def test_passages_no_longer_retrieved_as_stored_are_refused(retrieval, edit, what):
    rec = _record("What does fault code E101 mean on the VX-200?", "E101 means low oil pressure.",
                  "low oil pressure", "trained", retrieval)
    changed = grounded.Retrieval(edit(MANUAL), "manual.txt", SPEC)
    with pytest.raises(StageFailure, match=f"eval record 3 .*{what}.*changed since the data stage"):
        grounded.item_grounding(rec, changed, 3)
    other_k = grounded.Retrieval(MANUAL, "manual.txt", G.Spec(k=3))
    with pytest.raises(StageFailure, match="changed since the data stage"):
        grounded.item_grounding(rec, other_k, 3)
    assert grounded.item_grounding(rec, retrieval, 3)["hits"]  # the unchanged manual passes


def test_stratified_keeps_every_split_in_proportion():
    splits = (["trained"] * 7 + ["heldout"] * 2 + ["unanswerable"]) * 10  # 70 / 20 / 10, interleaved
    picked = grounded.stratified(splits, 10)
    assert [splits[i] for i in picked].count("trained") == 7
    assert [splits[i] for i in picked].count("heldout") == 2
    assert [splits[i] for i in picked].count("unanswerable") == 1
    assert picked == sorted(set(picked)) and grounded.stratified(splits, 10) == picked  # eval order, deterministic
    rare = ["trained"] * 98 + ["heldout", "unanswerable"]
    assert sorted(rare[i] for i in grounded.stratified(rare, 5)) == ["heldout"] + ["trained"] * 3 + ["unanswerable"]
    # one split: the even spread the harness always took
    assert grounded.stratified([None] * 20, 7) == [int(i * 20 / 7) for i in range(7)]
    assert grounded.stratified(splits, 0) == list(range(100)) == grounded.stratified(splits, 500)
    one_each = grounded.stratified(splits, 3)
    assert sorted(splits[i] for i in one_each) == ["heldout", "trained", "unanswerable"]


def test_build_samples_stratifies_and_checks_the_stored_passages(tiny_llama_dir, retrieval):
    q = ["What does fault code E101 mean on the VX-200?", "What does fault code E202 mean on the VX-200?"]
    facts = [("E101 means low oil pressure.", "low oil pressure"), ("E202 means belt slip detected.", "belt slip detected")]
    recs = [_record(q[i % 2], *facts[i % 2], "trained" if i < 16 else "heldout", retrieval) for i in range(20)]
    recs += [_record("What does fault code E999 mean on the VX-200?", G.ABSTAIN, None, "unanswerable", retrieval)
             for _ in range(4)]
    s = build_samples(recs, tiny_llama_dir, Config(max_samples=6, n_ctx=256), "", retrieval)
    assert [it["split"] for it in s["items"]] == ["trained"] * 4 + ["heldout", "unanswerable"]
    assert all(it["grounding"]["hits"] for it in s["items"]) and s["retrieval"] == retrieval.to_json()
    changed = grounded.Retrieval(MANUAL.replace("65 Nm", "60 Nm\nCheck it again after 50 hours."), "manual.txt",
                                 SPEC)  # a line added: the torque section's passages unchanged, E101's too
    assert build_samples(recs, tiny_llama_dir, Config(max_samples=6, n_ctx=256), "", changed)["items"]
    shifted = grounded.Retrieval("Intro.\n\n" + MANUAL, "manual.txt", SPEC)
    with pytest.raises(StageFailure, match="eval record 1 .*changed since the data stage"):
        build_samples(recs, tiny_llama_dir, Config(max_samples=6, n_ctx=256), "", shifted)


def test_report_shows_the_grounded_table_and_csv_columns(tmp_path, items, retrieval):
    from edgeft.constants import REPORT_FIELDS

    s = grounded.score(items, [G.ABSTAIN] * 5, [0.01] * 5, retrieval)
    recs = [{**{f: 1 for f in REPORT_FIELDS}, "name": "tuned", "latency": {}, **s},
            {**{f: 1 for f in REPORT_FIELDS}, "name": "plain", "latency": {}}]
    report.write(recs, tmp_path)
    md = (tmp_path / "report.md").read_text()
    head = "| name | " + " | ".join(grounded.FIELDS) + " |"
    assert head in md and "Grounded answers (2 trained, 2 heldout, 1 unanswerable eval questions" in md
    row = next(line for line in md.splitlines() if line.startswith("| tuned | 0 |"))
    assert row == "| tuned | 0 | 0 | 0 | 0 | 1 | 1 | 1 | - | - | 1 | 10 |"  # all abstained: nothing answered
    assert "| plain | - |" in md
    header = next(csv.reader((tmp_path / "report.csv").open()))
    assert header[:len(REPORT_FIELDS)] == list(REPORT_FIELDS) and set(grounded.CSV_FIELDS) <= set(header)
    plain_only = tmp_path / "plain"
    plain_only.mkdir()
    report.write(recs[1:], plain_only)
    assert "Grounded answers" not in (plain_only / "report.md").read_text()


def test_an_over_long_grounded_prompt_drops_its_last_passages_as_ask_does(tiny_llama_dir, retrieval):
    from edgeft.runtime.prompt import PromptFormatter

    rec = _record("What does fault code E101 mean on the VX-200?", "E101 means low oil pressure.",
                  "low oil pressure", "trained", retrieval)
    fmt, g = PromptFormatter(tiny_llama_dir), retrieval.grounder
    hits = g.retrieve(rec["grounding"]["question"])
    two, one = (fmt.prompt_ids(g.messages(rec["grounding"]["question"], hits[:k])) for k in (2, 1))
    assert len(one) < len(two)
    cfg = Config(max_new_tokens=8, n_ctx=len(two) - 1 + 8)  # room for one passage, not two
    s = build_samples([rec], tiny_llama_dir, cfg, "", retrieval)
    it = s["items"][0]
    assert it["prompt_ids"] == one and grounded.hits_of(it) == hits[:1]  # the question kept whole
    assert s["prompts_fitted"] == 1 and s["prompts_cut"] == 0
    assert it["answer_span"][0] == len(two) - 1  # teacher-forced agreement still on the record's own prompt
    # a citation of the dropped passage is then no citation of a passage the model was shown
    assert grounded.score([it], ["E202 means belt slip detected. [2]"], [0.01], retrieval)["unverified"] == 1.0


def test_a_question_that_retrieves_nothing_is_refused_without_the_model(retrieval):
    q = "Hello there?"
    assert retrieval.grounder.retrieve(q) == []
    rec = {"messages": retrieval.grounder.messages(q, []) + [{"role": "assistant", "content": "Hi. [1]"}],
           "answer": "Hi.", "split": "trained", "grounding": {"question": q, "passages": [], "oracle_retrieved": None}}
    s = grounded.score([_item(rec, retrieval)], ["Hi. [1]"], [0.01], retrieval)
    assert s["answer_status"][G.NOT_IN_MANUAL] == 1 and s["false_abstention"] == 1.0 and s["recall_at_k"] is None


def test_retrieval_from_a_data_dir_and_a_bundle(tmp_path):
    from types import SimpleNamespace

    from edgeft.constants import MANUAL_FILE, RETRIEVAL_FILE
    from edgeft.errors import UserError

    assert grounded.from_data_dir(tmp_path) is None  # closed-book data
    (tmp_path / RETRIEVAL_FILE).write_text(json.dumps(SPEC.to_dict()))
    with pytest.raises(UserError, match="no manual.txt"):
        grounded.from_data_dir(tmp_path)
    (tmp_path / MANUAL_FILE).write_text(MANUAL)
    assert grounded.from_data_dir(tmp_path) == grounded.Retrieval(MANUAL, MANUAL_FILE, SPEC)
    (tmp_path / RETRIEVAL_FILE).write_text(json.dumps({**SPEC.to_dict(), "format": 99}))
    with pytest.raises(UserError, match="format 99"):
        grounded.from_data_dir(tmp_path)

    def bundle(spec):
        return SimpleNamespace(path=tmp_path, spec=spec, manual_text=lambda: MANUAL if spec.get("manual") else None)

    assert grounded.from_bundle(bundle({"manual": "manual.txt", "retrieval": None})) is None
    got = grounded.from_bundle(bundle({"manual": "manual.txt", "retrieval": SPEC.to_dict()}))
    assert got == grounded.Retrieval(MANUAL, "manual.txt", SPEC)
