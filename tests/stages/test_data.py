"""Data formats, validation errors that name file:line, splits, and answer-only labels."""

import json

import pytest

from edgeft import records
from edgeft.demo.manual import generate_manual, write_embedded_data
from edgeft.errors import UserError
from edgeft.runtime.prompt import PromptFormatter
from edgeft.stages import data


def _jsonl(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("row,fmt", [
    ({"instruction": "Torque?", "input": "VX-200 fan", "output": "10 Nm"}, "alpaca"),
    ({"question": "Torque?", "answer": "10 Nm"}, "qa"),
    ({"messages": [{"role": "user", "content": "Torque?"}, {"role": "assistant", "content": "10 Nm"}]}, "messages"),
    ({"conversations": [{"from": "human", "value": "Torque?"}, {"from": "gpt", "value": "10 Nm"}]}, "sharegpt"),
])
def test_formats_detect_and_normalise(tmp_path, row, fmt):
    assert records.detect_format(row, "x") == fmt
    rec = records.load_records(_jsonl(tmp_path, [row]))[0]
    assert rec["messages"][-1] == {"role": "assistant", "content": "10 Nm"}
    assert rec["messages"][0]["role"] == "user" and rec["messages"][0]["content"].startswith("Torque?")


def test_bad_lines_name_file_line_and_field(tmp_path):
    p = _jsonl(tmp_path, [{"question": "a", "answer": "b"}, {"question": "c"}])
    with pytest.raises(UserError, match=r"d.jsonl:2: missing field 'answer'"):
        records.load_records(p)
    p = _jsonl(tmp_path, [{"question": "a", "answer": "b"}, "{not json"])
    with pytest.raises(UserError, match=r"d.jsonl:2: invalid JSON"):
        records.load_records(p)
    p = tmp_path / "bin.jsonl"
    p.write_bytes(b'{"question": "a", "answer": "\xff"}\n')
    with pytest.raises(UserError, match=r"bin.jsonl:1: not valid UTF-8"):
        records.load_records(p)
    with pytest.raises(UserError, match="cannot tell the format"):
        records.load_records(_jsonl(tmp_path, [{"prompt": "a", "completion": "b"}]))
    with pytest.raises(UserError, match="no records"):
        records.load_records(_jsonl(tmp_path, []))
    with pytest.raises(UserError, match="role 'robot'"):
        records.load_records(_jsonl(tmp_path, [{"messages": [{"role": "robot", "content": "x"}]}]))


def test_split_by_answer_keeps_paraphrases_together():
    recs = [{"messages": [], "answer": f"a{i % 10}"} for i in range(50)]
    train, evals = records.split_by_answer(recs, 0.2, 0)
    assert {r["answer"] for r in train}.isdisjoint({r["answer"] for r in evals})
    assert len(train) + len(evals) == 50 and evals


def test_labels_cover_assistant_turns_only(tiny_tokenizer_dir):
    fmt = PromptFormatter(tiny_tokenizer_dir)
    rec = {"messages": [{"role": "user", "content": "What is E101?"},
                        {"role": "assistant", "content": "Low oil pressure."},
                        {"role": "user", "content": "And the remedy?"},
                        {"role": "assistant", "content": "Replace the oil filter."}]}
    ids, labels = records.encode_example(fmt, rec, 512)
    assert ids[0] == fmt.bos_id and len(ids) == len(labels)
    learned = fmt.decode([t for t, l in zip(ids, labels) if l != records.IGNORE_INDEX])
    assert "Low oil pressure." in learned and "Replace the oil filter." in learned
    assert "E101" not in learned and "remedy" not in learned
    assert fmt.eos_id in [t for t, l in zip(ids, labels) if l != records.IGNORE_INDEX]  # learns to stop


def test_prompt_ids_match_transformers_chat_template(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    fmt = PromptFormatter(tiny_tokenizer_dir)
    msgs = [{"role": "user", "content": "Torque for the VX-350 fan hub screws?\nThanks"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert fmt.render(msgs, add_generation_prompt=True) == text
    assert fmt.prompt_ids(msgs) == tok(text).input_ids


def test_embedded_manual_is_deterministic_and_large(tmp_path):
    m = generate_manual(0)
    assert len(m.facts) >= 300
    assert {f.kind for f in m.facts} == {"fault", "torque", "interval", "part", "troubleshooting"}
    assert all(f.key in f.answer and f.key in f.prose for f in m.facts)
    for f in m.facts:  # eval asks trained facts in phrasings unseen for that fact
        assert not set(f.eval_questions) & set(f.train_questions) and len(f.eval_questions) == 2
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    write_embedded_data(a, 0), write_embedded_data(b, 0)
    for name in ("train.jsonl", "eval.jsonl", "manual.txt"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_data_stage_builds_artifact(tmp_path, tiny_qa_jsonl):
    art = data.run(None, data.Config(train=str(tiny_qa_jsonl), eval="", eval_fraction=0.25), tmp_path / "d")
    assert art.kind == "data" and art.metrics["eval_records"] > 0
    assert art.manifest["inputs"]["train_sha256"]


def test_sharegpt_multi_turn_learns_every_assistant_turn_and_nothing_else(tmp_path, tiny_tokenizer_dir):
    row = {"conversations": [{"from": "system", "value": "Be brief."},
                             {"from": "human", "value": "What is E101?"}, {"from": "gpt", "value": "Low oil pressure."},
                             {"from": "human", "value": "And the remedy?"},
                             {"from": "gpt", "value": "Replace the oil filter."}]}
    rec = records.load_records(_jsonl(tmp_path, [row]))[0]
    fmt = PromptFormatter(tiny_tokenizer_dir)
    ids, labels = records.encode_example(fmt, rec, 512)
    assert ids == fmt.encode(fmt.render(rec["messages"]))
    learned = [t for t, l in zip(ids, labels) if l != records.IGNORE_INDEX]
    assert [l for l in labels if l != records.IGNORE_INDEX] == learned  # labels are the ids themselves
    assert learned.count(fmt.eos_id) == 2  # both turns learn to stop
    assert fmt.decode(learned).split() == "Low oil pressure. Replace the oil filter.".split()
    prompt_text = fmt.decode([t for t, l in zip(ids, labels) if l == records.IGNORE_INDEX])
    assert "Be brief." in prompt_text and "E101" in prompt_text and "remedy" in prompt_text


def test_answer_token_merged_across_the_turn_boundary_is_learned(tmp_path, tiny_tokenizer_dir):
    """A template whose generation prompt ends in a space: SentencePiece merges it into the answer's first token."""
    import shutil

    tok = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok)
    (tok / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n"
        "{% else %}Answer: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer: {% endif %}")
    fmt = PromptFormatter(tok)
    msgs = [{"role": "user", "content": "What is E101?"}, {"role": "assistant", "content": "Replace the filter."}]
    ids, labels = records.encode_example(fmt, {"messages": msgs}, 512)
    head = fmt.encode(fmt.render(msgs[:1], add_generation_prompt=True))
    assert ids[:len(head)] != head  # the boundary token really merged
    learned = fmt.decode([t for t, l in zip(ids, labels) if l != records.IGNORE_INDEX])
    assert learned.strip() == "Replace the filter."


def test_truncation_keeps_labels_aligned(tiny_tokenizer_dir):
    fmt = PromptFormatter(tiny_tokenizer_dir)
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A long answer " * 20}]}
    ids, labels = records.encode_example(fmt, rec, 16)
    full_ids, full_labels = records.encode_example(fmt, rec, 10_000)
    assert len(ids) == len(labels) == 16 and ids == full_ids[:16] and labels == full_labels[:16]
