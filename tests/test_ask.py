"""The device side of a bundle: `edgeft ask` (checksums first, retrieval, REPL) and `edgeft doctor`.

The commands run in subprocesses where importing torch or transformers fails, as on a device with
only `edgeft[device]` installed.
"""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft import profile
from edgeft.constants import BUNDLE_FILE, MANIFEST_NAME

from conftest import make_tiny_run

# torch and transformers made unimportable before edgeft runs
TORCH_FREE = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
              "from edgeft.cli import main; sys.exit(main(sys.argv[1:]))")


def device(*args, stdin=None):
    return subprocess.run([sys.executable, "-c", TORCH_FREE, *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run dir with the embedded data and the tiny Llama as its tuned model."""
    return make_tiny_run(tmp_path_factory.mktemp("askrun"), tiny_llama_dir)


def _bundle(run: Path, out: Path, **types) -> Path:
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    # random weights: no accuracy gate (nor the ONNX export's top-1 gate); one thread (shared CI cores)
    prof = profile.load("tiny", {**types, "bench_samples": "2", "accuracy_budget": "0", "threads": "1"})
    params = {"export_onnx": {"min_top1_int8": 0.0}} if prof.onnx else {}
    return export_bundle(run, BundleConfig(profile=prof, stage_params=params), out).path


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    """A GGUF q8_0 bundle of the tiny model with the embedded manual."""
    return _bundle(run_dir, tmp_path_factory.mktemp("dist") / "tiny", gguf="q8_0", onnx="")


def test_ask_onnx_bundle(run_dir, tmp_path):
    """The ONNX path: an int8 bundle answers through onnxruntime, torch-free."""
    b = _bundle(run_dir, tmp_path / "onnx", gguf="", onnx="int8")
    spec = json.loads((b / BUNDLE_FILE).read_text())
    assert spec["variant"]["name"] == "onnx-int8" and (b / "model" / "model.onnx").is_file()
    line, n = _manual_fact(b)
    proc = device("ask", "--threads", "1", "--max-new-tokens", "8", b, f"What does fault code {line.split()[2]} mean?")
    assert proc.returncode == 0, proc.stderr
    assert f"[source: manual.txt:{n} (" in proc.stdout


def _manual_fact(bundle: Path) -> tuple[str, int]:
    """A fault-code line of the bundled manual and its line number."""
    for i, line in enumerate((bundle / "manual.txt").read_text().splitlines(), start=1):
        if line.startswith("Fault code "):
            return line, i
    raise AssertionError("no fault code in the manual")


def test_ask_answers_with_a_cited_passage_torch_free(bundle):
    line, n = _manual_fact(bundle)
    code, model = line.split()[2], line.split()[4]
    # one thread: llama.cpp's spinning thread pool crawls on an oversubscribed CI machine
    proc = device("ask", "--threads", "1", bundle, f"What does fault code {code} mean on the {model}?")
    assert proc.returncode == 0, proc.stderr
    assert f"[source: manual.txt:{n} (" in proc.stdout and line in proc.stdout
    off = device("ask", "--retrieval", "off", "--threads", "1", "--max-new-tokens", "8", bundle,
                 "What does it mean?")
    assert off.returncode == 0 and "[source:" not in off.stdout and off.stdout.strip()


def test_retrieved_passage_goes_into_the_prompt(bundle):
    from edgeft.device.ask import Asker
    from edgeft.device.bundle import open_bundle

    b = open_bundle(bundle)
    line, _ = _manual_fact(bundle)
    q = f"What does fault code {line.split()[2]} mean?"
    seen = []
    for mode in ("prompt", "cite"):
        asker = Asker(b, retrieval=mode, max_new_tokens=4, threads=1)
        real = asker.rt.generate
        asker.rt.generate = lambda ids, n, real=real: seen.append(ids) or real(ids, n)
        ans = asker.ask(q)
        asker.close()
        assert ans.hit is not None and ans.hit.passage.text == line and ans.tokens <= 4
    text_prompt, text_cite = (asker.fmt.tokenizer.decode(ids) for ids in seen)
    assert line.split(".")[0] in text_prompt and line.split(".")[0] not in text_cite


def test_repl_answers_each_line_until_exit(bundle):
    from edgeft.device.ask import Asker, repl
    from edgeft.device.bundle import open_bundle

    asker = Asker(open_bundle(bundle), max_new_tokens=3, threads=1)
    out = io.StringIO()
    try:
        n = repl(asker, io.StringIO("first question?\n\nsecond question?\nexit\nnever asked?\n"), out)
    finally:
        asker.close()
    assert n == 2
    proc = device("ask", "--max-new-tokens", "3", "--threads", "1", bundle, stdin="one?\ntwo?\n")  # piped stdin, then EOF
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("tamper", ["flip_model_byte", "edit_bundle_json", "delete_tokenizer", "extra_model_file"])
def test_tampered_bundle_is_refused_naming_the_file(bundle, tmp_path, tamper):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    spec = json.loads((copy / BUNDLE_FILE).read_text())
    model = copy / spec["variant"]["path"]
    if tamper == "flip_model_byte":
        raw = bytearray(model.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        model.write_bytes(bytes(raw))
        name = model.name
    elif tamper == "edit_bundle_json":
        spec["runtime"]["threads"] = 64
        (copy / BUNDLE_FILE).write_text(json.dumps(spec))
        name = BUNDLE_FILE
    elif tamper == "delete_tokenizer":
        (copy / "model" / "tokenizer.json").unlink()
        name = "tokenizer.json"
    else:
        (copy / "model" / "evil.gguf").write_bytes(b"GGUF")
        name = "evil.gguf"
    for cmd in (["ask", copy, "question?"], ["doctor", copy, "--seconds", "0.1"]):
        proc = device(*cmd)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in proc.stderr, proc.stderr
        assert "answer" not in proc.stdout.lower()


def test_grounded_answers_need_a_model_tuned_with_retrieval(bundle):
    """This bundle's data had no retrieval settings: `ask` cites (the default) and refuses --retrieval grounded."""
    assert json.loads((bundle / BUNDLE_FILE).read_text())["retrieval"] is None
    proc = device("ask", "--retrieval", "grounded", bundle, "What does fault code E964 mean?")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "not tuned for retrieval" in lines[0], proc.stderr
    assert not proc.stdout


def test_not_a_bundle(tmp_path, bundle):
    proc = device("ask", tmp_path, "q?")
    assert proc.returncode == 2 and "not a bundle" in proc.stderr
    proc = device("ask", bundle.parent.parent, "q?")  # some dir without a manifest
    assert proc.returncode == 2


def test_doctor_without_and_with_a_bundle(bundle):
    bare = device("doctor")
    assert bare.returncode == 0, bare.stderr
    for needle in ("llama-cpp-python", "onnxruntime: device", "GPU offload", "memory:", "no bundle given"):
        assert needle in bare.stdout, needle
    full = device("doctor", "--seconds", "0.5", "--threads", "1", bundle)
    assert full.returncode == 0, full.stderr
    files = len(json.loads((bundle / MANIFEST_NAME).read_text())["files"])
    assert f"{files} files verified" in full.stdout and "smoke bench:" in full.stdout
    assert "predicted on tiny from bandwidth" in full.stdout
