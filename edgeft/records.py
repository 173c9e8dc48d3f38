"""Instruction data records: formats, validation, normalisation, chat-template encoding, JSONL. Torch-free.

Accepted JSONL formats, detected from the keys of the first record or given explicitly:
  alpaca    {"instruction", "input"?, "output", "system"?}
  qa        {"question", "answer"}
  messages  {"messages": [{"role", "content"}, ...]}
  sharegpt  {"conversations": [{"from", "value"}, ...]}
  text      {"text"} lines, or a .txt file: raw manual text for domain-adaptive pretraining
Every record is normalised to {"messages": [...]} (or {"text"}), keeping extra fields such as `key`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from edgeft.errors import UserError, short

FORMATS = ("auto", "alpaca", "qa", "messages", "sharegpt", "text")
_REQUIRED = {"alpaca": ("instruction", "output"), "qa": ("question", "answer"),
             "messages": ("messages",), "sharegpt": ("conversations",), "text": ("text",)}
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
MAX_LINE_BYTES = 16 << 20  # one JSONL record; longer lines are refused, never read whole
IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)


def load_records(path: Path, fmt: str = "auto") -> list[dict]:
    """Read and normalise a JSONL (or .txt) file; a bad line is a UserError naming file:line."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.suffix == ".txt":
        return [{"text": read_text(path)}]
    records, detected = [], None if fmt == "auto" else fmt
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            where = f"{path}:{lineno}"
            if len(raw) > MAX_LINE_BYTES:
                raise UserError(f"{where}: line longer than {MAX_LINE_BYTES >> 20} MB; split the record "
                                "(long manual text belongs in data.manual as .txt)")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not valid UTF-8; re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                                "fix the line or remove it") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if detected is None:
                detected = detect_format(rec, where)
            records.append(normalise(rec, detected, where))
    if not records:
        raise UserError(f"{path}: no records; the file is empty")
    return records


def detect_format(rec: dict, where: str) -> str:
    """The format whose required keys the record has."""
    for fmt, keys in _REQUIRED.items():
        if all(k in rec for k in keys):
            return fmt
    raise UserError(f"{where}: cannot tell the format from keys {sorted(rec)}; expected one of "
                    + "; ".join(f"{f}: {'+'.join(k)}" for f, k in _REQUIRED.items())
                    + " (or set data.format)")


def normalise(rec: dict, fmt: str, where: str) -> dict:
    """One record of `fmt` to {"messages": [...]} or {"text": ...}, extra fields kept."""
    for k in _REQUIRED[fmt]:
        if k not in rec:
            raise UserError(f"{where}: missing field '{k}' for {fmt} format "
                            f"(needs {', '.join(_REQUIRED[fmt])})")
    extra = {k: v for k, v in rec.items() if k not in ("instruction", "input", "output", "question",
                                                        "answer", "messages", "conversations", "system")}
    if fmt == "text":
        return {"text": _str(rec, "text", where)}
    if fmt == "alpaca":
        prompt = _str(rec, "instruction", where)
        if rec.get("input"):
            prompt += "\n\n" + _str(rec, "input", where)
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _str(rec, "output", where)}]
        if rec.get("system"):
            msgs.insert(0, {"role": "system", "content": _str(rec, "system", where)})
        return {"messages": msgs, **extra, "answer": rec["output"]}
    if fmt == "qa":
        msgs = [{"role": "user", "content": _str(rec, "question", where)},
                {"role": "assistant", "content": _str(rec, "answer", where)}]
        return {"messages": msgs, **extra, "answer": rec["answer"]}
    turns = rec["messages"] if fmt == "messages" else rec["conversations"]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: '{'messages' if fmt == 'messages' else 'conversations'}' must be a "
                        "non-empty list of turns")
    msgs = []
    for i, t in enumerate(turns):
        rk, ck = ("role", "content") if fmt == "messages" else ("from", "value")
        if not isinstance(t, dict) or rk not in t or ck not in t:
            raise UserError(f"{where}: turn {i} needs fields '{rk}' and '{ck}'")
        role = t[rk] if fmt == "messages" else _SHAREGPT_ROLES.get(t[rk]) if isinstance(t[rk], str) else None
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise UserError(f"{where}: turn {i} has role {short(t[rk])}; use system, user or assistant"
                            + (" (sharegpt: human, gpt, system)" if fmt == "sharegpt" else ""))
        if not isinstance(t[ck], str):
            raise UserError(f"{where}: turn {i} '{ck}' must be a string")
        msgs.append({"role": role, "content": t[ck]})
    if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"{where}: no assistant turn; nothing to learn from this record")
    answer = next(m["content"] for m in reversed(msgs) if m["role"] == "assistant")
    return {"messages": msgs, **extra, "answer": answer}


def split_by_answer(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a share of distinct answers, so paraphrases of one question stay on one side."""
    answers = sorted({r.get("answer", json.dumps(r, sort_keys=True)) for r in records})
    random.Random(seed).shuffle(answers)
    held = set(answers[: max(1, int(len(answers) * fraction))])
    train = [r for r in records if r.get("answer", json.dumps(r, sort_keys=True)) not in held]
    evals = [r for r in records if r.get("answer", json.dumps(r, sort_keys=True)) in held]
    return train, evals


def encode_example(fmt, rec: dict, max_length: int) -> tuple[list[int], list[int]]:
    """Ids and labels for one record: loss on assistant turns only (all tokens for raw text).

    Assistant spans are found in characters (the conversation rendered up to each turn), then mapped to
    tokens through the tokenizer's offsets: a token that merges across a turn boundary still counts.
    """
    if "text" in rec:
        ids = fmt.encode(rec["text"])[:max_length]
        return ids, list(ids)
    msgs = rec["messages"]
    text = fmt.render(msgs)
    spans, cursor = [], 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        head, upto = fmt.render(msgs[:i], add_generation_prompt=True), fmt.render(msgs[: i + 1])
        if text.startswith(head) and text.startswith(upto) and len(upto) > len(head):
            spans.append((len(head), len(upto)))  # the turn with its end-of-turn marker (learns to stop)
        else:  # a template that rewrites earlier turns: fall back to the content itself
            start = text.find(m["content"], cursor)
            if start < 0:
                continue
            spans.append((start, start + len(m["content"])))
        cursor = spans[-1][1]
    enc = fmt.tokenizer.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    if fmt.add_bos and fmt.bos_id is not None and (not ids or ids[0] != fmt.bos_id):
        ids, offsets = [fmt.bos_id] + ids, [(0, 0)] + offsets
    labels = [t if e > s and any(s < b and e > a for a, b in spans) else IGNORE_INDEX
              for t, (s, e) in zip(ids, offsets)]
    return ids[:max_length], labels[:max_length]


def chunk_text(fmt, text: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Raw text as consecutive blocks of `max_length` tokens, every token a label."""
    ids = fmt.encode(text)
    return [(ids[i:i + max_length], ids[i:i + max_length]) for i in range(0, len(ids), max_length)
            if len(ids[i:i + max_length]) > 1]


def write_jsonl(path: Path, records: list[dict]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file this project wrote (already validated)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _str(rec: dict, key: str, where: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    return v


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not valid UTF-8; re-encode the file as UTF-8") from None




def manual_from_sections(text: str, where: str) -> str:
    """A JSON manual ({id: {"title", "text": str | [lines]}} or a list of them) as manual text: per section
    a title line, its body on one line, a blank line (retrieval cuts long bodies into passages)."""
    try:
        sections = json.loads(text)
        sections = list(sections.values()) if isinstance(sections, dict) else sections
        out = []
        for sec in sections:
            body = sec["text"] if isinstance(sec["text"], str) else " ".join(sec["text"])
            out.append((f"{sec['title']}\n" if sec.get("title") else "") + " ".join(body.split()) + "\n\n")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"{where}: expected a JSON list or mapping of sections with 'text' "
                        "(a string or a list of lines) and optional 'title'") from None
    return "".join(out)
