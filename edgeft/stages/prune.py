"""Structured pruning: drop decoder blocks (depth) and MLP channels, KV groups with their query heads and
optionally residual channels (width), ranked on calibration data. Output: a smaller dense hf model.

Importance comes from forward passes over the fine-tune train split rendered with the chat template, pad
tokens excluded (Minitron, arXiv 2407.14679; block influence from ShortGPT, arXiv 2403.03853):
  block   1 - cos(hidden in, hidden out), mean over tokens: a block that barely turns its input matters little
  mlp     mean square of each channel of act(gate) * up (the input of down_proj)
  heads   mean square of each head's attention output (o_proj input); a KV group scores the sum of its
          query heads, so GQA keeps whole groups
  hidden  mean square of each channel of every RMSNorm output, summed over the norms
Every block keeps the same sizes (a config has one intermediate_size and one head count). Dense runtimes run
the result faster simply because it is a smaller model.

Unstructured sparsity (`sparsity` > 0, after any structured pruning; edgeft.training.sparsity) zeroes weights
by magnitude or Wanda. The model stays dense: same bytes, same speed in llama.cpp and onnxruntime; the
manifest and the bench report say so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import EVAL_FILE, KIND_DATA, KIND_HF, PRUNE_PLAN_FILE, TRAIN_FILE
from edgeft.errors import UserError
from edgeft.records import IGNORE_INDEX, read_jsonl
from edgeft.runtime.prompt import PromptFormatter
from edgeft.shapes import head_dim, kv_heads
from edgeft.training import examples, hf_io, loop, sparsity

# RMSNorm + GQA attention + gated MLP, the same tensor names; q/k norms (qwen3, gemma3) are per head_dim,
# shared by the heads, so they survive any choice of heads unchanged
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
# Gemma scales its embeddings by sqrt(hidden_size) and ties the head: a narrower residual rescales the stream
# and the logits, which no slicing undoes
_NO_HIDDEN = ("gemma3_text",)
AXES = ("depth", "mlp", "heads", "hidden")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Dim roles of every tensor, by name: 'hid' residual, 'qh' query-head rows, 'kv' KV rows, 'ffn' MLP channels.
_ROLES = (
    (r"self_attn\.q_proj\.weight$", ("qh", "hid")), (r"self_attn\.q_proj\.bias$", ("qh",)),
    (r"self_attn\.[kv]_proj\.weight$", ("kv", "hid")), (r"self_attn\.[kv]_proj\.bias$", ("kv",)),
    (r"self_attn\.o_proj\.weight$", ("hid", "qh")), (r"self_attn\.o_proj\.bias$", ("hid",)),
    (r"self_attn\.[qk]_norm\.weight$", (None,)),
    (r"mlp\.(gate|up)_proj\.weight$", ("ffn", "hid")), (r"mlp\.(gate|up)_proj\.bias$", ("ffn",)),
    (r"mlp\.down_proj\.weight$", ("hid", "ffn")), (r"mlp\.down_proj\.bias$", ("hid",)),
    (r"(input|post_attention|pre_feedforward|post_feedforward)_layernorm\.weight$", ("hid",)),
    (r"^model\.embed_tokens\.weight$", (None, "hid")), (r"^lm_head\.weight$", (None, "hid")),
    (r"^model\.norm\.weight$", ("hid",)),
)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Config:
    ratio: float = opt(0.0, "share of parameters to remove, 0..0.9; 0 with no explicit size = stage off")
    layers: int = opt(0, "decoder blocks to keep (0 = all, or chosen by ratio)")
    intermediate_size: int = opt(0, "MLP channels per block (0 = keep, or chosen by ratio)")
    kv_groups: int = opt(0, "KV heads kept per block, each with its query heads (0 = keep, or chosen by ratio)")
    hidden_size: int = opt(0, "residual width (0 = keep); under 256 llama.cpp's K-quants fall back to other types")
    axes: str = opt("depth,mlp,heads", "what the ratio search may shrink: depth, mlp, heads, hidden")
    multiple: int = opt(256, "intermediate/hidden step: K-quant rows need 256, Q8_0 and MatMulNBits 32")
    candidates: int = opt(6, "ratio search: architectures nearest the target, scored by calibration loss")
    tolerance: float = opt(0.05, "ratio search: a candidate may keep this share of the original params above target")
    calib_samples: int = opt(128, "calibration examples from the train split")
    max_length: int = opt(256, "tokens per calibration example")
    batch_size: int = opt(8, "calibration examples per forward pass")
    dtype: str = opt("float16", "saved weights: float16 | bfloat16 | float32")
    seed: int = opt(0, "calibration sample choice")
    sparsity: float = opt(0.0, "unstructured: share of each block projection row zeroed (0 = off); no speed-up")
    sparsity_method: str = opt("wanda", "wanda (|W| x input-channel norm) | magnitude (|W|)")


def enabled(cfg: Config) -> bool:
    """Whether the recipe asks for pruning at all."""
    return cfg.ratio > 0 or cfg.sparsity > 0 or any((cfg.layers, cfg.intermediate_size, cfg.kv_groups,
                                                      cfg.hidden_size))


def validate(cfg: Config) -> None:
    """Refuse values the stage cannot honour, before anything runs."""
    if not 0 <= cfg.ratio <= 0.9:
        raise UserError(f"prune.ratio: {cfg.ratio} not in 0..0.9 (share of parameters removed)")
    bad = [a for a in _axes(cfg) if a not in AXES]
    if bad or not _axes(cfg):
        raise UserError(f"prune.axes: '{cfg.axes}' must list some of {', '.join(AXES)}")
    if min(cfg.layers, cfg.intermediate_size, cfg.kv_groups, cfg.hidden_size) < 0:
        raise UserError("prune.layers/intermediate_size/kv_groups/hidden_size must be >= 0 (0 = not fixed)")
    if not 0 <= cfg.tolerance < 1:
        raise UserError(f"prune.tolerance: {cfg.tolerance} not in 0..1")
    if cfg.multiple < 1 or cfg.candidates < 1 or cfg.calib_samples < 1 or cfg.batch_size < 1:
        raise UserError("prune.multiple, prune.candidates, prune.calib_samples and prune.batch_size must be >= 1")
    if cfg.dtype not in DTYPES:
        raise UserError(f"prune.dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    if not 0 <= cfg.sparsity <= 0.9:
        raise UserError(f"prune.sparsity: {cfg.sparsity} not in 0..0.9 (share of each weight row zeroed)")
    if cfg.sparsity_method not in sparsity.METHODS:
        raise UserError(f"prune.sparsity_method: '{cfg.sparsity_method}' is not one of {', '.join(sparsity.METHODS)}")


def run(src: artifact.Artifact, cfg: Config, out: Path, *, data: artifact.Artifact) -> artifact.Artifact:
    """Prune the hf artifact `src` with importance measured on the `data` artifact's train split."""
    src = artifact.load(src.path, kind=KIND_HF)
    data = artifact.load(data.path, kind=KIND_DATA)
    validate(cfg)
    check_model(json.loads((src.path / "config.json").read_text()).get("model_type"), cfg)
    inputs = {"data_id": data.id, "data_sha256": artifact.hash_files([data.path / TRAIN_FILE])}

    def payload(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=torch.float32).eval()
        fmt = PromptFormatter(src.path)
        calib = examples.calibration(fmt, read_jsonl(data.path / TRAIN_FILE), cfg.calib_samples,
                                     cfg.max_length, cfg.seed)
        evals = examples.calibration(fmt, read_jsonl(data.path / EVAL_FILE), cfg.calib_samples,
                                     cfg.max_length, cfg.seed)
        pad = fmt.tokenizer.token_to_id("<unk>") or 0
        imp = importance(model, calib, pad, cfg.batch_size)
        sizes, scored = choose_sizes(model, imp, calib, pad, cfg)
        plan = make_plan(model, imp, sizes)
        small = prune_model(model, plan)
        metrics = {"params_before": n_params(model), "params_after": n_params(small),
                   "sizes_before": current_sizes(model), "sizes_after": sizes,
                   "kept_layers": plan["layers"],
                   "block_importance": [round(x, 5) for x in imp["block"].tolist()],
                   "kept_kv_groups": {str(i): plan["kv"][i] for i in plan["layers"]},
                   "calib_loss_before": mean_loss(model, calib, pad, cfg.batch_size),
                   "calib_loss_after": mean_loss(small, calib, pad, cfg.batch_size),
                   "eval_loss_before": mean_loss(model, evals, pad, cfg.batch_size),
                   "eval_loss_after": mean_loss(small, evals, pad, cfg.batch_size),
                   "candidates": scored, "calib_examples": len(calib)}
        metrics["param_ratio"] = round(metrics["params_after"] / metrics["params_before"], 4)
        if cfg.sparsity > 0:
            share = sparsity.sparsify(small, calib, pad, cfg.batch_size, cfg.sparsity, cfg.sparsity_method)
            metrics.update(sparsity=share, sparsity_method=cfg.sparsity_method,
                           calib_loss_after=mean_loss(small, calib, pad, cfg.batch_size),
                           eval_loss_after=mean_loss(small, evals, pad, cfg.batch_size),
                           dense_runtime_note=sparsity.DENSE_NOTE.format(pct=share))
        small.to(DTYPES[cfg.dtype]).save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer(src.path, tmp)
        (tmp / PRUNE_PLAN_FILE).write_text(json.dumps(plan, sort_keys=True) + "\n")
        return metrics

    return artifact.build(out, kind=KIND_HF, stage="prune", params=cfg, parent=src, payload=payload,
                          inputs=inputs)


def check_model(model_type: str | None, cfg: Config) -> None:
    """Refuse an architecture (or an axis of it) pruning would break, before any work."""
    if model_type not in SUPPORTED:
        raise UserError(f"prune: model_type '{model_type}' is not supported; supported: {', '.join(SUPPORTED)} "
                        "(set prune.ratio=0 and prune.sparsity=0 to skip the stage)")
    if model_type in _NO_HIDDEN and (cfg.hidden_size or (cfg.ratio > 0 and "hidden" in _axes(cfg))):
        raise UserError(f"prune: {model_type} scales its tied embeddings by sqrt(hidden_size), so the residual "
                        "width cannot be pruned; set prune.hidden_size=0 and leave 'hidden' out of prune.axes")


def n_params(model) -> int:
    """Parameter count, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def current_sizes(model) -> dict:
    """The sizes pruning changes, read from a model's config."""
    c = model.config
    return {"layers": c.num_hidden_layers, "intermediate_size": c.intermediate_size,
            "kv_groups": kv_heads(c), "hidden_size": c.hidden_size}


@torch.no_grad()
def importance(model, examples: list, pad_id: int, batch_size: int) -> dict:
    """Per-block, per-channel and per-head importance from forward passes (pad tokens excluded)."""
    c = model.config
    if c.model_type not in SUPPORTED:
        check_model(c.model_type, Config())
    layers = model.model.layers
    nq, d = c.num_attention_heads, head_dim(c)
    acc = {"block": torch.zeros(len(layers), dtype=torch.float64),
           "ffn": torch.zeros(len(layers), c.intermediate_size, dtype=torch.float64),
           "qh": torch.zeros(len(layers), nq, dtype=torch.float64),
           "hid": torch.zeros(c.hidden_size, dtype=torch.float64)}
    state = {"mask": None}

    def sel(x):  # [b, t, ...] -> [tokens, ...] over real tokens
        return x[state["mask"]].double()

    def block_hook(i):
        def hook(mod, args, kwargs, out):
            h_in = sel(args[0] if args else kwargs["hidden_states"])
            h_out = sel(out[0] if isinstance(out, tuple) else out)
            acc["block"][i] += (1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()
        return hook

    def sq_hook(key, i=None, heads=False):
        def hook(mod, args, out=None):
            x = sel(args[0] if out is None else out) ** 2
            x = x.view(x.shape[0], nq, d).sum(-1) if heads else x
            if i is None:
                acc[key] += x.sum(0)
            else:
                acc[key][i] += x.sum(0)
        return hook

    handles = [model.model.norm.register_forward_hook(sq_hook("hid"))]
    for i, layer in enumerate(layers):
        handles += [layer.register_forward_hook(block_hook(i), with_kwargs=True),
                    layer.mlp.down_proj.register_forward_pre_hook(sq_hook("ffn", i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(sq_hook("qh", i, heads=True)),
                    layer.input_layernorm.register_forward_hook(sq_hook("hid")),
                    layer.post_attention_layernorm.register_forward_hook(sq_hook("hid"))]
    tokens = 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = loop.collate(examples[i:i + batch_size], pad_id, torch.device("cpu"))
            state["mask"] = batch["attention_mask"].bool()
            tokens += int(state["mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    out = {k: v / max(tokens, 1) for k, v in acc.items()}
    per_group = nq // kv_heads(c)
    out["kv"] = out["qh"].view(len(layers), -1, per_group).sum(-1)  # a KV group = its query heads
    return out


def choose_sizes(model, imp: dict, calib: list, pad_id: int, cfg: Config) -> tuple[dict, list]:
    """Target sizes: the explicit ones, the rest searched so the parameter count lands nearest the ratio."""
    check_model(model.config.model_type, cfg)
    full = current_sizes(model)
    fixed = {k: getattr(cfg, k) or None for k in full}
    for k, v in fixed.items():
        if v is not None and not 1 <= v <= full[k]:
            raise UserError(f"prune.{k}: {v} not in 1..{full[k]} (the model's {k})")
    if cfg.ratio == 0:
        return {k: fixed[k] or full[k] for k in full}, []
    free = {"layers": "depth", "intermediate_size": "mlp", "kv_groups": "heads", "hidden_size": "hidden"}
    grid = {}
    for k, axis in free.items():
        if fixed[k] is not None or axis not in _axes(cfg):
            grid[k] = [fixed[k] or full[k]]
        elif k in ("layers", "kv_groups"):
            grid[k] = list(range(1, full[k] + 1))
        else:
            grid[k] = sorted({m for m in range(cfg.multiple, full[k], cfg.multiple)} | {full[k]})
    target = (1 - cfg.ratio) * n_params(model)
    shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    cands = [dict(zip(grid, v)) for v in _product(list(grid.values()))]
    cands.sort(key=lambda s: (abs(count_params(shapes, model.config, s) - target), -s["layers"]))
    limit = target + cfg.tolerance * n_params(model)  # lower calibration loss must not buy back parameters
    cands = [s for s in cands if count_params(shapes, model.config, s) <= limit] or cands[:1]
    scored = []
    for s in cands[: cfg.candidates]:
        loss = mean_loss(prune_model(model, make_plan(model, imp, s)), calib, pad_id, cfg.batch_size) \
            if cfg.candidates > 1 else None
        scored.append({**s, "params": count_params(shapes, model.config, s), "calib_loss": loss})
    best = min(scored, key=lambda r: r["calib_loss"] if r["calib_loss"] is not None else 0.0)
    return {k: best[k] for k in full}, scored


def count_params(shapes: dict, config, sizes: dict) -> int:
    """Parameter count of the pruned model, from the original tensor shapes and the target sizes."""
    per_group = config.num_attention_heads // kv_heads(config)
    d = head_dim(config)
    dims = {"hid": sizes["hidden_size"], "ffn": sizes["intermediate_size"], "kv": sizes["kv_groups"] * d,
            "qh": sizes["kv_groups"] * per_group * d}
    total, tied = 0, getattr(config, "tie_word_embeddings", False)
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        if (m and int(m.group(1)) >= sizes["layers"]) or (tied and name == "lm_head.weight"):
            continue  # a kept block has the same shapes as any other; a tied head is the embedding
        n = 1
        for role, dim in zip(_roles(name, config), shape):
            n *= dims[role] if role else dim
        total += n
    return total


def make_plan(model, imp: dict, sizes: dict) -> dict:
    """Which blocks, KV groups, MLP channels and hidden channels survive (sorted indices)."""
    top = lambda scores, k: sorted(torch.topk(scores, k).indices.tolist())  # noqa: E731
    layers = top(imp["block"], sizes["layers"])
    return {"layers": layers, "hid": top(imp["hid"], sizes["hidden_size"]),
            "kv": {i: top(imp["kv"][i], sizes["kv_groups"]) for i in layers},
            "ffn": {i: top(imp["ffn"][i], sizes["intermediate_size"]) for i in layers}}


def prune_model(model, plan: dict):
    """A new dense model holding only the planned blocks and channels (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    c = model.config
    d, per_group = head_dim(c), c.num_attention_heads // kv_heads(c)
    new_cfg = c.__class__.from_dict(c.to_dict())
    g = len(next(iter(plan["kv"].values())))
    new_cfg.num_hidden_layers, new_cfg.hidden_size = len(plan["layers"]), len(plan["hid"])
    new_cfg.intermediate_size = len(next(iter(plan["ffn"].values())))
    new_cfg.num_key_value_heads, new_cfg.num_attention_heads, new_cfg.head_dim = g, g * per_group, d
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [c.layer_types[i] for i in plan["layers"]]
    hid = torch.tensor(plan["hid"])
    new_sd = {}
    for name, w in model.state_dict().items():
        m = _LAYER.match(name)
        if m and int(m.group(1)) not in plan["layers"]:
            continue
        idx = {"hid": hid}
        if m:
            i = int(m.group(1))
            kv = torch.tensor(plan["kv"][i])
            idx["kv"] = (kv[:, None] * d + torch.arange(d)).flatten()
            qh = (kv[:, None] * per_group + torch.arange(per_group)).flatten()
            idx["qh"] = (qh[:, None] * d + torch.arange(d)).flatten()
            idx["ffn"] = torch.tensor(plan["ffn"][i])
            name = f"model.layers.{plan['layers'].index(i)}.{name[m.end():]}"
        for dim, role in enumerate(_roles(name, c)):
            if role:
                w = w.index_select(dim, idx[role])
        new_sd[name] = w.clone()
    small = AutoModelForCausalLM.from_config(new_cfg, dtype=torch.float32)
    small.load_state_dict(new_sd, strict=True)
    small.generation_config = model.generation_config
    return small.eval()


@torch.no_grad()
def mean_loss(model, examples: list, pad_id: int, batch_size: int) -> float | None:
    """Mean next-token loss on the label tokens of `examples`."""
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = loop.collate(examples[i:i + batch_size], pad_id, torch.device("cpu"))
        k = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += model(**batch).loss.item() * k
        n += k
    return round(total / n, 5) if n else None


def _roles(name: str, config) -> tuple:
    for pat, roles in _ROLES:
        if re.search(pat, name):
            return roles
    raise UserError(f"prune: tensor '{name}' of model_type '{config.model_type}' has no pruning rule; "
                    f"supported: {', '.join(SUPPORTED)}")


def _axes(cfg: Config) -> list[str]:
    return [a.strip() for a in cfg.axes.split(",") if a.strip()]


def _product(lists: list[list]) -> list[tuple]:
    import itertools

    return list(itertools.product(*lists))
