"""The data stage: validate and normalise train/eval records and the manual into a data artifact.

The record formats and their parsing live in edgeft.records (torch-free, shared with the bench);
this stage adds the embedded demo data, the eval split and the held-out share of the manual.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import EMBEDDED, EVAL_FILE, KIND_DATA, MANUAL_FILE, MANUAL_HELDOUT_FILE, TRAIN_FILE
from edgeft.errors import UserError
from edgeft.records import FORMATS, load_records, read_text, split_by_answer, write_jsonl


@dataclass(frozen=True)
class Config:
    train: str = opt(EMBEDDED, "JSONL (or .txt for raw text); 'embedded' = the built-in repair manual")
    eval: str = opt(EMBEDDED, "JSONL; 'embedded' with the built-in data; '' = split from train")
    format: str = opt("auto", "auto | alpaca | qa | messages | sharegpt | text; auto detects from the first record's "
                              "keys")
    manual: str = opt("", "optional manual text (.txt, or .json sections with title/text) for pretraining")
    manual_heldout: float = opt(0.05, "share of manual lines kept out of all training (perplexity), 0 = none")
    eval_fraction: float = opt(0.1, "used when eval == '': share of distinct answers held out")
    seed: int = opt(0, "split and embedded-generator seed")


def run(src, cfg: Config, out: Path) -> artifact.Artifact:
    """Validate and normalise the train/eval data into a data artifact (src is unused: data is a root)."""
    validate(cfg)

    def payload(tmp: Path) -> dict:
        if cfg.train == EMBEDDED:
            from edgeft.demo.manual import write_embedded_data

            write_embedded_data(tmp, cfg.seed)
            train = load_records(tmp / TRAIN_FILE, "qa")
            evals = load_records(tmp / EVAL_FILE, "qa")
        else:
            train = load_records(Path(cfg.train), cfg.format)
            if cfg.eval and cfg.eval != EMBEDDED:
                evals = load_records(Path(cfg.eval), cfg.format)
            else:
                train, evals = split_by_answer(train, cfg.eval_fraction, cfg.seed)
            if cfg.manual:
                _copy_manual(Path(cfg.manual), tmp / MANUAL_FILE)
        write_jsonl(tmp / TRAIN_FILE, train)
        write_jsonl(tmp / EVAL_FILE, evals)
        held = 0
        if cfg.manual_heldout > 0 and (tmp / MANUAL_FILE).is_file():
            kept, held_text = hold_out_manual((tmp / MANUAL_FILE).read_text(), train + evals,
                                              cfg.manual_heldout, cfg.seed)
            (tmp / MANUAL_FILE).write_text(kept)
            (tmp / MANUAL_HELDOUT_FILE).write_text(held_text)
            held = len(held_text.splitlines())
        return {"train_records": len(train), "eval_records": len(evals),
                "format": cfg.format if cfg.train != EMBEDDED else "qa", "manual_heldout_lines": held}

    inputs = {}
    for key in ("train", "eval", "manual"):
        p = getattr(cfg, key)
        if p and p != EMBEDDED:
            inputs[f"{key}_sha256"] = artifact.sha256_file(Path(p))
    return artifact.build(out, kind=KIND_DATA, stage="data", params=cfg, parent=None, payload=payload,
                          inputs=inputs)


def validate(cfg: Config) -> None:
    """Refuse an unknown format or a missing file before anything runs."""
    if cfg.format not in FORMATS:
        raise UserError(f"data.format: '{cfg.format}' is not one of {', '.join(FORMATS)}")
    for key in ("train", "eval", "manual"):
        p = getattr(cfg, key)
        if p and p != EMBEDDED and not Path(p).is_file():
            raise UserError(f"data.{key}: file not found: {p}; pass an existing file path")


def hold_out_manual(text: str, records: list[dict], fraction: float, seed: int) -> tuple[str, str]:
    """Move a share of the manual's lines out of it: only lines sharing no 8-word run with any QA record."""
    def grams(s: str) -> set:
        w = re.findall(r"\w+", s.lower())
        return {tuple(w[i:i + 8]) for i in range(len(w) - 7)}

    texts = [m["content"] for r in records for m in r.get("messages", ())] + [r["text"] for r in records if "text" in r]
    seen = set().union(*map(grams, texts))
    lines = text.splitlines()
    counts = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    cands = [i for i, line in enumerate(lines) if counts[line] == 1 and (g := grams(line)) and not g & seen]
    k = min(len(cands), max(1, round(fraction * sum(1 for line in lines if line.strip()))))
    held = set(random.Random(seed).sample(cands, k))
    return ("\n".join(x for i, x in enumerate(lines) if i not in held) + "\n",
            "".join(lines[i] + "\n" for i in sorted(held)))


def _copy_manual(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise UserError(f"data.manual: file not found: {src}")
    if src.suffix != ".json":
        read_text(src)
        shutil.copyfile(src, dst)
        return
    try:  # sections: {id: {"title", "text": str | [lines]}} or a list of them -> title line + body line
        sections = json.loads(read_text(src))
        sections = list(sections.values()) if isinstance(sections, dict) else sections
        out = []
        for sec in sections:
            body = sec["text"] if isinstance(sec["text"], str) else " ".join(sec["text"])
            out.append((f"{sec['title']}\n" if sec.get("title") else "") + " ".join(body.split()) + "\n\n")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise UserError(f"data.manual: {src}: expected a JSON list or mapping of sections with 'text' "
                        "(a string or a list of lines) and optional 'title'") from None
    dst.write_text("".join(out))
