"""The optimisation loop shared by train and distill: length-grouped or packed batches, warm-up + cosine
schedule, gradient accumulation and clipping, a progress bar with loss, tokens/s and ETA, periodic eval
loss with early stopping, resumable checkpoints, and the same loop on several ranks under accelerate.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from edgeft import rss
from edgeft.errors import UserError
from edgeft.training import batching, checkpoint, dist
from edgeft.training.batching import collate  # noqa: F401  (part of this module's interface)

# Loop fields a config may leave out (distill's config need not carry them), with their defaults.
OPTIONAL = {"eval_every": 0, "early_stop_patience": 0, "early_stop_min_delta": 0.0, "restore_best": True,
            "packing": False, "save_every": 0, "max_length": 0}


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global generators (every device)."""
    random.seed(seed)
    torch.manual_seed(seed)


class _LossModule(torch.nn.Module):
    """The model and its loss as one module, so a DDP/FSDP wrapper sees every training forward."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch) if self.loss_fn else batching.causal_lm_loss(self.model, batch)


def fit(model, train: list, evals: list, cfg, device, pad_id: int, *, loss_fn=None, desc: str = "train",
        ckpt_dir: Path | None = None, full_state: dict | None = None) -> dict:
    """Optimise `model` on (ids, labels) examples; returns loss/eval curves, tokens/s, eval loss, peak memory.

    `cfg` is any config with the loop fields (train.Config, distill.Config): epochs, max_steps, batch_size,
    grad_accum, lr, weight_decay, warmup_ratio, seed, optim, log_every, and optionally those in OPTIONAL.
    `loss_fn(model, batch) -> loss` replaces the causal-LM loss (distillation passes its KD loss here).
    `ckpt_dir`: where checkpoints go every `save_every` steps; the newest one there is resumed from.
    `full_state`: under FSDP / DeepSpeed (sharded weights), filled on rank 0 with the gathered state dict
    ("model") to save from; untouched otherwise (the model itself holds full weights).
    """
    from tqdm import tqdm

    o = {k: getattr(cfg, k, d) for k, d in OPTIONAL.items()}
    if not train:
        raise UserError("data: no training example has answer tokens within train.max_length")
    if o["packing"] and o["max_length"] < 1:
        raise UserError("train.packing needs train.max_length (tokens per packed row)")
    rank, world = dist.world()
    seed_everything(cfg.seed + rank)  # dropout differs between ranks; the batch order below is shared
    rng = random.Random(cfg.seed)

    def epoch() -> list:
        if o["packing"]:
            return batching.packed(train, cfg.batch_size, o["max_length"], rng)
        return batching.length_grouped(train, cfg.batch_size, rng)

    state = {"step": 0, "queue": epoch(), "curve": [], "eval_curve": [], "tokens": 0, "best_loss": None,
             "best_step": None, "bad_evals": 0, "stopped_early": False}
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(state["queue"]) / (cfg.grad_accum * world)))
    opt = _optimizer(model, cfg)
    sched = _schedule(opt, steps, cfg.warmup_ratio)
    best, resumed = None, None
    ckpt = checkpoint.latest(ckpt_dir)
    if ckpt is not None:
        state, best = checkpoint.load(ckpt, model, opt, sched, rng)
        resumed = state["step"]
    net, acc = _LossModule(model, loss_fn), dist.accelerator()
    sharded = acc is not None and acc.distributed_type.name in ("FSDP", "DEEPSPEED")
    if sharded and o["save_every"]:
        raise UserError("train.save_every: checkpoints are written alone or under DDP, not with FSDP/DeepSpeed "
                        "(sharded state); set train.save_every=0")
    if acc is not None:
        net, opt = acc.prepare(net, opt)  # the scheduler stays ours: it steps once per optimizer step
    params = [p for p in model.parameters() if p.requires_grad]
    dtype = _float_dtype(model)
    # varlen attention for packed rows where the architecture allows (restored below); else a 4D mask
    previous_attn = batching.use_varlen(model) if o["packing"] else None
    model.train()
    t0, run_tokens = time.time(), 0
    bar = tqdm(total=steps, initial=state["step"], desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0,
               disable=not dist.is_main())
    while state["step"] < steps and not state["stopped_early"]:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            if len(state["queue"]) < world:
                state["queue"] += epoch()
            batch, n_tok = _collate(state["queue"][rank], train, o["packing"], pad_id, device, dtype,
                                    mask=previous_attn is None)
            del state["queue"][:world]
            sync = acc is None or micro == cfg.grad_accum - 1
            with nullcontext() if sync else acc.no_sync(net):
                loss = net(batch) / cfg.grad_accum
                acc.backward(loss) if acc is not None else loss.backward()
            loss_sum += loss.item()
            run_tokens += n_tok
            state["tokens"] += n_tok
        if acc is not None:
            acc.clip_grad_norm_(params, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step = state["step"] + 1
        if (step - 1) % cfg.log_every == 0 or step == steps:
            state["curve"].append((step, round(dist.all_sum([loss_sum], device)[0] / world, 5)))
        if o["eval_every"] and (step % o["eval_every"] == 0 or step == steps):
            best = _track_eval(state, model, evals, device, pad_id, cfg.batch_size, o, best)
        if o["save_every"] and ckpt_dir is not None and step % o["save_every"] == 0 and step < steps \
                and not state["stopped_early"]:
            checkpoint.save(ckpt_dir, step, model, opt, sched, state, best, rng)
        rate = (run_tokens * world) / max(time.time() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rate:.0f}",
                        **({"eval": f"{state['eval_curve'][-1][1]:.3f}"} if state["eval_curve"] else {}))
        bar.update(1)
    bar.close()
    wall = time.time() - t0
    if previous_attn is not None:
        batching.base_model(model).set_attn_implementation(previous_attn)
    if sharded:  # every rank takes part in the gather; rank 0 receives full tensors
        gathered = acc.get_state_dict(net)
        if full_state is not None and dist.is_main():
            full_state["model"] = {k.removeprefix("model."): v for k, v in gathered.items()}
    run_tokens, all_tokens = (int(v) for v in dist.all_sum([run_tokens, state["tokens"]], device))
    restored = o["restore_best"] and best is not None and state["best_step"] != state["step"]
    if restored:
        checkpoint.load_trainable(model, best)
    last_eval = state["eval_curve"][-1] if state["eval_curve"] else None
    if restored:
        final_eval = state["best_loss"]
    elif last_eval and last_eval[0] == state["step"]:
        final_eval = last_eval[1]
    else:
        final_eval = eval_loss(model, evals, device, pad_id, cfg.batch_size)
    return {"steps": steps, "steps_run": state["step"], "train_loss": state["curve"][-1][1],
            "loss_curve": state["curve"], "eval_curve": state["eval_curve"], "eval_loss": final_eval,
            "best_step": state["best_step"], "stopped_early": state["stopped_early"], "restored_best": restored,
            "resumed_from_step": resumed, "tokens": all_tokens,
            "tokens_per_s": round(run_tokens / max(wall, 1e-9), 1), "train_s": round(wall, 2),
            "packing": o["packing"], "world_size": world, "peak_rss_mb": rss.peak_mb(),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None}


@torch.no_grad()
def eval_loss(model, evals: list, device, pad_id: int, batch_size: int) -> float | None:
    """Mean next-token loss over the labelled tokens of `evals` (sharded over ranks when launched)."""
    if not evals:
        return None
    rank, world = dist.world()
    mine = evals[rank::world]
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(mine), batch_size):
        batch = batching.collate(mine[i:i + batch_size], pad_id, device)
        total += batching.causal_lm_loss(model, batch, reduction="sum").item()
        n += int((batch["labels"][:, 1:] != -100).sum())
    total, n = dist.all_sum([total, n], device)
    model.train(was_training)
    return round(total / max(n, 1), 5)


def plot_loss(curve: list, path: Path, eval_curve: list | None = None) -> None:
    """The train (and eval) loss curve as a PNG with deterministic bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in curve], [v for _, v in curve], label="train")
    if eval_curve:
        ax.plot([s for s, _ in eval_curve], [v for _, v in eval_curve], marker="o", label="eval")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("edgeft train")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})  # no timestamp: deterministic bytes
    plt.close(fig)


def _track_eval(state: dict, model, evals, device, pad_id, batch_size, o: dict, best):
    """Record an eval point; keep the best weights; count evals without improvement for early stopping."""
    ev = eval_loss(model, evals, device, pad_id, batch_size)
    if ev is None:
        return best
    state["eval_curve"].append((state["step"], ev))
    if state["best_loss"] is None or ev < state["best_loss"] - o["early_stop_min_delta"]:
        state.update(best_loss=ev, best_step=state["step"], bad_evals=0)
        return checkpoint.trainable_state(model) if o["restore_best"] else None
    state["bad_evals"] += 1
    if o["early_stop_patience"] and state["bad_evals"] >= o["early_stop_patience"]:
        state["stopped_early"] = True
    return best


def _collate(entry: list, train: list, packing: bool, pad_id: int, device, dtype, mask: bool) -> tuple[dict, int]:
    if packing:
        rows = [[train[i] for i in row] for row in entry]
        return batching.collate_packed(rows, pad_id, device, dtype, mask), sum(len(x) for row in rows for x, _ in row)
    examples = [train[i] for i in entry]
    return batching.collate(examples, pad_id, device), sum(len(x) for x, _ in examples)


def _float_dtype(model) -> torch.dtype:
    w = model.get_input_embeddings().weight
    return w.dtype if w.dtype.is_floating_point else torch.float32


def _schedule(opt, steps: int, warmup_ratio: float):
    warm = max(1, int(steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))


def _optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
