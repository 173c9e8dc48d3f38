"""Hostile data, recipes and profiles: each ends in one line naming the file/line/key and the fix, exit 2,
and no run directory that looks finished."""

from __future__ import annotations

import json

import pytest

from tests.reliability._common import TINY_RECIPE, assert_error, assert_nothing_finished


def _run_with_data(cli, tmp_path, base, train_file, *extra):
    out = tmp_path / "run"
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", out, f"data.train={train_file}",
              "data.eval=", f"base.model={base}", *extra)
    return res, out


GOOD = json.dumps({"question": "What is fault E4?", "answer": "A blocked drain pump."})


@pytest.mark.parametrize("name,content,needles", [
    ("malformed.jsonl", GOOD + "\n{\"question\": \"q\", \"answer\": \n", ["malformed.jsonl:2", "invalid JSON"]),
    ("empty.jsonl", "", ["empty.jsonl", "no records"]),
    ("blank.jsonl", "\n\n   \n", ["blank.jsonl", "no records"]),
    ("latin1.jsonl", GOOD.encode() + b"\n" + '{"question": "Drehmoment f\u00fcr M8?", "answer": "25 Nm"}'.encode("latin-1"),
     ["latin1.jsonl:2", "UTF-8"]),
    ("fields.jsonl", json.dumps({"prompt": "q", "completion": "a"}) + "\n", ["fields.jsonl:1", "cannot tell the format"]),
    ("missing.jsonl", GOOD + "\n" + json.dumps({"question": "only a question"}) + "\n", ["missing.jsonl:2", "answer"]),
    ("array.jsonl", GOOD + "\n[1, 2, 3]\n", ["array.jsonl:2", "JSON object"]),
    ("typed.jsonl", GOOD + "\n" + json.dumps({"question": "q", "answer": 42}) + "\n", ["typed.jsonl:2", "answer"]),
    ("badmsgs.jsonl", json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}) + "\n", ["badmsgs.jsonl:1"]),
])
def test_bad_data_file(cli, tmp_path, tiny_llama_dir, name, content, needles):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    res, out = _run_with_data(cli, tmp_path, tiny_llama_dir, path)
    assert_error(res, 2, *needles)
    assert_nothing_finished(out)


def test_huge_line_is_refused_not_swallowed(cli, tmp_path, tiny_llama_dir):
    path = tmp_path / "huge.jsonl"
    with open(path, "w") as f:
        f.write(GOOD + "\n")
        f.write(json.dumps({"question": "q", "answer": "x" * (70 << 20)}) + "\n")  # one 70 MB line
    res, out = _run_with_data(cli, tmp_path, tiny_llama_dir, path)
    assert_error(res, 2, "huge.jsonl:2", "MB")
    assert_nothing_finished(out)


def test_missing_data_file(cli, tmp_path, tiny_llama_dir):
    res, out = _run_with_data(cli, tmp_path, tiny_llama_dir, tmp_path / "nope.jsonl")
    assert_error(res, 2, "data.train", "nope.jsonl")
    assert not out.exists()


def test_data_path_is_a_directory(cli, tmp_path, tiny_llama_dir):
    res, out = _run_with_data(cli, tmp_path, tiny_llama_dir, tmp_path)
    assert_error(res, 2, "data.train")
    assert not out.exists()


def test_missing_manual_file(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    res, out = _run_with_data(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl, f"data.manual={tmp_path / 'manual.txt'}")
    assert_error(res, 2, "data.manual", "manual.txt")
    assert not out.exists()


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needles", [
    ("name: x\ntrainer:\n  lr: 1\n", ["unknown section 'trainer'", "train"]),
    ("train:\n  learning_rate: 0.1\n", ["recipe.yaml:train", "learning_rate", "valid keys", "lr"]),
    ("train:\n  lr: fast\n", ["train.lr", "fast"]),
    ("train:\n  max_steps: [1, 2]\n", ["train.max_steps"]),
    ("train:\n  method: qlora\n    lr: 1\n", ["recipe.yaml:", "invalid YAML"]),
    ("- just\n- a list\n", ["recipe.yaml", "mapping"]),
    ("train: 5\n", ["recipe.yaml:train", "mapping"]),
])
def test_bad_recipe(cli, tmp_path, text, needles):
    out = tmp_path / "run"
    res = cli("run", "--recipe", _recipe(tmp_path, text), "--profile", "tiny", "--out", out)
    assert_error(res, 2, *needles)
    assert not out.exists()


# 9 levels of 9 aliases: a 400-byte file whose value repr()s to gigabytes
BOMB = "[&a [x,x,x,x,x,x,x,x,x]" + "".join(
    f", &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"


@pytest.mark.parametrize("kind", ["recipe", "profile"])
def test_yaml_alias_bomb_ends_in_a_short_line(cli, tmp_path, kind):
    text = f"train:\n  lr: {BOMB}\n" if kind == "recipe" else f"name: p\nthreads: {BOMB}\n"
    assert len(text) < 600
    path = tmp_path / f"{kind}.yaml"
    path.write_text(text)
    args = ("--recipe", path, "--profile", "tiny") if kind == "recipe" else ("--recipe", TINY_RECIPE,
                                                                             "--profile", path)
    res = cli("run", *args, "--out", tmp_path / "run")
    assert_error(res, 2, "train.lr" if kind == "recipe" else "threads", "...")
    assert len(res[2]) < 1000, len(res[2])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["recipe", "profile"])
def test_non_utf8_file_is_bad_input_naming_the_line(cli, tmp_path, kind):
    path = tmp_path / f"{kind}.yaml"
    path.write_bytes(b"name: p\n# caf\xe9 latin-1\n")
    args = ("--recipe", path, "--profile", "tiny") if kind == "recipe" else ("--recipe", TINY_RECIPE,
                                                                             "--profile", path)
    res = cli("run", *args, "--out", tmp_path / "run")
    assert_error(res, 2, f"{kind}.yaml:2", "not UTF-8", "save the file as UTF-8")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text,needles", [
    ("name: p\nthreds: 4\n", ["profile.yaml", "threds", "threads"]),
    ("name: p\nmemory_gb: lots\n", ["memory_gb"]),
    ("name: p\nmemory_gb: 4\nmemory_budget_gb: 8\n", ["memory_budget_gb"]),
    ("name: p\nthreads: 0\n", ["threads"]),
    ("name: [unclosed\n", ["profile.yaml", "invalid YAML"]),
])
def test_bad_profile(cli, tmp_path, text, needles):
    prof = tmp_path / "profile.yaml"
    prof.write_text(text)
    out = tmp_path / "run"
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", prof, "--out", out)
    assert_error(res, 2, *needles)
    assert not out.exists()


def test_override_of_unknown_section(cli, tmp_path):
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", tmp_path / "run", "trian.lr=1")
    assert_error(res, 2, "trian")


def test_out_is_an_unrelated_directory(cli, tmp_path, tiny_llama_dir, tiny_qa_jsonl):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "data" / "notes.txt").write_text("my own file")
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", out, f"data.train={tiny_qa_jsonl}",
              "data.eval=", f"base.model={tiny_llama_dir}")
    assert_error(res, 2, "not an edgeft artifact")
    assert (out / "data" / "notes.txt").read_text() == "my own file"  # never clobbered
