"""The optimisation loop shared by train and distill: length-grouped batches, warm-up + cosine schedule,
gradient accumulation and clipping, a progress bar with loss and tokens/s, eval loss, loss plot.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from edgeft.data import IGNORE_INDEX
from edgeft.errors import UserError
from edgeft.stages import hf_io


def _batches(examples: list, batch_size: int, rng: random.Random) -> list[list]:
    """Shuffle, then sort within windows of 50 batches by length: little padding, still random."""
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    window = batch_size * 50
    out = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w:w + window], key=lambda i: len(examples[i][0]))
        out += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(out)
    return out


def collate(examples: list, pad_id: int, device) -> dict:
    """Right-padded input_ids / attention_mask / labels tensors."""
    n = max(len(e[0]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model, train: list, evals: list, cfg, device, pad_id: int, *, loss_fn=None, desc: str = "train") -> dict:
    """Optimise `model` on (ids, labels) examples; returns loss curve, tokens/s, eval loss, peak memory.

    `cfg` is any config with the loop fields (train.Config, distill.Config): epochs, max_steps, batch_size,
    grad_accum, lr, weight_decay, warmup_ratio, seed, optim, log_every. `loss_fn(model, batch) -> loss`
    replaces the default causal-LM loss (distillation passes its KD loss here).
    """
    from tqdm import tqdm

    if not train:
        raise UserError("data: no training example has answer tokens within train.max_length")
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
    opt = _optimizer(model, cfg)
    warm = max(1, int(steps * cfg.warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    model.train()
    curve, tokens, t0, queue = [], 0, time.time(), []
    bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
    for step in range(steps):
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            if not queue:
                queue = _batches(train, cfg.batch_size, rng)
            batch = collate([train[i] for i in queue.pop()], pad_id, device)
            loss = (loss_fn(model, batch) if loss_fn else model(**batch).loss) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0 or step == steps - 1:
            curve.append((step + 1, round(loss_sum, 5)))
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens / (time.time() - t0):.0f}")
        bar.update(1)
    bar.close()
    wall = time.time() - t0
    return {"steps": steps, "train_loss": curve[-1][1], "loss_curve": curve, "tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1), "train_s": round(wall, 2),
            "eval_loss": eval_loss(model, evals, device, pad_id, cfg.batch_size),
            "peak_rss_mb": hf_io.peak_rss_mb(),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}


@torch.no_grad()
def eval_loss(model, evals: list, device, pad_id: int, batch_size: int) -> float | None:
    if not evals:
        return None
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(evals), batch_size):
        batch = collate(evals[i:i + batch_size], pad_id, device)
        k = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * k
        n += k
    model.train()
    return round(total / max(n, 1), 5)


def plot_loss(curve: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("edgeft train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no timestamp: deterministic bytes
    plt.close(fig)
