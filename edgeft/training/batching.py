"""Batches for the training loop: length-grouped padded batches, or packed rows with no attention
across samples, and the causal-LM loss computed only where there are labels.

A packed row holds several examples back to back. Each keeps its own positions (they restart at 0)
and a token sees only earlier tokens of its own example, so a row gives the same logits and loss as
its examples run one by one, without padding in between. Two ways to keep samples apart:
- `varlen` attention (architectures in _PLAIN_HEAD_TYPES): causal SDPA run per sample, found where
  position_ids restart; no attention is computed across samples at all (the CPU analogue of
  flash-attention's varlen kernels);
- any other model: a 4D additive block-diagonal causal mask (sdpa and eager accept it), which
  computes and then discards the cross-sample scores.
"""

from __future__ import annotations

import torch

from edgeft.records import IGNORE_INDEX

PACK_WINDOW = 1000  # examples packed together: wide enough to fill rows, narrow enough to stay shuffled


def length_grouped(examples: list, batch_size: int, rng) -> list[list[int]]:
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


def packed(examples: list, batch_size: int, max_length: int, rng) -> list[list[list[int]]]:
    """Batches of `batch_size` rows, each row example indices whose lengths sum to <= max_length.

    Shuffled, then first-fit-decreasing within windows of PACK_WINDOW examples (length-aware: long
    examples first, short ones fill the gaps), rows shuffled again.
    """
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    rows: list[list[int]] = []
    for w in range(0, len(idx), PACK_WINDOW):
        bins: list[list[int]] = []
        free: list[int] = []
        for i in sorted(idx[w:w + PACK_WINDOW], key=lambda i: -len(examples[i][0])):
            n = len(examples[i][0])
            j = next((b for b, f in enumerate(free) if f >= n), None)
            if j is None:
                bins.append([i])
                free.append(max_length - n)
            else:
                bins[j].append(i)
                free[j] -= n
        rows += bins
    rng.shuffle(rows)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


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


def collate_packed(rows: list[list], pad_id: int, device, dtype=torch.float32, mask: bool = True) -> dict:
    """Rows of examples to input_ids / labels / position_ids and a 4D additive block-diagonal causal mask.

    The first label of every example is dropped: it would be predicted from the previous example.
    Padding at the end of a row is its own block, so every query sees at least itself. `mask=False`
    leaves the mask out (varlen attention reads the samples from position_ids).
    """
    n = max(sum(len(x) for x, _ in row) for row in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), n), dtype=torch.long)
    seg = torch.zeros((len(rows), n), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for k, (x, y) in enumerate(row, 1):
            ids[r, at:at + len(x)] = torch.tensor(x)
            labels[r, at + 1:at + len(x)] = torch.tensor(y[1:])
            pos[r, at:at + len(x)] = torch.arange(len(x))
            seg[r, at:at + len(x)] = k
            at += len(x)
        pos[r, at:] = torch.arange(n - at)
        seg[r, at:] = len(row) + 1
    out = {"input_ids": ids.to(device), "position_ids": pos.to(device), "labels": labels.to(device)}
    if not mask:
        return out
    causal = torch.ones((n, n), dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal  # (B, q, k)
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return {**out, "attention_mask": additive[:, None].to(device)}


VARLEN = "edgeft_varlen"  # attention implementation name registered with transformers


def varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                     is_causal=None, position_ids=None, **kwargs):
    """Causal SDPA per packed sample (a sample starts where position_ids restart at 0)."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if position_ids is None or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if hasattr(module, "num_key_value_groups"):
        key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    pos = position_ids.expand(query.shape[0], -1)
    rows = []
    for r in range(query.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [query.shape[2]]
        if starts[0] != 0:
            starts.insert(0, 0)
        rows.append(torch.cat([torch.nn.functional.scaled_dot_product_attention(
            query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b], dropout_p=dropout, scale=scaling,
            is_causal=True) for a, b in zip(starts, starts[1:]) if b > a], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_varlen(model) -> str | None:
    """Switch `model` to varlen attention if its architecture allows; returns the previous implementation."""
    from transformers import AttentionInterface

    base = base_model(model)
    if not _plain_head(base) or base.config._attn_implementation not in ("sdpa", "eager"):
        return None
    AttentionInterface.register(VARLEN, varlen_attention)
    previous = base.config._attn_implementation
    base.set_attn_implementation(VARLEN)
    return previous


def causal_lm_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over labelled positions, the LM head applied only where there are labels.

    Equal to the model's own loss (mean over labelled tokens), without computing vocabulary logits for
    prompt and padding positions. Models that post-process logits (soft-capping, scaling) take the
    model's own path.
    """
    base = base_model(model)
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not _plain_head(base):
        out = model(**batch, use_cache=False)
        return out.loss if reduction == "mean" else out.loss * (labels[:, 1:] != IGNORE_INDEX).sum()
    hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    sel = target != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][sel]).float()
    loss = torch.nn.functional.cross_entropy(logits, target[sel], reduction="sum")
    return loss / sel.sum().clamp(min=1) if reduction == "mean" else loss


def base_model(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _plain_head(base) -> bool:
    cfg = getattr(base, "config", None)
    return (cfg is not None and hasattr(base, "get_decoder") and base.get_output_embeddings() is not None
            and getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
            and getattr(cfg, "model_type", "") in _PLAIN_HEAD_TYPES)


# Architectures whose forward is exactly `lm_head(decoder(x))`: the loss can skip unlabelled positions.
_PLAIN_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "smollm3", "olmo", "olmo2",
                     "stablelm", "starcoder2")
