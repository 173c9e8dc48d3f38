"""The artifact contract: atomic publish, manifest content, id caching, verification, lineage."""

import json

import pytest

from edgeft import artifact
from edgeft.constants import MANIFEST_NAME
from edgeft.errors import UserError


def _write(text):
    def payload(tmp):
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        return {"loss": 1.5}
    return payload


def test_build_writes_manifest_last_with_hashes(tmp_path):
    art = artifact.build(tmp_path / "x", kind="hf", stage="train", params={"lr": 1}, parent=None,
                         payload=_write("hello"), inputs={"data_sha256": "abc"})
    m = json.loads((tmp_path / "x" / MANIFEST_NAME).read_text())
    assert m["kind"] == "hf" and m["stage"] == "train" and m["params"] == {"lr": 1}
    assert m["files"]["a.txt"]["sha256"] == artifact.sha256_file(tmp_path / "x" / "a.txt")
    assert "sub/b.bin" in m["files"] and m["metrics"]["loss"] == 1.5
    assert m["inputs"] == {"data_sha256": "abc"} and "python" in m["versions"]
    assert art.id == artifact.artifact_id(None, "train", {"lr": 1}, {"data_sha256": "abc"})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_same_id_is_skipped_and_new_params_replace(tmp_path):
    calls = []

    def payload(tmp):
        calls.append(1)
        (tmp / "f").write_text("x")
    a = artifact.build(tmp_path / "x", kind="hf", stage="s", params={"p": 1}, parent=None, payload=payload)
    b = artifact.build(tmp_path / "x", kind="hf", stage="s", params={"p": 1}, parent=None, payload=payload)
    assert a.id == b.id and len(calls) == 1
    c = artifact.build(tmp_path / "x", kind="hf", stage="s", params={"p": 2}, parent=None, payload=payload)
    assert c.id != a.id and len(calls) == 2
    assert artifact.load(tmp_path / "x").id == c.id


def test_failed_payload_leaves_nothing(tmp_path):
    def boom(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        artifact.build(tmp_path / "x", kind="hf", stage="s", params={}, parent=None, payload=boom)
    assert list(tmp_path.iterdir()) == []


def test_changed_file_fails_verification(tmp_path):
    artifact.build(tmp_path / "x", kind="hf", stage="s", params={}, parent=None, payload=_write("hi"))
    (tmp_path / "x" / "a.txt").write_text("tampered")
    with pytest.raises(UserError, match="sha256 mismatch"):
        artifact.load(tmp_path / "x")


def test_wrong_kind_and_unfinished_dir_are_user_errors(tmp_path):
    artifact.build(tmp_path / "x", kind="gguf", stage="s", params={}, parent=None, payload=_write("hi"))
    with pytest.raises(UserError, match="needs hf"):
        artifact.load(tmp_path / "x", kind="hf")
    (tmp_path / "y").mkdir()
    with pytest.raises(UserError, match="not a finished edgeft artifact"):
        artifact.load(tmp_path / "y")


def test_lineage_walks_back_to_root(tmp_path):
    a = artifact.build(tmp_path / "a", kind="data", stage="data", params={}, parent=None, payload=_write("1"))
    b = artifact.build(tmp_path / "b", kind="hf", stage="train", params={}, parent=a, payload=_write("2"))
    c = artifact.build(tmp_path / "c", kind="gguf", stage="export_gguf", params={}, parent=b, payload=_write("3"))
    assert [x.stage for x in artifact.lineage(c.path)] == ["export_gguf", "train", "data"]
    assert c.id != artifact.build(tmp_path / "d", kind="gguf", stage="export_gguf", params={}, parent=a,
                                  payload=_write("3")).id  # the parent is part of the id


def test_lineage_survives_moving_the_run_dir(tmp_path):
    import shutil

    run = tmp_path / "run"
    a = artifact.build(run / "data", kind="data", stage="data", params={"x": 1}, parent=None, payload=lambda d: {})
    b = artifact.build(run / "train", kind="hf", stage="train", params={}, parent=a, payload=lambda d: {})
    assert [x.stage for x in artifact.lineage(b.path)] == ["train", "data"]
    moved = tmp_path / "elsewhere"
    shutil.move(str(run), str(moved))
    chain = artifact.lineage(moved / "train")
    assert [x.stage for x in chain] == ["train", "data"] and chain[1].path == moved / "data"
    # a different artifact at the recorded place is not the parent
    artifact.build(moved / "data", kind="data", stage="data", params={"x": 2}, parent=None, payload=lambda d: {})
    assert [x.stage for x in artifact.lineage(moved / "train")] == ["train"]


def test_each_stage_records_its_own_peak_memory_and_its_childrens(tmp_path):
    """In a fresh process (pytest's own children would set the children's high-water mark): a stage that
    held 200 MiB, then one that held nothing, then one whose child held 150 MiB."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import json, subprocess, sys
        from pathlib import Path
        import numpy as np
        from edgeft import artifact
        out = Path({str(tmp_path)!r})
        def big(tmp):
            a = np.ones(200 * 2**20 // 8)
            return {{"sum": float(a.sum())}}
        def child(tmp):
            subprocess.run([sys.executable, "-c", "import numpy as np; a = np.ones(150 * 2**20 // 8); a.sum()"],
                           check=True)
        got = [artifact.build(out / name, kind="hf", stage=name, params={{}}, parent=None, payload=fn).metrics
               for name, fn in (("big", big), ("small", lambda tmp: None), ("child", child))]
        print(json.dumps(got))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    big, small, child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert big["peak_rss_scope"] == small["peak_rss_scope"] == "stage"  # Linux resets the count per stage
    assert big["peak_rss_mb"] - small["peak_rss_mb"] > 150  # the 200 MiB held by the first is not the second's
    assert "children_peak_rss_mb" not in big and child["children_peak_rss_mb"] > 150
    assert child["peak_rss_mb"] < big["peak_rss_mb"] - 150  # the child's memory is not counted as the stage's own
