"""Training examples from data records, and the device a torch stage trains on (train, distill, prune)."""

from __future__ import annotations

import random

from edgeft.records import IGNORE_INDEX, chunk_text, encode_example
from edgeft.runtime.prompt import PromptFormatter


def encode(fmt: PromptFormatter, records: list[dict], max_length: int) -> list[tuple[list, list]]:
    """(ids, labels) per record, chat template applied; raw text is chunked; records with no answer token dropped."""
    out = []
    for rec in records:
        if "text" in rec:
            out += chunk_text(fmt, rec["text"], max_length)
        else:
            ids, labels = encode_example(fmt, rec, max_length)
            if any(x != IGNORE_INDEX for x in labels[1:]):
                out.append((ids, labels))
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
