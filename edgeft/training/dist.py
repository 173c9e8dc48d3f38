"""Scale-out through accelerate: the same training command runs alone or under `accelerate launch`.

Launched with several processes (DDP, or FSDP / DeepSpeed from an accelerate config file), every rank
trains on its share of each step's batches; rank 0 alone writes checkpoints and the artifact.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

_ACC = None


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when run alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def launched() -> bool:
    """Whether accelerate (or torchrun) started this process as one rank of several, or with a plugin."""
    return world()[1] > 1 or sharded() is not None


def sharded() -> str | None:
    """'FSDP' or 'DeepSpeed' when the launcher shards parameters across ranks, else None."""
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return "DeepSpeed"
    return None


def accelerator(cpu: bool | None = None):
    """The process's accelerate.Accelerator (created once, when launched), else None.

    `cpu` (default: no CUDA visible) selects gloo over CPU tensors: accelerate otherwise treats a
    torchrun-style launch on a machine without GPUs as a single process.
    """
    global _ACC
    if _ACC is None and launched():
        import torch
        from accelerate import Accelerator

        _ACC = Accelerator(cpu=not torch.cuda.is_available() if cpu is None else cpu)
    return _ACC


def is_main() -> bool:
    """Rank 0 (or a lone process): the one that writes files."""
    return world()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op when run alone)."""
    acc = accelerator()
    if acc is not None:
        acc.wait_for_everyone()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. builds a cached artifact), then the others (which find it)."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum of `values` over all ranks."""
    acc = accelerator()
    if acc is None:
        return values
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=device)
    return acc.reduce(t, reduction="sum").tolist()


def build_on_every_rank(out: Path, payload: Callable[[Path], dict], *, kind: str, stage: str, params, parent,
                        inputs: dict):
    """`artifact.build(out, ...)` for a payload every rank computes (its collectives need them all).

    Rank 0 builds and publishes; the others run `payload` into a scratch dir (it returns before writing
    anything off rank 0) unless that artifact is already finished. Every rank returns the one artifact
    rank 0 wrote. Alone, this is `artifact.build`.
    """
    from edgeft import artifact

    if is_main():
        art = artifact.build(out, kind=kind, stage=stage, params=params, parent=parent, payload=payload,
                             inputs=inputs)
    elif artifact.find_finished(Path(out), artifact.artifact_id(parent.id if parent else None, stage, params,
                                                                inputs)) is None:
        with tempfile.TemporaryDirectory() as scratch:
            payload(Path(scratch))
    barrier()
    return art if is_main() else artifact.load(out, kind=kind, verify=False)
