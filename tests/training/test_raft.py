"""Retrieval-augmented tuning data: held-out facts, unanswerable questions, oracle/distractor prompts."""

import json

import pytest

from edgeft.demo.manual import generate_manual
from edgeft.errors import UserError
from edgeft.runtime import grounding as G
from edgeft.runtime.prompt import PromptFormatter
from edgeft.runtime.retrieval import tokenize
from edgeft.stages import data
from edgeft.training import examples, raft


def _records(manual, phrasings="train_questions"):
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f.answer}],
             "answer": f.answer, "key": f.key} for f in manual.facts for q in getattr(f, phrasings)]


@pytest.fixture(scope="module")
def manual():
    return generate_manual(0)


def test_held_out_facts_lose_every_phrasing(manual):
    train, evals = _records(manual), _records(manual, "eval_questions")
    kept, tagged = raft.hold_out_facts(train, evals, 0.3, seed=1)
    held = {r["answer"] for r in tagged if r["split"] == raft.SPLIT_HELDOUT}
    answers = {f.answer for f in manual.facts}  # a fact is a distinct answer (models may share one)
    assert abs(len(held) - 0.3 * len(answers)) <= 1
    assert not held & {r["answer"] for r in kept}
    assert len(kept) == sum(r["answer"] not in held for r in train) < len(train)
    assert {r["split"] for r in tagged} == {raft.SPLIT_TRAINED, raft.SPLIT_HELDOUT}
    assert len(raft.limit_phrasings(kept, 1)) == len(answers) - len(held)


def test_unanswerable_questions_name_what_the_manual_lacks(manual):
    text = manual.text()
    tokens = set(tokenize(text))
    qs = raft.unanswerable(_records(manual), text, 0.1, seed=3)
    assert len(qs) == round(0.1 * 4 * len(manual.facts))
    for r in qs:
        q = r["messages"][0]["content"]
        assert q != r["source_question"] and r["messages"][1]["content"] == G.ABSTAIN
        fresh = [t for t in G.identifiers(q) if t not in G.identifiers(r["source_question"])]
        assert fresh and not any(t in tokens for t in fresh)
        # same shape: only digits changed
        assert [c.isdigit() for c in q] == [c.isdigit() for c in r["source_question"]]


def test_grounded_training_pairs_each_answer_with_a_distractor_only_refusal(manual):
    text = manual.text()
    g = G.Grounder(text, "manual.txt", G.Spec(k=3))
    recs = _records(manual)[:200]
    out = raft.ground(recs, g, negatives=0.3, seed=0, train=True)
    by_q: dict = {}
    for r in out:
        by_q.setdefault(r["grounding"]["question"], []).append(r)
    assert len(by_q) == len(recs)  # every answerable question is kept, with its passage
    pairs = 0
    for src in recs:
        q = src["messages"][0]["content"]
        got = by_q[q]
        o = g.index.passages[G.oracle(g.index, q, src["answer"], src["key"])]
        assert src["key"].lower() in o.text.lower()
        answer = got[0]
        body, n = G.split_citation(answer["messages"][-1]["content"])
        assert body == src["answer"] and [o.line, o.part] == answer["grounding"]["passages"][n - 1]
        assert o.text in answer["messages"][1]["content"].splitlines()[n][4:]
        if len(got) == 2:  # the same question again, its passage taken away: refuse
            pairs += 1
            neg = got[1]
            assert neg["messages"][-1]["content"] == G.ABSTAIN and neg["grounding"]["negative"]
            assert len(neg["grounding"]["passages"]) == 3 and [o.line, o.part] not in neg["grounding"]["passages"]
        else:
            assert len(got) == 1
    assert 0.2 < pairs / len(recs) < 0.4
    assert raft.ground(recs, g, negatives=0.0, seed=0, train=True) == [by_q[r["messages"][0]["content"]][0]
                                                                       for r in recs]


def test_eval_records_keep_the_retrievers_top_k_and_report_recall(manual):
    g = G.Grounder(manual.text(), "manual.txt", G.Spec(k=3))
    recs = _records(manual, "eval_questions")[:80]
    out = raft.ground(recs, g, negatives=0.0, seed=0, train=False)
    for r, src in zip(out, recs):
        hits = g.retrieve(src["messages"][0]["content"])
        assert r["grounding"]["passages"] == [[h.passage.line, h.passage.part] for h in hits]
        assert r["grounding"]["oracle_retrieved"] == ("[" in r["messages"][-1]["content"])
    assert sum(r["grounding"]["oracle_retrieved"] for r in out) / len(out) > 0.8


def test_data_stage_writes_grounded_splits_and_settings(tmp_path):
    cfg = data.Config(heldout_facts=0.3, unanswerable=0.1, train_phrasings=1, retrieval_k=2, manual_heldout=0)
    data.run(None, cfg, tmp_path / "d")
    spec = G.Spec.from_dict(json.loads((tmp_path / "d" / "retrieval.json").read_text()), "retrieval.json")
    assert spec.k == 2
    evals = [json.loads(x) for x in (tmp_path / "d" / "eval.jsonl").read_text().splitlines()]
    assert {r["split"] for r in evals} == {"trained", "heldout", "unanswerable"}
    train = [json.loads(x) for x in (tmp_path / "d" / "train.jsonl").read_text().splitlines()]
    held = {r["answer"] for r in evals if r["split"] == "heldout"}
    assert held and not held & {r["answer"] for r in train}
    assert all(r["messages"][0]["content"] == G.INSTRUCTION for r in train + evals)


@pytest.mark.parametrize("over,msg", [
    ({"retrieval_k": 3}, "data.manual_heldout: 0.05 moves manual lines"),
    ({"heldout_facts": 1.0}, "data.heldout_facts: 1.0 is not a share"),
    ({"retrieval_k": 3, "manual_heldout": 0, "retrieval_negatives": 1.5}, "data.retrieval_negatives: 1.5"),
    ({"retrieval_k": 3, "manual_heldout": 0, "train": "x.jsonl"}, "needs the manual"),
])
def test_data_refusals(tmp_path, over, msg):
    if over.get("train"):
        (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "a"}\n')
        over = {**over, "train": str(tmp_path / "x.jsonl")}
    with pytest.raises(UserError, match=msg):
        data.run(None, data.Config(**over), tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_grounded_examples_are_refused_not_cut(tmp_path, tiny_tokenizer_dir):
    fmt = PromptFormatter(tiny_tokenizer_dir)
    g = G.Grounder(generate_manual(0).text(), "manual.txt", G.Spec(k=3))
    recs = raft.ground(_records(generate_manual(0))[:4], g, 0.0, 0, train=True)
    longest = max(len(examples.encode(fmt, [r], 4096)[0][0]) for r in recs)
    assert len(examples.encode(fmt, recs, longest)) == 4
    with pytest.raises(UserError, match=f"train.max_length {longest - 1} cuts 1 of 4 .* >= {longest}"):
        examples.encode(fmt, recs, longest - 1, "train.max_length")


def test_split_by_answer_eval_is_held_out_and_ungroundable_training_is_dropped():
    manual = "Picture\nPress Home to open the picture menu.\n\nSound\nPress Mute to silence the TV.\n"
    rec = lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                        "answer": a}
    train = [rec("How do I open the picture menu?", "Press Home to open the picture menu."),
             rec("What is the warranty?", "Two years from delivery.")]
    evals = [rec("Picture menu?", "Press Home to open the picture menu."), rec("Mute?", "Press Mute.")]
    kept, tagged = raft.hold_out_facts(train, evals, 0.0, seed=0)
    assert kept == train and [r["split"] for r in tagged] == ["trained", "heldout"]  # 'Press Mute.' never tuned on
    g = G.Grounder(manual, "manual.txt", G.Spec(k=1))
    out = raft.ground(kept, g, 0.0, 0, train=True)
    assert len(out) == 1 and out[0]["messages"][-1]["content"] == "Press Home to open the picture menu. [1]"
