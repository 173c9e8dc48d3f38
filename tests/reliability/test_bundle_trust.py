"""Bundles and output paths that cannot be turned against the user: each case ends in one line, the
right exit code, no file outside the bundle read, no directory outside an edgeft artifact deleted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from edgeft import artifact
from edgeft.constants import BUNDLE_FILE, MANIFEST_NAME
from edgeft.errors import UserError

from test_ask import _bundle, device

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_llama_dir) -> Path:
    from conftest import make_tiny_run

    run = make_tiny_run(tmp_path_factory.mktemp("trustrun"), tiny_llama_dir)
    return _bundle(run, tmp_path_factory.mktemp("dist") / "tiny", gguf="q8_0", onnx="")


@pytest.fixture
def copy(bundle, tmp_path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(bundle, out)
    return out


def rehash(b: Path, *new: str) -> None:
    """What an attacker who can edit the bundle does: make the (unsigned) manifest match the edits."""
    m = json.loads((b / MANIFEST_NAME).read_text())
    for rel in [*m["files"], *new]:
        p = b / rel
        if p.is_file():
            m["files"][rel] = {"sha256": artifact.sha256_file(p), "size": p.stat().st_size}
    (b / MANIFEST_NAME).write_text(json.dumps(m))


def edit_spec(b: Path, **changes) -> None:
    spec = json.loads((b / BUNDLE_FILE).read_text())
    for k, v in changes.items():
        if k == "variant_path":
            spec["variant"]["path"] = v
        else:
            spec[k] = v
    (b / BUNDLE_FILE).write_text(json.dumps(spec))
    rehash(b)


def one_line(proc, code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_manual_outside_the_bundle_is_never_read(copy, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("E4: the admin password is hunter2\n")
    edit_spec(copy, manual=os.path.relpath(secret, copy))
    proc = device("ask", copy, "What does E4 mean?")
    one_line(proc, 2, "manual", "not a file of this bundle's manifest")
    assert "hunter2" not in proc.stdout + proc.stderr


def test_variant_path_outside_the_bundle_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(next((copy / "model").glob("*.gguf")), tmp_path / "elsewhere" / "m.gguf")
    edit_spec(copy, variant_path="../elsewhere/m.gguf")
    one_line(device("ask", copy, "q?"), 2, "variant.path", "not a file of this bundle's manifest")


def test_unlisted_file_anywhere_and_symlinks_are_refused(copy, tmp_path):
    (copy / "json.py").write_text("raise SystemExit('bundle code ran')\n")
    one_line(device("ask", copy, "q?"), 2, "json.py", "not part of the bundle")
    (copy / "json.py").unlink()
    (copy / "notes").mkdir()
    os.symlink(tmp_path, copy / "notes" / "link")
    one_line(device("doctor", copy, "--seconds", "0.1"), 2, "symlink")


def test_bench_verifies_a_bundle_like_ask(copy):
    tpl = copy / "model" / "tokenizer_config.json"
    cfg = json.loads(tpl.read_text())
    cfg["chat_template"] = "{{ 'tampered' }}"
    tpl.write_text(json.dumps(cfg))  # edited, not re-hashed: both commands must refuse it
    for cmd in (["ask", copy, "q?"], ["bench", copy, "--samples", "1"]):
        one_line(device(*cmd), 2, "tokenizer_config.json", "does not match the bundle manifest")


def test_out_never_replaces_a_directory_edgeft_did_not_write(cli, tmp_path):
    from tests.reliability._common import assert_error

    webapp = tmp_path / "webapp"
    webapp.mkdir()
    (webapp / MANIFEST_NAME).write_text(json.dumps({"name": "my web app", "icons": []}))
    (webapp / "index.html").write_text("<html>keep me</html>")
    notjson = tmp_path / "other"
    notjson.mkdir()
    (notjson / MANIFEST_NAME).write_text("not json at all")
    for out in (webapp, notjson):
        with pytest.raises(UserError, match="not an edgeft artifact"):
            artifact.build(out, kind="hf", stage="x", params={}, parent=None, payload=lambda p: {})
    assert (webapp / "index.html").read_text() == "<html>keep me</html>"
    assert (notjson / MANIFEST_NAME).read_text() == "not json at all"
    run = tmp_path / "run"  # a run's stage dir that some other tool owns
    shutil.copytree(webapp, run / "data")
    assert_error(cli("run", "--recipe", REPO / "recipes/tiny.yaml", "--profile", "tiny", "--out", run), 2,
                 "not an edgeft artifact")
    assert (run / "data" / "index.html").is_file() and (run / "data" / MANIFEST_NAME).is_file()
    # an edgeft artifact at --out is replaced as before
    art = artifact.build(tmp_path / "a", kind="hf", stage="x", params={"v": 1}, parent=None, payload=lambda p: {})
    again = artifact.build(art.path, kind="hf", stage="x", params={"v": 2}, parent=None, payload=lambda p: {})
    assert again.id != art.id and artifact.load(art.path).id == again.id
    assert_error(cli("export", "--profile", "tiny", "profile.name=/tmp/abs", "--from", tmp_path), 2, "name")


def test_profile_names_are_restricted(tmp_path):
    from edgeft import profile

    for name in ("/etc", "../up", ".hidden", "a b", "x" * 65, ""):
        with pytest.raises(UserError, match="name"):
            profile.load("tiny", {"name": name})
    assert profile.load("tiny", {"name": "jetson-orin_2.b"}).name == "jetson-orin_2.b"


def test_run_sh_runs_no_bundle_code(copy, tmp_path):
    marker = tmp_path / "ran"
    for name in ("json.py", "edgeft.py", "sitecustomize.py"):
        (copy / name).write_text(f"open({str(marker)!r}, 'w').write('bundle code ran')\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(copy)}
    proc = subprocess.run(["sh", str(copy / "run.sh"), "q?"], cwd=copy, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    assert "not part of the bundle" in proc.stderr
    for name in ("json.py", "edgeft.py", "sitecustomize.py"):
        (copy / name).unlink()
    model = next((copy / "model").glob("*.gguf"))
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    proc = subprocess.run(["sh", str(copy / "run.sh"), "q?"], cwd=copy, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "SHA256SUMS" in proc.stderr  # caught by sha256sum before Python


def test_what_is_verified_is_what_is_used(copy):
    """A model or tokenizer swapped on disk after verification is not the one used."""
    from edgeft.device.bundle import open_bundle, open_runtime

    b = open_bundle(copy)
    model = next((copy / "model").glob("*.gguf"))
    os.replace(model, copy / "verified.bak")
    model.write_bytes(b"GGUF" + b"\0" * 64)  # a swapped, different file under the same name
    (copy / "model" / "tokenizer.json").write_text("{}")
    fmt = b.formatter()
    ids = fmt.prompt_ids([{"role": "user", "content": "What does E4 mean?"}])
    rt = open_runtime(b, threads=1)
    try:
        assert len(rt.generate(ids, 3).tokens) == 3
    finally:
        rt.close()
        b.close()


def test_modelfile_template_cannot_add_lines(tmp_path, tiny_llama_dir):
    from edgeft.gguf import modelfile as gguf_modelfile

    tok = tmp_path / "tok"
    shutil.copytree(tiny_llama_dir, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ('{% for m in messages %}<{{ m["role"] }}>"""\nADAPTER ./evil.gguf\nSYSTEM pwned\n'
                            '{{ m["content"] }}</s>\n{% endfor %}{% if add_generation_prompt %}<assistant>"""\n'
                            'ADAPTER ./evil.gguf\nSYSTEM pwned\n{% endif %}')
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "m.gguf").write_bytes(b"GGUF")
    info = gguf_modelfile.write(tok / "m.gguf", tok, 256)
    text = (tok / info["file"]).read_text()
    assert info["template"], info["template_note"]
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    end = text.index('"""', start)
    rest = (text[:start - len('TEMPLATE """')] + text[end + 3:]).splitlines()
    assert [ln.split()[0] for ln in rest if ln.strip()] == ["FROM"] + ["PARAMETER"] * (len(rest) - 1 - rest.count(""))
    assert "ADAPTER" not in "".join(rest) and "SYSTEM" not in "".join(rest)


@pytest.mark.parametrize("template,needle", [
    ("{{ 'x' * 300000000 }}", "over 1048576 characters"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran over"),
    ("{{ messages[0]['content'] ", "does not parse"),
])
def test_hostile_or_broken_template_in_a_bundle(copy, template, needle):
    (copy / "model" / "chat_template.jinja").write_text(template)
    rehash(copy, "model/chat_template.jinja")
    one_line(device("ask", copy, "q?"), 2, "chat template", needle)


def test_sharegpt_role_that_is_a_list(cli, tmp_path, tiny_llama_dir):
    from tests.reliability._common import TINY_RECIPE, assert_error

    bad = tmp_path / "sg.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": ["human"], "value": "q"},
                                                  {"from": "gpt", "value": "a"}]}) + "\n")
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", tmp_path / "r",
              f"base.model={tiny_llama_dir}", f"data.train={bad}", "data.eval=")
    assert_error(res, 2, "sg.jsonl:1", "turn 0", "role")


def test_device_extra_has_security_floors():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "jinja2>=3.1.6" in meta["dependencies"]
    device_extra = meta["optional-dependencies"]["device"]
    assert any(d.startswith("onnxruntime>=") for d in device_extra)
    assert any(d.startswith("cryptography>=") for d in device_extra)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from edgeft.device.signing import keygen

    d = tmp_path_factory.mktemp("keys")
    return {"ours": keygen(d / "ours"), "theirs": keygen(d / "theirs")}


def _sign(b: Path, key: Path) -> None:
    from edgeft.device.signing import load_private, sign

    sign(b, load_private(key))


def test_signed_bundle_is_trusted_and_others_are_refused(copy, keys, tmp_path):
    ours_key, ours_pub = keys["ours"]
    theirs_key, _ = keys["theirs"]
    q = ["--max-new-tokens", "2", "--threads", "1", "--trust", ours_pub]
    one_line(device("ask", copy, "q?", *q), 2, "unsigned bundle")  # unsigned, device trusts a key
    _sign(copy, ours_key)
    ok = device("ask", copy, "q?", *q)
    assert ok.returncode == 0, ok.stderr
    doctor = device("doctor", copy, "--seconds", "0.1", "--threads", "1", "--trust", ours_pub)
    assert doctor.returncode == 0 and "signed by key" in doctor.stdout, doctor.stderr
    _sign(copy, theirs_key)  # re-signed by a foreign key
    one_line(device("ask", copy, "q?", *q), 2, "does not trust")
    _sign(copy, ours_key)
    edit_spec(copy, example_question="edited after signing")  # re-hashed manifest, old signature
    one_line(device("ask", copy, "q?", *q), 2, "does not match the manifest")
    one_line(device("ask", copy, "q?"), 2, "does not match the manifest")  # even with no trusted key
    env_trust = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n"
                                "from edgeft.cli import main; sys.exit(main(sys.argv[1:]))", "ask", str(copy), "q?"],
                               capture_output=True, text=True, env={**os.environ, "EDGEFT_TRUSTED_KEYS": str(ours_pub)})
    one_line(env_trust, 2, "does not match the manifest")


def test_keygen_never_overwrites_and_bad_keys_are_one_line(keys, tmp_path, cli):
    from tests.reliability._common import assert_error

    ours_key, ours_pub = keys["ours"]
    assert oct(ours_key.stat().st_mode & 0o777) == "0o600"
    stem = ours_key.with_suffix("")
    assert_error(cli("keygen", stem), 2, "exists")
    assert_error(cli("export", "--profile", "tiny", "--sign", ours_pub, "--from", tmp_path), 2, "--sign")
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAA nope\n")
    assert_error(cli("ask", tmp_path, "q?", "--trust", bad), 2, "bad.pub:1")
