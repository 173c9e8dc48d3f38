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
from edgeft.constants import (EMBEDDED, EVAL_FILE, KIND_DATA, MANUAL_FILE, MANUAL_HELDOUT_FILE, RETRIEVAL_FILE,
                              TRAIN_FILE)
from edgeft.errors import UserError
from edgeft.records import (FORMATS, load_records, manual_from_sections, read_text, split_by_answer,
                            write_jsonl)


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
    heldout_facts: float = opt(0.0, "share of facts (distinct answers) kept out of tuning with every phrasing; they "
                                    "stay in the manual and are scored as the eval split 'heldout'")
    unanswerable: float = opt(0.0, "questions the manual cannot answer, generated per split as this share of its "
                                   "questions (an identifier changed to one the manual lacks); target: abstain")
    train_phrasings: int = opt(0, "at most this many training phrasings per fact (0 = all)")
    retrieval_k: int = opt(0, "retrieval-augmented tuning: passages per prompt from the bundle's retriever "
                              "(0 = closed-book records)")
    retrieval_negatives: float = opt(0.2, "share of answerable training questions asked a second time with "
                                          "distractors only (their passage removed), target: abstain")
    retrieval_words: int = opt(80, "manual lines longer than this many words are cut into passages (0 = never)")


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
        held = 0
        if cfg.manual_heldout > 0 and (tmp / MANUAL_FILE).is_file():
            kept, held_text = hold_out_manual((tmp / MANUAL_FILE).read_text(), train + evals,
                                              cfg.manual_heldout, cfg.seed)
            (tmp / MANUAL_FILE).write_text(kept)
            (tmp / MANUAL_HELDOUT_FILE).write_text(held_text)
            held = len(held_text.splitlines())
        train, evals, grounded = _shape_for_retrieval(cfg, train, evals, tmp)
        write_jsonl(tmp / TRAIN_FILE, train)
        write_jsonl(tmp / EVAL_FILE, evals)
        return {"train_records": len(train), "eval_records": len(evals),
                "format": cfg.format if cfg.train != EMBEDDED else "qa", "manual_heldout_lines": held, **grounded}

    inputs = {}
    for key in ("train", "eval", "manual"):
        p = getattr(cfg, key)
        if p and p != EMBEDDED:
            inputs[f"{key}_sha256"] = artifact.sha256_file(Path(p))
    return artifact.build(out, kind=KIND_DATA, stage="data", params=cfg, parent=None, payload=payload,
                          inputs=inputs)


def validate(cfg: Config) -> None:
    """Refuse an unknown format, a missing file or a share out of range before anything runs."""
    if cfg.format not in FORMATS:
        raise UserError(f"data.format: '{cfg.format}' is not one of {', '.join(FORMATS)}")
    if not 0 <= cfg.heldout_facts < 1:
        raise UserError(f"data.heldout_facts: {cfg.heldout_facts} is not a share in [0, 1)")
    if not 0 <= cfg.retrieval_negatives <= 1:
        raise UserError(f"data.retrieval_negatives: {cfg.retrieval_negatives} is not a share in [0, 1]")
    if cfg.unanswerable < 0 or cfg.retrieval_k < 0 or cfg.train_phrasings < 0 or cfg.retrieval_words < 0:
        raise UserError("data.unanswerable, retrieval_k, train_phrasings and retrieval_words must be >= 0")
    if cfg.retrieval_k and cfg.manual_heldout:
        raise UserError(f"data.manual_heldout: {cfg.manual_heldout} moves manual lines out of the manual the bundle "
                        "retrieves from; with data.retrieval_k set data.manual_heldout: 0")
    if cfg.retrieval_k and cfg.train != EMBEDDED and not cfg.manual:
        raise UserError("data.retrieval_k needs the manual to retrieve from: set data.manual to its .txt or .json")
    for key in ("train", "eval", "manual"):
        p = getattr(cfg, key)
        if p and p != EMBEDDED and not Path(p).is_file():
            raise UserError(f"data.{key}: file not found: {p}; pass an existing file path")


def _shape_for_retrieval(cfg: Config, train: list[dict], evals: list[dict], tmp: Path
                         ) -> tuple[list[dict], list[dict], dict]:
    """Held-out facts, fewer phrasings, unanswerable questions and grounded prompts, as configured."""
    from edgeft.runtime import grounding
    from edgeft.training import raft

    train, evals = raft.hold_out_facts(train, evals, cfg.heldout_facts, cfg.seed)
    train = raft.limit_phrasings(train, cfg.train_phrasings)
    manual = (tmp / MANUAL_FILE).read_text() if (tmp / MANUAL_FILE).is_file() else ""
    if cfg.unanswerable:
        train = train + raft.unanswerable(train, manual, cfg.unanswerable, cfg.seed + 1)
        evals = evals + raft.unanswerable(evals, manual, cfg.unanswerable, cfg.seed + 2)
    counts = {s: sum(r.get("split") == s for r in evals) for s in (raft.SPLIT_TRAINED, raft.SPLIT_HELDOUT,
                                                                 raft.SPLIT_UNANSWERABLE)}
    info: dict = {"eval_splits": counts}
    if cfg.retrieval_k:
        spec = grounding.Spec(k=cfg.retrieval_k, max_words=cfg.retrieval_words)
        g = grounding.Grounder(manual, MANUAL_FILE, spec)
        n = len(train)
        train = raft.ground(train, g, cfg.retrieval_negatives, cfg.seed, train=True)
        negatives = sum(bool(r.get("grounding", {}).get("negative")) for r in train)
        info["ungrounded_train_dropped"] = n - (len(train) - negatives)
        info["train_negatives"] = negatives
        evals = raft.ground(evals, g, 0.0, cfg.seed, train=False)
        (tmp / RETRIEVAL_FILE).write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
        found = [r["grounding"]["oracle_retrieved"] for r in evals if r["grounding"]["oracle_retrieved"] is not None]
        info["retrieval"] = {**spec.to_dict(), "eval_recall_at_k": round(sum(found) / len(found), 4) if found else None}
    return train, evals, info


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
    dst.write_text(manual_from_sections(read_text(src), f"data.manual: {src}"))
