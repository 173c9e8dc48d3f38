"""Grounded `edgeft ask` on a bundle tuned with retrieval, and `edgeft revise-manual`.

The bundle is the tiny random-weight model exported from a data artifact with data.retrieval_k set. Its
answers are noise, so what the model says is scripted through a fake runtime that records its calls;
everything else (bundle, verification, retrieval, prompt, judge, rendering) is the shipped code.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_tiny_run

from edgeft import artifact, profile
from edgeft.cli import main
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_SUMS,
    MANIFEST_NAME,
    RETRIEVAL_FILE,
    SIGNATURE_FILE,
)
from edgeft.errors import UserError
from edgeft.runtime import grounding as G

TORCH_FREE = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
              "from edgeft.cli import main; sys.exit(main(sys.argv[1:]))")
K = 2  # passages per grounded prompt the tiny model is "tuned" with


@pytest.fixture(scope="module")
def grounded_run(tmp_path_factory, tiny_llama_dir) -> Path:
    """A run dir: grounded data (data.retrieval_k=K) and the tiny Llama as its tuned model."""
    return make_tiny_run(tmp_path_factory.mktemp("grounded-run"), tiny_llama_dir, retrieval_k=K, manual_heldout=0)


def _tiny_profile(context_length: str):
    return profile.load("tiny", {"gguf": "q8_0", "onnx": "", "bench_samples": "2", "accuracy_budget": "0",
                                 "threads": "1", "context_length": context_length})


@pytest.fixture(scope="module")
def tuned_bundle(tmp_path_factory, grounded_run) -> Path:
    """dist/tiny (gguf q8_0) of the tiny Llama exported from grounded data."""
    from edgeft.stages.bundle import Config
    from edgeft.stages.bundle import run as export

    # the model's whole 512 positions: in the 384-piece tiny vocabulary one passage's grounded prompt is ~260 tokens
    return export(grounded_run, Config(profile=_tiny_profile("512"), max_new_tokens=8),
                  tmp_path_factory.mktemp("dist") / "tiny").path


def test_preflight_refuses_a_context_the_grounded_prompts_do_not_fit(grounded_run, tmp_path):
    from edgeft.stages.bundle import Config
    from edgeft.stages.bundle import run as export

    with pytest.raises(UserError, match=r"grounded prompts reach \d+ tokens .* profile tiny serves 256: raise "
                                        r"profile.context_length to >= \d+"):
        export(grounded_run, Config(profile=_tiny_profile("256"), max_new_tokens=8), tmp_path / "dist")
    assert not (tmp_path / "dist").exists()  # refused before anything is built


@pytest.fixture
def bundle(tuned_bundle, tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(tuned_bundle, out)
    return out


def closed_book(b: Path) -> Path:
    """`b` as a bundle of a model tuned without retrieval: no retrieval.json, bundle.json "retrieval": null."""
    rewrite(b, {"retrieval": None}, drop=[RETRIEVAL_FILE])
    return b


def rewrite(b: Path, changes: dict, drop: tuple | list = (), write: dict | None = None) -> None:
    """Edit bundle.json (and files) and re-hash the unsigned manifest to match."""
    spec = json.loads((b / BUNDLE_FILE).read_text())
    (b / BUNDLE_FILE).write_text(json.dumps({**spec, **changes}))
    for rel in drop:
        (b / rel).unlink()
    for rel, text in (write or {}).items():
        (b / rel).write_text(text)
    m = json.loads((b / MANIFEST_NAME).read_text())
    m["files"] = {rel: {"sha256": artifact.sha256_file(b / rel), "size": (b / rel).stat().st_size}
                  for rel in [*m["files"], *(write or {})] if (b / rel).is_file()}
    (b / MANIFEST_NAME).write_text(json.dumps(m))


class Recorder:
    """A runtime that answers `reply` (through the patched decode) and records every generate call."""

    def __init__(self):
        self.calls = []

    def generate(self, ids, n):
        self.calls.append((list(ids), n))
        return SimpleNamespace(tokens=[5] * min(n, 3))

    def close(self):
        pass


def asker_with(b: Path, reply: str, monkeypatch, **kw):
    from edgeft.device.ask import Asker
    from edgeft.device.bundle import open_bundle

    asker = Asker(open_bundle(b), threads=1, **kw)
    asker.rt.close()
    asker.rt = Recorder()
    monkeypatch.setattr(asker.fmt, "decode", lambda tokens: reply)
    return asker


def fact(b: Path, code: str | None = None) -> tuple[str, str, int, str]:
    """(fault code, model, line number, line) of a fault-code line of the bundled manual, read from the file."""
    lines = (b / "manual.txt").read_text().splitlines()
    for i, line in enumerate(lines, 1):
        if line.startswith("Fault code ") and (code is None or line.split()[2] == code):
            return line.split()[2], line.split()[5], i, line  # "Fault code E964 on the VX-200 means ..."
    raise AssertionError("no such fault code line")


def unknown_code(b: Path) -> str:
    text = (b / "manual.txt").read_text()
    return next(c for c in (f"E{n}" for n in range(100, 1000)) if c not in text)


def files_of(b: Path) -> dict:
    return {p.relative_to(b).as_posix(): p.read_bytes() for p in sorted(b.rglob("*")) if p.is_file()}


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


# --- the bundle records what the model was tuned with -------------------------------------------------

def test_grounded_is_the_default_for_a_model_tuned_with_retrieval(bundle, monkeypatch):
    from edgeft.device.bundle import open_bundle

    spec = json.loads((bundle / BUNDLE_FILE).read_text())
    assert spec["retrieval"] == json.loads((bundle / RETRIEVAL_FILE).read_text()) and spec["retrieval"]["k"] == K
    # the README's example is the question alone, not the grounded prompt the eval record holds
    assert spec["example_question"].endswith("?") and "Manual passages" not in spec["example_question"]
    assert open_bundle(bundle).grounding_spec() == G.Spec(k=K)
    assert asker_with(bundle, "x", monkeypatch).retrieval == "grounded"
    assert asker_with(closed_book(bundle), "x", monkeypatch).retrieval == "cite"


@pytest.mark.parametrize("edit", ["file_differs", "file_missing", "file_unannounced"])
def test_bundle_json_and_retrieval_json_must_agree(bundle, edit, capsys):
    if edit == "file_differs":
        rewrite(bundle, {}, write={RETRIEVAL_FILE: json.dumps({**G.Spec(k=K).to_dict(), "k": K + 1})})
    elif edit == "file_missing":
        rewrite(bundle, {}, drop=[RETRIEVAL_FILE])
    else:
        rewrite(bundle, {"retrieval": None})
    one_line_error(capsys, main(["ask", str(bundle), "q?"]), RETRIEVAL_FILE)


# --- grounded answers ----------------------------------------------------------------------------------

def test_unknown_identifier_abstains_without_running_the_model(bundle, monkeypatch):
    code, model, _, _ = fact(bundle)
    missing = unknown_code(bundle)
    asker = asker_with(bundle, "never asked [1]", monkeypatch)
    ans = asker.ask(f"What does fault code {missing} mean on the {model}?")
    assert asker.rt.calls == [] and ans.status == G.NOT_IN_MANUAL and ans.tokens == 0
    assert ans.render() == f"The manual does not cover this (no passage mentions {missing})."
    asker.ask(f"What does fault code {code} mean on the {model}?")
    assert len(asker.rt.calls) == 1  # a code the manual holds goes to the model
    # with the pre-check off (measuring the model's own abstention) the unknown code reaches the model
    ans = asker.ask(f"What does fault code {missing} mean on the {model}?", precheck=False)
    assert len(asker.rt.calls) == 2 and ans.status != G.NOT_IN_MANUAL


def test_unknown_identifier_torch_free_cli(bundle):
    _, model, _, _ = fact(bundle)
    missing = unknown_code(bundle)
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, "ask", "--threads", "1", str(bundle),
                           f"What does fault code {missing} mean on the {model}?"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"The manual does not cover this (no passage mentions {missing})."


def test_the_prompt_holds_the_numbered_passages_and_the_question(bundle, monkeypatch):
    code, model, _, line = fact(bundle)
    asker = asker_with(bundle, "x", monkeypatch)
    q = f"What does fault code {code} mean on the {model}?"
    ans = asker.ask(q)
    (ids, n), = asker.rt.calls
    text = asker.fmt.tokenizer.decode(ids)
    assert "Manual passages:" in text and f"Question: {q}" in text and line.split(".")[0] in text
    assert len(ans.hits) >= 1 and ans.hits[0].passage.text == line and f"[{len(ans.hits)}]" in text
    assert n == asker.max_new_tokens == 8


def test_judged_answers_are_rendered_by_status(bundle, monkeypatch):
    code, model, n, line = fact(bundle)
    q = f"What does fault code {code} mean on the {model}?"
    lines = (bundle / "manual.txt").read_text().splitlines()
    first = max(i for i in range(n) if i == 0 or not lines[i - 1].strip())  # the section's first line: its heading
    heading = lines[first]
    meaning = line.split(" means ")[1].split(".")[0]  # e.g. "low oil pressure"
    answered = asker_with(bundle, f"It means {meaning}. [1]", monkeypatch).ask(q)
    assert answered.status == G.ANSWERED and answered.hit.passage.line == n
    assert answered.render() == f"It means {meaning}.\n  [source: manual.txt:{n} ({heading}): \"{line}\"]"

    abstained = asker_with(bundle, "The manual does not cover this.", monkeypatch).ask(q)
    assert abstained.status == G.ABSTAINED and abstained.render() == G.ABSTAIN

    uncited = asker_with(bundle, f"It means {meaning}.", monkeypatch).ask(q)
    assert uncited.status == G.UNVERIFIED and uncited.hit is None
    unverified = "  [could not verify this answer against the manual: it cites none of the passages it was given]"
    assert uncited.render().splitlines() == [f"It means {meaning}.", unverified]
    wrong = asker_with(bundle, "Replace the flux capacitor 88 [1]", monkeypatch).ask(q)
    assert wrong.status == G.UNVERIFIED and "could not verify this answer against the manual" in wrong.render()
    assert "88" in wrong.render().splitlines()[1] and f"manual.txt:{n}" in wrong.render()


def test_passages_are_dropped_to_fit_the_context_never_the_question(bundle, monkeypatch):
    code, model, _, _ = fact(bundle)
    q = f"What does fault code {code} mean on the {model}?"
    asker = asker_with(bundle, "x", monkeypatch)
    hits = asker.grounder.retrieve(q)
    assert len(hits) == K
    one = len(asker.fmt.prompt_ids(asker.grounder.messages(q, hits[:1])))
    asker.n_ctx = one + asker.max_new_tokens  # room for one passage and a whole answer, not for two
    ans = asker.ask(q)
    assert [len(ids) for ids, _ in asker.rt.calls] == [one] and len(ans.hits) == 1
    asker.n_ctx = one + 1  # one passage, a one-token answer
    asker.ask(q)
    assert asker.rt.calls[-1] == (asker.rt.calls[0][0], 1)
    asker.n_ctx = one
    with pytest.raises(UserError, match="shorter question"):
        asker.ask(q)


def test_a_mode_the_model_was_not_tuned_for(bundle, capsys):
    code, model, _, _ = fact(bundle)
    q = f"What does fault code {code} mean on the {model}?"
    assert main(["ask", "--retrieval", "cite", "--threads", "1", "--max-new-tokens", "2", str(bundle), q]) == 0
    out = capsys.readouterr()
    assert "[source: manual.txt:" in out.out
    warning = [ln for ln in out.err.splitlines() if "warning" in ln]
    assert len(warning) == 1 and "tuned for grounded prompts" in warning[0] and "--retrieval cite" in warning[0]
    closed_book(bundle)
    one_line_error(capsys, main(["ask", "--retrieval", "grounded", str(bundle), q]), "not tuned for retrieval")


# --- edgeft revise-manual ------------------------------------------------------------------------------

def revised_manual(b: Path, tmp_path: Path) -> tuple[Path, str, str]:
    """The bundled manual with one fault code's meaning changed: (file, code, new line)."""
    code, _, n, line = fact(b)
    new_line = line.replace(line.split(" means ")[1].split(".")[0], "worn coupling insert")
    lines = (b / "manual.txt").read_text().splitlines()
    lines[n - 1] = new_line
    out = tmp_path / "manual-rev2.txt"
    out.write_text("\n".join(lines) + "\n")
    return out, code, new_line


def assert_consistent(b: Path) -> dict:
    """The bundle verifies as ask does, and SHA256SUMS (what run.sh checks) matches every file it lists."""
    from edgeft.device.bundle import open_bundle

    artifact.load(b, kind="bundle")
    open_bundle(b).close()
    for row in (b / BUNDLE_SUMS).read_text().splitlines():
        digest, rel = row.split("  ", 1)
        assert artifact.sha256_file(b / rel) == digest, rel
    assert not [p for p in b.parent.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written beside it
    return json.loads((b / BUNDLE_FILE).read_text())


def test_revised_manual_is_what_ask_answers_from(bundle, tmp_path, monkeypatch, capsys):
    new, code, new_line = revised_manual(bundle, tmp_path)
    _, model, _, old_line = fact(bundle, code)
    old_sha = hashlib.sha256((bundle / "manual.txt").read_bytes()).hexdigest()
    old_id = json.loads((bundle / MANIFEST_NAME).read_text())["id"]
    assert main(["revise-manual", str(bundle), str(new)]) == 0
    assert "answers from manual-rev2.txt" in capsys.readouterr().out
    spec = assert_consistent(bundle)
    assert (bundle / "manual.txt").read_bytes() == new.read_bytes()
    rev, = spec["manual_revisions"]
    assert rev["previous_sha256"] == old_sha and rev["sha256"] == hashlib.sha256(new.read_bytes()).hexdigest()
    assert rev["signed_by"] is None and rev["date"].endswith("Z")
    assert json.loads((bundle / MANIFEST_NAME).read_text())["id"] != old_id
    asker = asker_with(bundle, "It means worn coupling insert. [1]", monkeypatch)
    ans = asker.ask(f"What does fault code {code} mean on the {model}?")
    assert ans.hits[0].passage.text == new_line != old_line and ans.status == G.ANSWERED
    assert new_line in ans.render() and old_line not in ans.render()
    assert main(["doctor", str(bundle), "--seconds", "0.1", "--threads", "1"]) == 0
    doctor = capsys.readouterr().out
    assert f"revised 1x (last {rev['date']}" in doctor and f"grounded in {K} retrieved passages" in doctor
    assert main(["revise-manual", str(bundle), str(new)]) == 0  # the same text again: nothing to do
    assert "nothing changed" in capsys.readouterr().out
    assert len(json.loads((bundle / BUNDLE_FILE).read_text())["manual_revisions"]) == 1


@pytest.fixture
def keys(tmp_path):
    from edgeft.device.signing import keygen

    return keygen(tmp_path / "keys" / "ours")


def test_signed_bundle_is_re_signed_or_refused_untouched(bundle, tmp_path, keys, capsys):
    from edgeft.device.bundle import open_bundle
    from edgeft.device.signing import load_private, private_key_id, sign, trusted_keys

    priv, pub = keys
    sign(bundle, load_private(priv))
    new, _, _ = revised_manual(bundle, tmp_path)
    before = files_of(bundle)
    one_line_error(capsys, main(["revise-manual", str(bundle), str(new)]), "signed", "--sign")
    assert files_of(bundle) == before  # no half-revision, no stale signature
    assert main(["revise-manual", str(bundle), str(new), "--sign", str(priv), "--trust", str(pub)]) == 0
    assert f"re-signed by key {private_key_id(load_private(priv))}" in capsys.readouterr().out
    b = open_bundle(bundle, trusted=trusted_keys([pub]))
    assert b.signer == private_key_id(load_private(priv)) and b.manual_text() == new.read_text()
    b.close()
    assert (bundle / SIGNATURE_FILE).read_bytes() != before[SIGNATURE_FILE]
    assert_consistent(bundle)


def _bad_manuals(tmp_path: Path) -> dict:
    blank, latin1, sections = tmp_path / "blank.txt", tmp_path / "latin1.txt", tmp_path / "sections.json"
    blank.write_text("\n   \n\n")
    latin1.write_bytes("Fehlercode E101: Öldruck zu niedrig\n".encode("latin-1"))
    sections.write_text(json.dumps([{"title": "VX-200"}]))  # a section without text
    return {blank: "no manual passage", latin1: "UTF-8", sections: "sections with 'text'",
            tmp_path / "absent.txt": "not found"}


def test_a_json_sections_manual_is_converted_as_the_data_stage_does(bundle, tmp_path):
    from edgeft.device.revise import revise
    from edgeft.records import manual_from_sections

    src = tmp_path / "rev3.json"
    src.write_text(json.dumps({"s1": {"title": "VX-200 - Fault codes", "text": ["Fault code E101 on the",
                                                                               "VX-200 means low oil."]}}))
    assert revise(bundle, src)
    assert (bundle / "manual.txt").read_text() == manual_from_sections(src.read_text(), "x") == \
        "VX-200 - Fault codes\nFault code E101 on the VX-200 means low oil.\n\n"
    assert_consistent(bundle)


def test_bad_new_manual_is_refused_and_the_bundle_untouched(bundle, tmp_path, capsys):
    before = files_of(bundle)
    for path, needle in _bad_manuals(tmp_path).items():
        one_line_error(capsys, main(["revise-manual", str(bundle), str(path)]), str(path.name), needle)
        assert files_of(bundle) == before, path.name
    assert not [p for p in bundle.parent.iterdir() if p.name.startswith(".tmp-")]


def test_a_bundle_that_does_not_verify_is_not_revised(bundle, tmp_path, capsys):
    new, _, _ = revised_manual(bundle, tmp_path)
    raw = bytearray((bundle / "report.md").read_bytes())
    raw[0] ^= 1
    (bundle / "report.md").write_bytes(bytes(raw))
    before = files_of(bundle)
    one_line_error(capsys, main(["revise-manual", str(bundle), str(new)]), "report.md", "sha256 mismatch")
    assert files_of(bundle) == before
