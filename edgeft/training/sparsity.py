"""Unstructured sparsity for the prune stage, and its preservation through distillation.

`sparsify` zeroes a share of each output row of every decoder-block projection, by |W| (magnitude) or by
|W| x the L2 norm of its input channel on calibration tokens (Wanda, arXiv 2306.11695). The model stays
dense: llama.cpp and onnxruntime gain no speed and no bytes from the zeros, which DENSE_NOTE says wherever
the result is reported. `keep_zeros` holds those zeros through later training (distill).
"""

from __future__ import annotations

import re

import torch

from edgeft.training import loop

METHODS = ("wanda", "magnitude")
DENSE_NOTE = ("unstructured sparsity: {pct:.0%} of the block projection weights are zero, but the model is stored "
              "and run dense: llama.cpp and onnxruntime gain no speed and no bytes from it (size and speed only "
              "change with structured pruning: depth, mlp, heads, hidden)")
_BLOCK = re.compile(r"^model\.layers\.\d+\.")


def block_linears(model) -> dict[str, torch.nn.Linear]:
    """The Linear modules inside decoder blocks (attention and MLP projections), by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _BLOCK.match(n + ".")}


@torch.no_grad()
def sparsify(model, examples: list, pad_id: int, batch_size: int, share: float, method: str) -> float:
    """Zero `share` of every output row of each block projection in place; returns the share zeroed.

    Scores are |W| (magnitude) or |W_ij| * ||X_j||_2 over the calibration tokens (Wanda: a small weight on a
    loud input channel still matters). Rows compete on their own, as in Wanda's per-output comparison group.
    """
    linears = block_linears(model)
    norms: dict = {}
    if method == "wanda":
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
        state = {"mask": None}

        def hook(name):
            def pre(mod, args):
                sq[name] += (args[0][state["mask"]].double() ** 2).sum(0)
            return pre

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
        try:
            for i in range(0, len(examples), batch_size):
                batch = loop.collate(examples[i:i + batch_size], pad_id, torch.device("cpu"))
                state["mask"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        finally:
            for h in handles:
                h.remove()
        norms = {n: v.sqrt().float() for n, v in sq.items()}
    zeroed = total = 0
    for n, m in linears.items():
        w = m.weight
        k = int(w.shape[1] * share)
        total += w.numel()
        if k == 0:
            continue
        score = w.abs() * norms[n][None, :] if method == "wanda" else w.abs()
        w.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, 0.0)
        zeroed += k * w.shape[0]
    return round(zeroed / max(total, 1), 4)


def keep_zeros(model) -> int:
    """Mask the gradients of every exactly-zero weight of the block projections (Adam then never moves them,
    and decoupled weight decay keeps zero at zero); returns the weights held at zero."""
    held = 0
    for mod in block_linears(model).values():
        mask = (mod.weight != 0).to(mod.weight.dtype)
        held += int((mask == 0).sum())
        mod.weight.register_hook(lambda g, m=mask: g * m)
    return held
