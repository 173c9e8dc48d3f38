"""benchmarks/grounded_ask.py --smoke: a tiny grounded bundle asked per split and revised; consistent JSON
(never an accuracy check: the model has random weights)."""

from __future__ import annotations

from tests.benchmarks.smoke import smoke_report


def test_smoke_asks_each_split_and_revises_the_manual(tmp_path):
    rep, _ = smoke_report("grounded_ask.py", tmp_path)
    assert rep["smoke"] is True and rep["cpu"]
    assert not (tmp_path / "work").exists()  # scratch removed
    splits = rep["splits"]
    assert set(splits) == {"trained", "heldout", "unanswerable"}
    for name, s in splits.items():
        assert s["questions"] == 2 and sum(s["status"].values()) == 2, name
        abst = (s["status"]["abstained"] + s["status"]["not_in_manual"]) / 2
        assert s.get("abstention", s.get("false_abstention")) == abst, name
        assert s["unverified"] == s["status"]["unverified"] / 2, name
    # every unanswerable question names an identifier the manual lacks: the runtime abstains before the model
    assert splits["unanswerable"]["runtime_abstention"] == 1.0
    # asked again with the pre-check off, the model itself answers them (random weights: it cannot abstain)
    own = rep["unanswerable_without_precheck"]
    assert own["questions"] == 2 and own["model_abstention"] == 0.0
    rev = rep["revision"]
    assert rev["facts"] == 2 and len(rev["examples"]) == 2
    for ex in rev["examples"]:
        assert ex["old"] != ex["new"] and len(ex["old"]) == len(ex["new"])
        assert ex["old"].split("-")[0] == ex["new"].split("-")[0]  # values only: a model prefix is kept
