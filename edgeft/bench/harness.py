"""Bench every variant over the eval split: latency, memory and answer quality, one process each.

The first variant is the reference (the tuned model in torch): its greedy tokens and teacher-forced
log-probs on the reference answers are what the other variants' agreement and KL are measured
against. Prompts are rendered and tokenized once here and the same ids are fed to every runtime.
Eval records tagged with a split (trained / held-out fact, unanswerable) and grounded in retrieved
passages are also scored as `edgeft ask` shows them (edgeft.bench.grounded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft import host, shapes
from edgeft.bench import grounded
from edgeft.bench.latency import prompt_lengths
from edgeft.config import opt
from edgeft.errors import StageFailure, UserError
from edgeft.runtime.prompt import PromptFormatter


@dataclass(frozen=True)
class Config:
    max_samples: int = opt(120, "eval prompts measured (0 = all); spread evenly over each eval split (trained, "
                                "heldout, unanswerable), the splits kept in proportion")
    max_new_tokens: int = opt(48, "generation cap per prompt")
    threads: int = opt(2, "runtime threads (the profile's)")
    n_ctx: int = opt(512, "runtime context, tokens (the profile's context_length, capped at the model's)")
    warmup: int = opt(1, "untimed runs before the timed ones")
    repeats: int = opt(5, "timed runs per latency figure; medians and spread reported")
    prompt_lengths: tuple[int, ...] = opt((), "prefill lengths timed, tokens; empty = n_ctx/8 and n_ctx/2")
    decode_tokens: int = opt(64, "tokens per timed decode run (EOS ignored so every run does equal work)")
    ppl_tokens: int = opt(4096, "held-out manual tokens scored for perplexity (0 = skip)")
    bandwidth_gbs: float = opt(36.0, "device memory bandwidth for the predicted decode rate, GB/s (profile's)")
    n_gpu_layers: int = opt(0, "llama.cpp layers offloaded (profile's)")
    onnx_provider: str = opt("CPUExecutionProvider", "onnxruntime execution provider (profile's)")
    kv_cache_type: str = opt("f16", "llama.cpp KV cache precision, f16 | f32 (profile's)")
    accuracy_budget: float = opt(0.95, "share of the tuned model's rouge_l a selected variant keeps (profile's)")
    memory_budget_gb: float = opt(8.0, "memory a selected variant may use, GiB (profile's)")


GATE_KEYS = ("accuracy_budget", "memory_budget_gb")  # Config keys that gate a selection, not the measurement


@dataclass(frozen=True)
class Target:
    """One thing to measure: a torch model dir, a .gguf file or an onnx model dir."""

    name: str
    format: str  # torch | gguf | onnx
    quant: str  # fp32, f16, q8_0, q4_k_m, int8, ...
    path: str
    lora: str = ""  # gguf: a LoRA GGUF llama.cpp applies over `path` at run time (export_gguf.adapter=true)


def run_bench(variants: list[Target], eval_records: list[dict], tokenizer_dir: Path, cfg: Config,
              work: Path, heldout_text: str = "", retrieval: grounded.Retrieval | None = None) -> list[dict]:
    """Measure `variants` (the first is the reference) and return one record each; `retrieval` (the manual and
    settings the eval prompts were grounded with) lets the workers judge answers as the runtime does."""
    work.mkdir(parents=True, exist_ok=True)
    samples_path = work / "samples.json"
    samples_path.write_text(json.dumps(build_samples(eval_records, tokenizer_dir, cfg, heldout_text, retrieval)))
    ref_path = work / "reference.npz"
    records = []
    for i, v in enumerate(variants):
        out = work / f"record-{i}.json"
        cmd = [sys.executable, "-m", "edgeft.bench.worker", json.dumps(asdict(v)), str(samples_path),
               str(ref_path), str(out)] + (["--save-ref"] if i == 0 else [])
        print(f"[bench] {v.name} ({v.format} {v.quant})", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise StageFailure(f"bench: variant {v.name} ({v.path}) failed ({host.describe_exit(proc.returncode)}): "
                               f"{tail[0]}")
        records.append(json.loads(out.read_text()))
    return records


def build_samples(eval_records: list[dict], tokenizer_dir: Path, cfg: Config, heldout_text: str = "",
                  retrieval: grounded.Retrieval | None = None) -> dict:
    """Prompt ids, full ids and answer span of each measured eval record (with its split and, for a grounded
    prompt, the question and its retrieved passages); timing lengths; perplexity ids."""
    fmt = PromptFormatter(tokenizer_dir)
    n_ctx = min(cfg.n_ctx, model_context(tokenizer_dir) or cfg.n_ctx)
    recs = [(i, r) for i, r in enumerate(eval_records, 1)
            if "messages" in r and r["messages"][-1]["role"] == "assistant"]
    if not recs:
        raise UserError("bench: the eval set has no record ending in an assistant answer; nothing to score")
    items, cut, fitted = [], 0, 0
    room = n_ctx - cfg.max_new_tokens
    for n in grounded.stratified([r.get("split") for _, r in recs], cfg.max_samples):
        line, r = recs[n]
        msgs = r["messages"]
        item = {"answer": msgs[-1]["content"], "key": r.get("key")}
        if "split" in r:
            item["split"] = r["split"]
        prompt = whole = fmt.prompt_ids(msgs[:-1])
        if isinstance(r.get("grounding"), dict):
            item["grounding"] = grounded.item_grounding(r, retrieval, line)
            if len(prompt) > room and item["grounding"]["hits"]:  # as `edgeft ask` does: fewer passages
                prompt = grounded.fit(fmt, retrieval, item["grounding"], room)
                fitted += 1
        cut += len(prompt) > room
        full = fmt.encode(fmt.render(msgs))[:n_ctx]  # teacher-forced agreement: the record's own prompt
        items.append({"prompt_ids": prompt[:room], "full_ids": full, "answer_span": [min(len(whole), room), len(full)],
                      **item})
    config = {**asdict(cfg), "n_ctx": n_ctx}
    out = {"config": config, "tokenizer_dir": str(tokenizer_dir), "items": items, "bos_id": fmt.bos_id,
           "prompt_lengths": prompt_lengths(cfg.prompt_lengths, n_ctx, cfg.decode_tokens),
           "ppl_items": perplexity_items(fmt, heldout_text, n_ctx, cfg.ppl_tokens), "prompts_cut": cut,
           "prompts_fitted": fitted}
    if retrieval is not None and any("grounding" in it for it in items):
        out["retrieval"] = retrieval.to_json()
    return out


def perplexity_items(fmt: PromptFormatter, text: str, n_ctx: int, budget: int) -> list[list[int]]:
    """Held-out text as id windows of at most n_ctx (each paragraph from BOS), `budget` tokens in all."""
    out, used = [], 0
    for para in (p.strip() for p in text.splitlines()):
        if not para or used >= budget:
            continue
        ids = fmt.encode(para)
        for i in range(0, len(ids), n_ctx):
            win = ids[i:i + n_ctx][: budget - used + 1]
            if len(win) > 1:
                out.append(win)
                used += len(win) - 1
    return out


def model_context(model_dir: Path) -> int | None:
    """max_position_embeddings from the model's config.json, when it has one."""
    p = Path(model_dir) / "config.json"
    if not p.is_file():
        return None
    return shapes.max_positions(json.loads(p.read_text())) or None
