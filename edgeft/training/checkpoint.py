"""Training checkpoints that make a killed run resumable to the very same weights.

A checkpoint holds the trainable tensors (safetensors), the optimizer and scheduler state and every
RNG state (torch.save, read back with weights_only=True: no pickled code), and the loop state as JSON:
step, remaining batch order, loss curves, best eval. It is written to a `.part` dir and renamed, so a
kill mid-write leaves the previous checkpoint intact. The checkpoint root sits beside the artifact
(`<out>.ckpt`), keyed by the artifact id: a run with other params never resumes from it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from edgeft.constants import CKPT_SUFFIX
from edgeft.training import dist

ID_FILE = "artifact_id"


def root_for(out: Path) -> Path:
    """The stable checkpoint dir of the artifact at `out` (beside it, outside the staging dir)."""
    return out.parent / f"{out.name}{CKPT_SUFFIX}"


def prepare(root: Path, artifact_id: str) -> None:
    """Create `root` for `artifact_id`; checkpoints of another id (other params or data) are removed."""
    if dist.is_main():
        idf = root / ID_FILE
        if root.exists() and (not idf.is_file() or idf.read_text().strip() != artifact_id):
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        idf.write_text(artifact_id + "\n")
    dist.barrier()


def latest(root: Path | None) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    if root is None or not root.is_dir():
        return None
    done = [p for p in root.glob("step-*") if p.is_dir() and (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable tensors, on CPU."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back into the model, in place."""
    params = dict(model.named_parameters())
    missing = [n for n in tensors if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint tensors not in the model: {missing[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def save(root: Path, step: int, model, opt, sched, state: dict, best: dict | None, loop_rng: random.Random) -> Path:
    """Write checkpoint `step-<step>` (rank 0 writes, every rank its RNG state); keep only the newest."""
    from safetensors.torch import save_file

    rank, _ = dist.world()
    part = root / f"step-{step}.part"
    if dist.is_main():
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    dist.barrier()
    torch.save(_rng_state(loop_rng), part / f"rng-{rank}.pt")
    if dist.is_main():
        save_file(trainable_state(model), part / "trainable.safetensors")
        if best is not None:
            save_file(best, part / "best.safetensors")
        torch.save(opt.state_dict(), part / "optimizer.pt")
        torch.save(sched.state_dict(), part / "scheduler.pt")
        (part / "state.json").write_text(json.dumps(state))
    dist.barrier()
    final = root / f"step-{step}"
    if dist.is_main():
        os.replace(part, final)
        for old in root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model, opt, sched, loop_rng: random.Random) -> tuple[dict, dict | None]:
    """Restore model, optimizer, scheduler and RNG states; returns (loop state, best tensors or None)."""
    from safetensors.torch import load_file

    load_trainable(model, load_file(path / "trainable.safetensors"))
    opt.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rank, _ = dist.world()
    _set_rng_state(torch.load(path / f"rng-{rank}.pt", weights_only=True), loop_rng)
    best = load_file(path / "best.safetensors") if (path / "best.safetensors").is_file() else None
    return json.loads((path / "state.json").read_text()), best


def remove(root: Path) -> None:
    """Drop the checkpoints once the artifact is finished."""
    if dist.is_main():
        shutil.rmtree(root, ignore_errors=True)


def _rng_state(loop_rng: random.Random) -> dict:
    out = {"python": random.getstate(), "loop": loop_rng.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict, loop_rng: random.Random) -> None:
    random.setstate(_tuples(s["python"]))
    loop_rng.setstate(_tuples(s["loop"]))
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
