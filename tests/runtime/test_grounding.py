"""Grounded prompts and the runtime's checks on an answer: citations, key tokens, identifiers. No model."""

import pytest

from edgeft.errors import UserError
from edgeft.runtime import grounding as G
from edgeft.runtime.retrieval import cut, split_passages

MANUAL = """ACME PUMPS - SERVICE MANUAL

P-100 - Fault codes
Fault code E101 on the P-100 means low oil pressure. Remedy: check the oil level.
Fault code E202 on the P-100 means motor overload. Remedy: reset the thermal relay.

P-100 - Torque specifications
Tighten the impeller nut on the P-100 to 45 Nm.
Tighten the motor mount bolts on the P-100 to 30 Nm.
"""


@pytest.fixture
def g():
    return G.Grounder(MANUAL, "m.txt", G.Spec(k=2))


def test_prompt_numbers_passages_with_headings(g):
    hits = g.retrieve("What does E202 mean on the P-100?")
    assert hits[0].passage.line == 5
    msgs = g.messages("What does E202 mean on the P-100?", hits)
    assert msgs[0] == {"role": "system", "content": G.INSTRUCTION}
    assert msgs[1]["content"].splitlines()[1] == ("[1] P-100 - Fault codes: Fault code E202 on the P-100 means "
                                                   "motor overload. Remedy: reset the thermal relay.")
    assert msgs[1]["content"].endswith("\n\nQuestion: What does E202 mean on the P-100?")


def test_judge_answered_unverified_abstained(g):
    q = "What does E202 mean on the P-100?"
    hits = g.retrieve(q)
    ok = g.judge(q, hits, "E202 means motor overload: reset the thermal relay. [1]")
    assert ok.status == G.ANSWERED and ok.cited is hits[0]
    assert ok.text == "E202 means motor overload: reset the thermal relay."
    # cites a passage that does not say it: the code E202 is not in passage 2
    wrong = g.judge(q, hits, "E202 means motor overload: reset the thermal relay. [2]")
    assert wrong.status == G.UNVERIFIED and "e202" in wrong.missing
    assert g.judge(q, hits, "E202 means motor overload.").status == G.UNVERIFIED  # no citation
    assert g.judge(q, hits, "E202 means motor overload. [7]").status == G.UNVERIFIED  # no such passage
    made_up = g.judge(q, hits, "E202 means the pump needs 99 Nm. [1]")  # a value the passage lacks
    assert made_up.status == G.UNVERIFIED and "99" in made_up.missing
    assert g.judge(q, hits, "The manual does not cover this.").status == G.ABSTAINED


def test_unknown_identifier_is_not_in_manual_whatever_the_model_says(g):
    q = "What does E303 mean on the P-100?"
    hits = g.retrieve(q)
    assert hits  # BM25 still finds P-100 passages
    assert g.unsupported(q, hits) == ("e303",)
    j = g.judge(q, hits, "Fault code E101 on the P-100 means low oil pressure. [1]")
    assert j.status == G.NOT_IN_MANUAL and j.abstained and j.missing == ("e303",)
    assert g.unsupported("Torque of the impeller nut on the P-100?", g.retrieve("impeller nut P-100")) == ()


def test_identifiers_are_words_with_digits():
    assert G.identifiers("My VX-200 shows E964 after 2 hours") == ["200", "e964"]
    assert G.identifiers("How do I replace the filter?") == []


def test_split_citation_takes_the_last_mark():
    assert G.split_citation("Tighten to 45 Nm [1]. See also [2]") == ("Tighten to 45 Nm . See also", 2)
    assert G.split_citation("no mark") == ("no mark", None)


def test_oracle_by_key_prefers_the_passage_the_question_names(g):
    o = G.oracle(g.index, "What does E202 mean?", "E202 means motor overload.", key="motor overload")
    assert g.index.passages[o].line == 5
    o = G.oracle(g.index, "Impeller nut torque?", "Tighten the impeller nut to 45 Nm.")
    assert g.index.passages[o].line == 8
    assert G.oracle(g.index, "Warranty?", "Two years from delivery.") is None


def test_spec_round_trip_and_refusals():
    s = G.Spec(k=4, max_words=60)
    assert G.Spec.from_dict(s.to_dict(), "x") == s
    with pytest.raises(UserError, match="x: unknown retrieval setting.*top_k"):
        G.Spec.from_dict({"top_k": 3}, "x")
    with pytest.raises(UserError, match="format 99"):
        G.Spec.from_dict({**s.to_dict(), "format": 99}, "x")
    with pytest.raises(UserError, match="'k' must be a number"):
        G.Spec.from_dict({"k": "3"}, "x")
    with pytest.raises(UserError, match="k must be >= 1"):
        G.Spec.from_dict({"k": 0}, "x")


def test_long_lines_cut_at_sentences():
    line = "One two three. Four five six seven. " + " ".join(f"w{i}" for i in range(12)) + "."
    parts = cut(line, 5)
    assert parts[:2] == ["One two three.", "Four five six seven."]
    assert all(len(p.split()) <= 5 for p in parts) and " ".join(parts).split() == line.split()
    ps = split_passages("Heading\n" + line + "\n", "m.txt", max_words=5)
    assert [p.part for p in ps] == list(range(1, len(parts) + 1)) and ps[1].citation() == "m.txt:2 part 2 (Heading)"
    assert [p.part for p in split_passages("Heading\n" + line + "\n", "m.txt")] == [0]
