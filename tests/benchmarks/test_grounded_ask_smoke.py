"""benchmarks/grounded_ask.py --smoke: a tiny grounded bundle asked per split and revised; consistent JSON
(never an accuracy check: the model has random weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_smoke_asks_each_split_and_revises_the_manual(tmp_path):
    out = tmp_path / "ga.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "benchmarks/grounded_ask.py", "--smoke", "--work", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
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
    rev = rep["revision"]
    assert rev["facts"] == 2 and len(rev["examples"]) == 2
    for ex in rev["examples"]:
        assert ex["old"] != ex["new"] and len(ex["old"]) == len(ex["new"])
        assert ex["old"].split("-")[0] == ex["new"].split("-")[0]  # values only: a model prefix is kept
