"""Artifacts under attack: wrong kinds, unfinished or corrupt manifests, files changed, truncated or hostile
weights, a manifest pointing outside its directory, a full disk, leftovers of a killed run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from edgeft import artifact
from edgeft.errors import StageFailure, UserError
from tests.reliability._common import TINY_RECIPE, assert_error, assert_nothing_finished


def _make(tmp_path, name="a", kind="hf", parent=None, content=b"weights"):
    def payload(tmp):
        (tmp / "model.bin").write_bytes(content)
        return {"n": 1}
    return artifact.build(tmp_path / name, kind=kind, stage="test", params={"name": name}, parent=parent,
                          payload=payload)


def test_wrong_artifact_kind_for_a_stage(tmp_path):
    from edgeft.stages import merge

    data_like = _make(tmp_path, "data", kind="data")
    with pytest.raises(UserError, match="kind is 'data'.*needs adapter") as e:
        merge.run(data_like, merge.Config(), tmp_path / "merge")
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    assert not (tmp_path / "merge").exists()


def test_unfinished_directory_is_not_an_artifact(cli, tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"x")
    assert_error(cli("show", tmp_path / "half"), 2, "not a finished edgeft artifact")


def test_corrupt_manifest(cli, tmp_path):
    art = _make(tmp_path)
    (art.path / "manifest.json").write_text('{"id": "abc", "kind": ')
    assert_error(cli("show", art.path), 2, "corrupt manifest", "rerun")


def test_listed_file_missing(tmp_path):
    art = _make(tmp_path)
    (art.path / "model.bin").unlink()
    with pytest.raises(UserError, match="model.bin: listed in .* but missing"):
        artifact.load(art.path)


def test_file_changed_under_manifest_is_caught_by_the_next_stage(tmp_path):
    parent = _make(tmp_path, "parent")
    (parent.path / "model.bin").write_bytes(b"WEIGHTS")  # same size, other bytes
    with pytest.raises(UserError, match="model.bin: changed since its manifest"):
        _make(tmp_path, "child", parent=parent)
    assert not (tmp_path / "child").exists()


def test_finished_artifact_changed_since_is_not_silently_reused(tmp_path):
    art = _make(tmp_path)
    (art.path / "model.bin").write_bytes(b"weights plus")
    with pytest.raises(UserError, match="changed since its manifest"):
        _make(tmp_path)  # same id: would be skipped, but the bytes are not the ones recorded


def test_manifest_entry_escaping_the_artifact(tmp_path):
    art = _make(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    m = json.loads((art.path / "manifest.json").read_text())
    m["files"]["../secret.txt"] = {"sha256": artifact.sha256_file(secret), "size": secret.stat().st_size}
    (art.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="points outside the artifact"):
        artifact.load(art.path)


def _copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_base(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = tmp_path / "run"
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", out, f"base.model={model}",
              f"data.train={tiny_qa_jsonl}", "data.eval=")
    assert_error(res, 2, "model.safetensors", "truncated")
    assert not out.exists()


def test_corrupt_safetensors_header(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\xff" * 32  # garbage where the JSON header starts
    f.write_bytes(bytes(data))
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", tmp_path / "run", f"base.model={model}",
              f"data.train={tiny_qa_jsonl}", "data.eval=")
    assert_error(res, 2, "model.safetensors", "not a readable safetensors")


def test_pickle_only_checkpoint_is_refused(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    model = _copy_model(tiny_llama_dir, tmp_path / "model")
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", tmp_path / "run", f"base.model={model}",
              f"data.train={tiny_qa_jsonl}", "data.eval=")
    assert_error(res, 2, "pickle", "safetensors")


def test_truncated_gguf_fails_cleanly_in_the_runtime(tmp_path, tiny_llama_dir):
    """llama.cpp can abort the process on a broken file: the runtime refuses it before llama.cpp sees it."""
    from edgeft.gguf import writer as gguf_writer

    path = tmp_path / "m.gguf"
    gguf_writer.convert(tiny_llama_dir, path, "f32")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    code = ("import sys\nfrom edgeft.runtime.gguf import GGUFRuntime\n"
            f"try:\n    GGUFRuntime({str(path)!r})\nexcept ValueError as e:\n    print('ERR', e); sys.exit(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-1500:])
    assert "m.gguf" in proc.stdout and "truncated" in proc.stdout


def test_corrupt_onnx_fails_cleanly_in_the_runtime(tmp_path, tiny_llama_dir):
    from edgeft.runtime.onnx import OnnxRuntime

    model_dir = tmp_path / "onnx"
    model_dir.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_llama_dir / name).is_file():
            shutil.copy(tiny_llama_dir / name, model_dir / name)
    (model_dir / "model.onnx").write_bytes(b"\x08\x07" + os.urandom(300))
    with pytest.raises(ValueError, match="model.onnx"):
        OnnxRuntime(model_dir)


def test_disk_full_while_writing_leaves_nothing(tmp_path):
    def payload(tmp):
        (tmp / "part.gguf").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(StageFailure, match="disk full while writing") as e:
        artifact.build(tmp_path / "gguf", kind="gguf", stage="export_gguf", params={}, parent=None, payload=payload)
    assert e.value.exit_code == 1
    assert_nothing_finished(tmp_path)
    assert not (tmp_path / "gguf").exists()


def test_disk_full_in_the_gguf_export(monkeypatch, tmp_path, tiny_llama_dir):
    """The real exporter, with the disk filling up half-way through the tensor data."""
    import gguf

    from edgeft.stages import export_gguf

    src = artifact.build(tmp_path / "merge", kind="hf", stage="test", params={}, parent=None,
                         payload=lambda tmp: [shutil.copy(p, tmp / p.name) for p in tiny_llama_dir.iterdir()] and {})
    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def full(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    with pytest.raises(StageFailure, match="disk full"):
        export_gguf.run(src, export_gguf.Config(types=("f16",)), tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.glob(".tmp-*"))


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    stale = tmp_path / ".tmp-a-999999"  # a staging dir whose process is gone
    stale.mkdir()
    (stale / "model.bin").write_bytes(b"half")
    art = _make(tmp_path)
    assert artifact.load(art.path).manifest["files"]["model.bin"]["size"] == 7
    assert not stale.exists()


def test_every_torch_stage_checks_its_input_kind_first(tmp_path):
    """Each stage refuses the wrong input kind before doing any work."""
    from edgeft.stages import bench, export_gguf, export_onnx

    gguf_like = _make(tmp_path, "g", kind="gguf")
    for mod, cfg in ((export_gguf, export_gguf.Config(types=("f16",))), (export_onnx, export_onnx.Config())):
        with pytest.raises(UserError, match=r"needs (an )?'?hf'?.*|kind is 'gguf'"):
            mod.run(gguf_like, cfg, tmp_path / f"out-{mod.__name__}")
    data = _make(tmp_path, "d", kind="data")
    with pytest.raises(UserError, match="needs hf|kind is 'gguf'"):
        bench.run(gguf_like, bench.Config(), tmp_path / "bench", data=data, base=None, exports=[])


def test_bundle_manifest_entry_escaping_the_bundle(tmp_path):
    """The device side refuses a bundle whose manifest reaches outside it, before hashing anything."""
    from edgeft.constants import BUNDLE_FILE
    from edgeft.device.bundle import verify_bundle

    bundle = tmp_path / "dist" / "jetson"
    bundle.mkdir(parents=True)
    (bundle / BUNDLE_FILE).write_text("{}")
    outside = tmp_path / "dist" / "other.gguf"
    outside.write_bytes(b"GGUF")
    files = {BUNDLE_FILE: {"sha256": artifact.sha256_file(bundle / BUNDLE_FILE), "size": 2},
             "../other.gguf": {"sha256": artifact.sha256_file(outside), "size": 4}}
    with pytest.raises(UserError, match="points outside the bundle"):
        verify_bundle(bundle, {"files": files})


def test_a_variant_that_will_not_fit_is_refused_before_building(tmp_path, tiny_llama_dir):
    """Pre-flight: weights + KV cache + runtime overhead over the profile's budget ends in one line, exit 2."""
    from edgeft import profile
    from edgeft.bundle import preflight

    prof = profile.load("tiny", {"memory_budget_gb": "0.0001", "runtime_overhead_gb": "0"})
    with pytest.raises(UserError) as e:
        preflight.plan(tiny_llama_dir, prof, profile.ladder(prof))
    assert e.value.exit_code == 2 and "\n" not in str(e.value) and "budget" in str(e.value)
