"""BM25 over manual text: passages, ranking, exact scores, citations. Pure Python, no model."""

import math

import pytest

from edgeft.runtime.retrieval import BM25, split_passages, tokenize

MANUAL = """ACME PUMPS - SERVICE MANUAL

P-100 - Fault codes
Fault code E101 on the P-100 means low oil pressure. Remedy: check the oil level.
Fault code E202 on the P-100 means motor overload. Remedy: reset the thermal relay.

P-100 - Torque specifications
Tighten the impeller nut to 45 Nm.
Tighten the motor mount bolts to 30 Nm.

Always disconnect power before service.
"""


def test_passages_keep_headings_and_lines():
    ps = split_passages(MANUAL, "m.txt")
    assert [p.line for p in ps] == [1, 4, 5, 8, 9, 11]
    assert ps[0].heading == "" and ps[0].text == "ACME PUMPS - SERVICE MANUAL"
    assert ps[2].heading == "P-100 - Fault codes" and ps[2].text.startswith("Fault code E202")
    assert ps[3].citation() == "m.txt:8 (P-100 - Torque specifications)"
    assert ps[5].citation() == "m.txt:11"


def test_ranking_finds_the_fact():
    idx = BM25(split_passages(MANUAL))
    assert idx.search("What does E202 mean?", 1)[0].passage.line == 5
    assert idx.search("impeller nut torque", 1)[0].passage.line == 8
    top = idx.search("torque for the motor mount bolts", 2)
    assert [h.passage.line for h in top] == [9, 8] and top[0].score > top[1].score
    assert idx.search("what is the", 3) == []  # stopwords only
    assert idx.search("zebra", 3) == []  # unknown term


def test_scores_match_the_bm25_formula():
    docs = split_passages("a\nalpha beta beta\ngamma\n")  # heading 'a' (a stopword), two passages
    idx = BM25(docs, k1=1.5, b=0.75)
    assert [sum(tf.values()) for tf in idx._tf] == [3, 1]  # [alpha, beta, beta] and [gamma]
    n, avg = 2, 2.0
    idf = math.log(1 + (n - 1 + 0.5) / (1 + 0.5))
    want = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / avg))  # beta: tf 2 in a 3-token passage
    assert idx.scores("beta") == [pytest.approx(want, rel=1e-12), 0.0]


def test_tokenize_splits_codes_and_models():
    assert tokenize("What does fault code E-1024 mean on the VX-200?") == ["fault", "code", "e", "1024", "mean", "vx", "200"]
