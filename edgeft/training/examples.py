"""Training examples from data records, and the device a torch stage trains on (train, distill, prune)."""

from __future__ import annotations

import random

from edgeft.errors import UserError
from edgeft.records import IGNORE_INDEX, chunk_text, encode_example
from edgeft.runtime.prompt import PromptFormatter


def encode(fmt: PromptFormatter, records: list[dict], max_length: int, key: str = "max_length"
           ) -> list[tuple[list, list]]:
    """(ids, labels) per record, chat template applied; raw text is chunked; records with no answer token dropped.

    A retrieval-augmented record (one with "grounding") is never truncated: its answer and citation come
    last, so a cut would teach the model to stop before citing. One that does not fit is refused, naming
    `key` and the length that fits them all."""
    out, too_long = [], []
    for rec in records:
        if "text" in rec:
            out += chunk_text(fmt, rec["text"], max_length)
            continue
        ids, labels = encode_example(fmt, rec, max_length if "grounding" not in rec else 1 << 30)
        if len(ids) > max_length:
            too_long.append(len(ids))
            continue
        if any(x != IGNORE_INDEX for x in labels[1:]):
            out.append((ids, labels))
    if too_long:
        raise UserError(f"{key} {max_length} cuts {len(too_long)} of {len(records)} retrieval-augmented examples "
                        f"(the longest is {max(too_long)} tokens with its passages); set {key} >= {max(too_long)} "
                        "or lower data.retrieval_k / data.retrieval_words")
    return out


def calibration(fmt: PromptFormatter, records: list[dict], n: int, max_length: int,
                seed: int) -> list[tuple[list, list]]:
    """Up to `n` (ids, labels) examples, chat template applied, chosen by a seeded shuffle."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return encode(fmt, records[: n * 2], max_length)[:n]  # *2: some records may carry no answer tokens


def pick_device(choice: str):
    """The torch device for a stage's `device` key: cuda when asked or auto with CUDA visible, else cpu."""
    import torch

    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
