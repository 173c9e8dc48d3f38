"""Bench every variant over the eval split: latency, memory and answer quality, one process each.

The first variant is the reference (the tuned model in torch): its greedy tokens and teacher-forced
log-probs on the reference answers are what the other variants' agreement and KL are measured
against. Prompts are rendered and tokenized once here and the same ids are fed to every runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeft.errors import StageFailure
from edgeft.runtime.prompt import PromptFormatter


@dataclass(frozen=True)
class Config:
    max_samples: int = 120  # eval prompts measured (0 = all); spread over the split deterministically
    max_new_tokens: int = 48  # generation cap per prompt
    threads: int = 2  # runtime threads (the profile's)
    n_ctx: int = 512  # runtime context, tokens
    warmup: int = 1  # generations before timing


@dataclass(frozen=True)
class Variant:
    """One thing to measure: a torch model dir, a .gguf file or an onnx model dir."""

    name: str
    format: str  # torch | gguf | onnx
    quant: str  # fp32, f16, q8_0, q4_k_m, int8, ...
    path: str


def run_bench(variants: list[Variant], eval_records: list[dict], tokenizer_dir: Path, cfg: Config,
              work: Path) -> list[dict]:
    """Measure `variants` (the first is the reference) and return one record each."""
    work.mkdir(parents=True, exist_ok=True)
    samples_path = work / "samples.json"
    samples_path.write_text(json.dumps(build_samples(eval_records, tokenizer_dir, cfg)))
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
            raise StageFailure(f"bench: variant {v.name} ({v.path}) failed: {tail[0]}")
        records.append(json.loads(out.read_text()))
    return records


def build_samples(eval_records: list[dict], tokenizer_dir: Path, cfg: Config) -> dict:
    """Prompt ids, full ids and the answer span of each measured eval record."""
    fmt = PromptFormatter(tokenizer_dir)
    recs = [r for r in eval_records if "messages" in r and r["messages"][-1]["role"] == "assistant"]
    if cfg.max_samples and len(recs) > cfg.max_samples:
        step = len(recs) / cfg.max_samples
        recs = [recs[int(i * step)] for i in range(cfg.max_samples)]
    items = []
    for r in recs:
        msgs = r["messages"]
        prompt = fmt.prompt_ids(msgs[:-1])
        full = fmt.encode(fmt.render(msgs))[: cfg.n_ctx]
        items.append({"prompt_ids": prompt, "full_ids": full, "answer_span": [len(prompt), len(full)],
                      "answer": msgs[-1]["content"], "key": r.get("key")})
    return {"config": asdict(cfg), "tokenizer_dir": str(tokenizer_dir), "items": items}
