"""`edgeft export` on the tiny model: pre-flight, variants, bench, gate, and the bundle it writes."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import artifact, profile
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_MODEL_DIR,
    BUNDLE_README,
    BUNDLE_RUNNER,
    EVAL_FILE,
    MANIFEST_NAME,
    MANUAL_FILE,
    RETRIEVAL_FILE,
)
from edgeft.errors import UserError

from conftest import make_tiny_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run dir like `edgeft run` leaves: the embedded data and a tuned hf artifact (the tiny Llama)."""
    return make_tiny_run(tmp_path_factory.mktemp("run"), tiny_llama_dir)


# random weights give flat logits: the ONNX export's top-1 gates are for trained models (see
# tests/stages/test_export_onnx.py); here they are off, everything else runs as shipped
NO_MIN = {"export_onnx": {"min_top1_fp16": 0.0, "min_top1_int8": 0.0, "min_top1_int4": 0.0}}


def cheap(name: str, **over):
    """A shipped profile with a 2-prompt bench and no accuracy gate (random weights answer nothing).

    One thread: llama.cpp's spinning thread pool crawls when the test machine is oversubscribed.
    """
    return profile.load(name, {"bench_samples": "2", "accuracy_budget": "0", "threads": "1", **over})


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory) -> Path:
    """dist/tiny for the tiny model."""
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    out = tmp_path_factory.mktemp("dist") / "tiny"
    export_bundle(tiny_run, BundleConfig(profile=cheap("tiny"), stage_params=NO_MIN), out)
    return out


def test_bundle_contents(tiny_bundle, tiny_run):
    art = artifact.load(tiny_bundle, kind="bundle")  # every file's sha256 checks out
    files = art.manifest["files"]
    spec = json.loads((tiny_bundle / BUNDLE_FILE).read_text())
    for name in (BUNDLE_FILE, BUNDLE_README, BUNDLE_RUNNER, "report.json", "report.md", "manual.txt",
                 f"{BUNDLE_MODEL_DIR}/tokenizer.json", f"{BUNDLE_MODEL_DIR}/config.json"):
        assert name in files, name
    assert set(files) == {str(p.relative_to(tiny_bundle)) for p in tiny_bundle.rglob("*")
                          if p.is_file() and p.name != MANIFEST_NAME}
    assert spec["retrieval"] is None and RETRIEVAL_FILE not in files  # closed-book data: `ask` defaults to cite
    var = spec["variant"]
    assert f"{var['format']}:{var['quant']}" in profile.ladder(profile.load("tiny"))
    assert (tiny_bundle / var["path"]).exists()
    records = json.loads((tiny_bundle / "report.json").read_text())
    names = {r["name"] for r in records}
    assert {"tuned", "gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "onnx-fp32", "onnx-int8"} <= names
    # the gate's choice, worked out by hand from the measured records: cheap() turns the accuracy budget off
    # and every variant of the tiny model needs far less than the 2 GiB budget, so the smallest deployable
    # file is the one: q4_k_m (~4.5 bits per weight) below int8, q8_0, f16 and fp32
    deployable = [r for r in records if r["format"] in ("gguf", "onnx")]
    assert len(deployable) == 5 and all(0 < r["peak_rss_mb"] < 2 * 1024 for r in deployable)
    smallest = min(deployable, key=lambda r: r["size_bytes"])
    assert var["name"] == spec["selected"]["name"] == smallest["name"] == "gguf-q4_k_m"
    assert sorted(r["size_bytes"] for r in deployable)[1] > smallest["size_bytes"]  # no tie decided it
    assert spec["selected"]["size_bytes"] == smallest["size_bytes"]
    assert spec["preflight"]["chosen"]["fits"] and spec["preflight"]["chosen"]["variant"] == \
        f"{var['format']}:{var['quant']}"
    assert os.stat(tiny_bundle / BUNDLE_RUNNER).st_mode & stat.S_IXUSR
    readme = (tiny_bundle / BUNDLE_README).read_text()
    assert "pip install 'edgeft[device]'" in readme and var["name"] in readme and "tok/s" in readme
    assert not list(tiny_bundle.parent.glob(".tmp-*"))  # nothing half-written beside it
    assert (tiny_run / "export-tiny" / "bench" / MANIFEST_NAME).is_file()


def test_the_gate_on_the_bundles_records_with_accuracy_and_memory_perturbed(tiny_bundle):
    """The measured report records, perturbed so the budgets bite: the expected choice is worked out by hand."""
    from edgeft.bench.select import select

    records = json.loads((tiny_bundle / "report.json").read_text())
    deployable = sorted((r for r in records if r["format"] in ("gguf", "onnx")), key=lambda r: r["size_bytes"])
    first, second, third = (r["name"] for r in deployable[:3])
    prof = cheap("tiny", accuracy_budget="0.9")  # needs 0.9 * 0.5 = 0.45 rouge_l

    def perturbed(rouge: dict, rss: dict) -> list[dict]:
        return [{**r, "rouge_l": rouge.get(r["name"], 0.5), "peak_rss_mb": rss.get(r["name"], r["peak_rss_mb"])}
                for r in records]

    assert select(perturbed({}, {}), prof)["name"] == first  # all keep 100%: the smallest
    assert select(perturbed({first: 0.44}, {}), prof)["name"] == second  # 88% kept < 90%: refused
    assert select(perturbed({first: 0.45}, {}), prof)["name"] == first  # exactly 90%: kept
    over = prof.memory_budget_gb * 1024 + 1
    assert select(perturbed({first: 0.44}, {second: over}), prof)["name"] == third  # 1 MiB over the budget
    with pytest.raises(UserError, match=f"closest miss {first}: rouge_l 0.4400 < 0.4500 needed"):
        select(perturbed({r["name"]: 0.44 for r in deployable}, {}), prof)


def test_export_rerun_is_skipped(tiny_bundle, tiny_run, capsys):
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    before = (tiny_bundle / MANIFEST_NAME).read_text()
    export_bundle(tiny_run, BundleConfig(profile=cheap("tiny"), stage_params=NO_MIN), tiny_bundle)
    out = capsys.readouterr().out
    assert "[run ]" not in out and out.count("[skip]") >= 4
    assert (tiny_bundle / MANIFEST_NAME).read_text() == before


@pytest.mark.parametrize("name", sorted(profile.names()))
def test_every_profile_plans_valid_exports(name, tiny_run):
    """Fast half of the every-profile check: pre-flight passes the whole ladder and every stage config validates."""
    from edgeft import pipeline
    from edgeft.bundle import preflight

    prof = profile.load(name)
    fits, notes = preflight.plan(tiny_run / "merge", prof, profile.ladder(prof))
    assert [e.variant for e in fits] == list(profile.ladder(prof))
    for stage_name, cfg in pipeline.export_configs(prof).items():
        pipeline.stage(stage_name).validate(cfg)
    assert all(e.predicted_decode_tok_s > 0 and e.total_gb < prof.memory_budget_gb for e in fits)


@pytest.mark.slow  # 30-50 s per profile on 2 shared cores: every format of every ladder is built and benched
@pytest.mark.parametrize("name", [n for n in profile.names() if n != "tiny"])
def test_export_every_profile(name, tiny_run, tmp_path):
    """Each shipped profile exports the tiny model: its ladder is built, benched, gated and bundled."""
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    prof = cheap(name)
    bundle = export_bundle(tiny_run, BundleConfig(profile=prof, stage_params=NO_MIN), tmp_path / name)
    spec = json.loads((bundle.path / BUNDLE_FILE).read_text())
    assert spec["profile"]["name"] == name
    records = json.loads((bundle.path / "report.json").read_text())
    built = {f"{r['format']}:{r['quant']}" for r in records if r["format"] != "torch"}
    assert built == set(profile.ladder(prof))  # the tiny model fits every device: nothing stepped down
    assert f"{spec['variant']['format']}:{spec['variant']['quant']}" in built
    assert spec["runtime"]["n_gpu_layers"] == prof.n_gpu_layers
    assert spec["runtime"]["onnx_provider"] == prof.onnx_provider
    assert spec["runtime"]["n_ctx"] == min(prof.context_length, 512)  # capped at the model's positions
    artifact.load(bundle.path, kind="bundle")


@pytest.fixture(scope="module")
def shared_work(tmp_path_factory) -> Path:
    """One work dir for the fast profile exports: the one GGUF rung they share is built once, then skipped."""
    return tmp_path_factory.mktemp("profiles-work")


@pytest.mark.parametrize("name", [n for n in profile.names() if n != "tiny"])
def test_export_every_profile_one_rung(name, tiny_run, shared_work, tmp_path, monkeypatch):
    """Fast half of test_export_every_profile: each shipped profile exports the tiny model through one rung of
    its own ladder (gguf:q4_k_m, in every shipped ladder), benched briefly on one prompt, gated and bundled
    with the profile's runtime settings; the full ladders are the slow test's."""
    import functools

    from edgeft.bench.harness import Config as BenchConfig
    from edgeft.stages import bench as bench_stage
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    full = profile.load(name)
    assert "gguf:q4_k_m" in profile.ladder(full) and full.accuracy_budget > 0  # the real profile gates
    prof = cheap(name, gguf="q4_k_m", onnx="", ladder="gguf:q4_k_m", bench_samples="1")
    # the measurement's own lengths (not profile keys): one short timed run, no perplexity
    monkeypatch.setattr(bench_stage, "Config", functools.partial(
        BenchConfig, warmup=0, repeats=1, decode_tokens=4, max_new_tokens=4, prompt_lengths=(8,), ppl_tokens=0))
    bundle = export_bundle(tiny_run, BundleConfig(profile=prof), tmp_path / name, work=shared_work)
    spec = json.loads((bundle.path / BUNDLE_FILE).read_text())
    assert spec["profile"]["name"] == name
    records = json.loads((bundle.path / "report.json").read_text())
    assert [(r["name"], r["threads_requested"]) for r in records] == [("tuned", 1), ("gguf-q4_k_m", 1)]
    assert spec["variant"]["name"] == "gguf-q4_k_m" and (bundle.path / spec["variant"]["path"]).is_file()
    assert spec["runtime"]["n_gpu_layers"] == full.n_gpu_layers
    assert spec["runtime"]["onnx_provider"] == full.onnx_provider
    assert spec["runtime"]["kv_cache_type"] == full.kv_cache_type
    assert spec["runtime"]["n_ctx"] == min(full.context_length, 512)  # capped at the model's positions
    bench_params = artifact.read_manifest(shared_work / "bench")["params"]  # the profile's device figures
    assert bench_params["bandwidth_gbs"] == full.bandwidth_gbs and bench_params["kv_cache_type"] == full.kv_cache_type
    assert bench_params["memory_budget_gb"] == full.memory_budget_gb
    assert bench_params["n_ctx"] == spec["runtime"]["n_ctx"]
    artifact.load(bundle.path, kind="bundle")


def test_a_format_failing_its_gate_steps_down_to_the_others(tiny_run, tmp_path):
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    prof = cheap("tiny", gguf="q8_0", onnx="int8", ladder="gguf:q8_0,onnx:int8")
    # random weights reach ~0.85 int8 top-1 agreement: a 1.0 minimum fails the ONNX export's gate
    bundle = export_bundle(tiny_run, BundleConfig(profile=prof, stage_params={"export_onnx": {"min_top1_int8": 1.0}}),
                           tmp_path / "dist", work=tmp_path / "work")
    spec = json.loads((bundle.path / BUNDLE_FILE).read_text())
    assert spec["variant"]["name"] == "gguf-q8_0"
    assert any(n.startswith("export: export_onnx failed its parity gate") for n in spec["preflight"]["notes"])
    assert "export_onnx failed its parity gate" in (bundle.path / BUNDLE_README).read_text()
    assert {r["name"] for r in json.loads((bundle.path / "report.json").read_text())} == {"tuned", "gguf-q8_0"}


def test_export_refused_before_building(tiny_run, tmp_path):
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    prof = cheap("tiny", memory_budget_gb="0.001", runtime_overhead_gb="0")
    with pytest.raises(UserError, match="no variant fits profile tiny"):
        export_bundle(tiny_run, BundleConfig(profile=prof, stage_params=NO_MIN), tmp_path / "dist", work=tmp_path / "work")
    assert not (tmp_path / "dist").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("retrieval, manual, needle", [
    ({"k": 0}, True, "retrieval k must be >= 1"),
    ({"k": 3, "top_p": 0.9}, True, "unknown retrieval setting(s) top_p"),
    ({"k": 3, "format": 99}, True, "retrieval prompt format 99"),
    ({"k": 3}, False, f"no {MANUAL_FILE} to retrieve from"),
])
def test_retrieval_settings_are_checked_before_building(tiny_run, tmp_path, retrieval, manual, needle):
    """A data artifact whose retrieval.json the device would refuse is refused by export, before any variant."""
    import shutil

    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    def payload(staging: Path) -> dict:
        shutil.copy2(tiny_run / "data" / EVAL_FILE, staging / EVAL_FILE)
        if manual:
            shutil.copy2(tiny_run / "data" / MANUAL_FILE, staging / MANUAL_FILE)
        (staging / RETRIEVAL_FILE).write_text(json.dumps(retrieval))
        return {}

    data = artifact.build(tmp_path / "data", kind="data", stage="data", params={"case": needle}, parent=None,
                          payload=payload)
    with pytest.raises(UserError, match=re.escape(needle)):
        export_bundle(tiny_run, BundleConfig(profile=cheap("tiny", gguf="q8_0", onnx="", ladder="gguf:q8_0")),
                      tmp_path / "dist", data=data.path, work=tmp_path / "work")
    assert not (tmp_path / "dist").exists() and not (tmp_path / "work").exists()


def test_export_cli_errors(tiny_run, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "edgeft.cli", "export", *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path)

    for args, needle in (
        (["--profile", "tiny", "--from", tmp_path / "nope"], "does not exist"),
        (["--profile", "tiny", "--from", tiny_run, "profile.accuracy_budget=2"], "accuracy_budget"),
        (["--profile", "tiny", "--from", tiny_run, "train.lr=1"], "neither profile.KEY"),
        (["--profile", "tiny", "--from", tmp_path], "no finished tuned model"),
        # what to build goes through the profile and its pre-flight, never around it (was a KeyError)
        (["--profile", "tiny", "--from", tiny_run, "export_gguf.types=q4_0"], "override profile.gguf="),
        (["--profile", "tiny", "--from", tiny_run, "export_onnx.route=genai"], "override profile.onnx_route="),
    ):
        proc = run(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "dist").exists()
