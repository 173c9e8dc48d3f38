"""Training throughput and peak memory: `edgeft` train vs vanilla transformers Trainer + peft baselines, LoRA and QLoRA.

Same model, same LoRA (r=16, alpha 32, all linear layers), same examples (chat-rendered, loss on answers
only), same optimizer (AdamW, lr, warm-up + cosine, clip 1.0) and batch size 8 on every side. --model picks the
model: by default a 58M-parameter Llama config (hidden 512, 8 layers, 32k vocab, random weights); `smollm2` is
the real SmolLM2-135M-Instruct, imported from the registry's GGUF exactly as the pipeline does (the cached
base_import artifact under EDGEFT_HOME/imported-SHA: weights dequantized to float32); any other value is a
local transformers model dir. --methods lora,qlora picks what is trained (default lora); --sides a subset of
the sides by name.

Baselines (transformers Trainer + peft):
- trainer_defaults: Trainer defaults; each batch padded to its longest example, random order.
- trainer_group_by_length: the strongest padded setup a user would configure: TrainingArguments(
  group_by_length=True) (batches of similar lengths, from windows of 50 batches like edgeft's) and
  model.config.use_cache=False (no KV cache built during training, as edgeft does).
- trainer_padding_free: transformers.DataCollatorWithFlattening (each batch of 8 is one row of
  concatenated examples, position_ids restarting per example, no padding at all), use_cache=False.
  Finding, transformers 4.57 on CPU (sdpa): the flattened row gets no attention_mask; create_causal_mask
  (masking_utils._preprocess_mask_arguments) detects packed sequences from position_ids and builds a
  block-diagonal mask ONLY when past_key_values is None, and LlamaModel.forward creates a DynamicCache
  whenever use_cache is True, which is the config default in training. So with defaults the flattened
  examples attend across each other (not equivalent training); with use_cache=False sdpa gets a dense
  block-diagonal causal mask (equivalent, but every cross-example score is still computed, then masked).
  The script checks this on the model itself before timing (logits of a flattened row vs each example
  alone), records it under "padding_free_check", and labels the side "cross-attends: not equivalent"
  should the check fail.
- trainer_qlora_defaults, trainer_qlora_group_by_length, trainer_qlora_padding_free: the same three with the
  usual peft QLoRA setup: from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32)),
  prepare_model_for_kbit_training(use_gradient_checkpointing=False: peft's default recomputes activations,
  edgeft's train stage does not unless asked, so neither does here), get_peft_model. In training mode
  bitsandbytes dequantizes NF4 and runs a float32 matmul on both sides (its fused bf16 CPU kernel is for
  inference only; edgeft also pins it off for its eval passes, which are disabled here).

edgeft variants: edgeft without packing (length-grouped batches, LM head only on labelled positions),
edgeft with packing (length-aware rows of max_length, attention per sample), and two ablations that show
what each part buys: packing with a 4D block-diagonal mask instead of per-sample attention, and that plus
the model's own full-vocabulary loss. QLoRA: edgeft_qlora and edgeft_qlora_packing, the train stage with
method qlora and the same 4-bit settings (trainer_baselines.QLORA). Ratios compare each edgeft variant with
every baseline of the same method.

Timing, identical on every side: one global torch optimizer-step post-hook (the same event in Trainer
and in edgeft's loop) stamps the end of every optimizer step. A run's time is from the end of step 1 to
the end of step N: the first step is warm-up and excluded on both sides, and so are model load, setup,
saving and teardown; what is timed is N-1 whole steps (batch collation, forward, backward, clipping,
optimizer and scheduler step, logging). Tokens are NON-PADDING tokens (the summed lengths of the examples)
of the batches of steps 2..N, recorded at collation in order on both sides. Every side runs --repeats
times (3), interleaved baseline / edgeft / stronger baseline / edgeft variant ... (LoRA sides, then QLoRA
sides), the order reversed on every other repeat; reported: the median tokens/s, its min, max and spread,
and the ratio of every edgeft variant against every baseline (medians of this same run; per-repeat ratios
alongside).

Memory: every run of every side is a process of its own, forked from a server that imported torch,
transformers, peft and bitsandbytes once (so no side inherits another's high-water mark, and none pays an
interpreter start-up). Its peak RSS (VmHWM: model load, setup and training) is recorded per run; the side's
is the median over its repeats, and the memory ratio is edgeft's peak / the baseline's (below 1: edgeft needs
less). The libraries' own footprint is in every peak alike. On CUDA the peak is torch.cuda.max_memory_allocated
of that process (memory_key in the JSON says which), and every run is a spawned interpreter: a fork cannot use
CUDA once its parent initialized it.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/train_throughput.py \\
        --data /work/shared/data/emanual-tv/qa.jsonl --out runs/bench/train_throughput.json
SmolLM2-135M-Instruct, LoRA and QLoRA, edgeft vs Trainer + peft (the vanilla defaults and group_by_length for
LoRA, group_by_length for QLoRA), tokens/s and peak memory with their ratios, in about 10 minutes on a 2-vCPU
EPYC (estimated from edgeft's 265 tok/s LoRA on SmolLM2 there; every run prints its process_s: scale --steps,
--repeats or --sides to the time there is):

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/train_throughput.py --model smollm2 --methods lora,qlora \\
        --sides trainer_defaults,trainer_group_by_length,edgeft,edgeft_packing,trainer_qlora_group_by_length,edgeft_qlora \\
        --data /work/shared/data/emanual-tv/qa.jsonl --max-length 256 --steps 6 --repeats 2 \\
        --out runs/bench/train_throughput_smollm2.json
Without --data (or when it is missing) it uses the embedded demo manual's QA pairs. --smoke: a tiny model
(hidden 64, 2 layers, its own 512-piece tokenizer), 4 steps, 1 repeat, one torch thread: every code path
(with --methods lora,qlora, every side) in well under a minute; its numbers say nothing about speed or memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_inputs import data_artifact, encode, model_shape, resolve_model  # noqa: E402
from benchmarks.trainer_baselines import (BATCH, LORA, QLORA, StepClock, padding_free_check,  # noqa: E402
                                          run_apart, trainer_run)

DEFAULT_DATA = ""  # the embedded demo QA; pass --data for a real set (the reference used emanual-tv qa.jsonl)
METHODS = ("lora", "qlora")


class Side(NamedTuple):
    """One side: a Trainer baseline (mode set) or an edgeft variant (mode empty), training `method`."""
    method: str  # lora | qlora
    what: str
    mode: str = ""  # Trainer baseline: defaults | group_by_length | padding_free
    packing: bool = False  # edgeft: rows of max_length, attention per sample
    mask4d: bool = False  # edgeft ablation: a 4D block-diagonal mask instead of per-sample attention
    full_logits: bool = False  # edgeft ablation: the model's own full-vocabulary loss


# Baselines first, then the edgeft variants, per method; the interleaved order alternates the two.
_QL = "QLoRA (NF4 base): "
SIDES = {
    "trainer_defaults": Side("lora", "Trainer defaults: batches padded to their longest example, random order",
                             mode="defaults"),
    "trainer_group_by_length": Side("lora", "Trainer group_by_length=True + use_cache=False: padded, similar "
                                    "lengths batched", mode="group_by_length"),
    "trainer_padding_free": Side("lora", "Trainer + DataCollatorWithFlattening (padding-free, position_ids), "
                                 "use_cache=False", mode="padding_free"),
    "edgeft": Side("lora", "edgeft: length-grouped batches, LM head on labelled positions only"),
    "edgeft_packing": Side("lora", "edgeft packing: rows of max_length, attention per sample (varlen)", packing=True),
    "edgeft_packing_mask4d": Side("lora", "ablation: packing with a 4D block-diagonal mask instead of varlen",
                                  packing=True, mask4d=True),
    "edgeft_packing_mask4d_full_logits": Side("lora", "ablation: packing, 4D mask and the model's full-vocabulary "
                                              "loss", packing=True, mask4d=True, full_logits=True),
    "trainer_qlora_defaults": Side("qlora", _QL + "Trainer defaults, padded batches, random order", mode="defaults"),
    "trainer_qlora_group_by_length": Side("qlora", _QL + "Trainer group_by_length=True + use_cache=False",
                                          mode="group_by_length"),
    "trainer_qlora_padding_free": Side("qlora", _QL + "Trainer + DataCollatorWithFlattening, use_cache=False",
                                       mode="padding_free"),
    "edgeft_qlora": Side("qlora", _QL + "edgeft: length-grouped batches, LM head on labelled positions only"),
    "edgeft_qlora_packing": Side("qlora", _QL + "edgeft packing: rows of max_length, attention per sample",
                                 packing=True),
}
NOT_EQUIVALENT = " (cross-attends: not equivalent)"


def main() -> None:
    """Run every side --repeats times, each run in its own process, interleaved; print medians, spread, peak
    memory and ratios; write JSON."""
    from edgeft import host

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="", help="'' (the 58M random config), 'smollm2' (SmolLM2-135M-Instruct, "
                                                "imported as the pipeline does) or a local transformers model dir")
    ap.add_argument("--methods", default="", help="comma list of lora, qlora (default: lora, or those of --sides)")
    ap.add_argument("--sides", default="", help=f"comma list of sides to run (default: every side of --methods): "
                                                f"{', '.join(SIDES)}")
    ap.add_argument("--data", default=DEFAULT_DATA, help="JSONL of any edgeft format (default: the embedded demo QA)")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps of batch 8 per unpacked run (>= 2)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example / packed row")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--repeats", type=int, default=3, help="runs of every side, interleaved")
    ap.add_argument("--work", default="/tmp/edgeft-bench-train", help="scratch dir (model, data artifact)")
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    ap.add_argument("--skip-ablation", action="store_true", help="skip the two ablation variants")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model, 4 steps, 1 repeat, max_length 128: exercises every path, measures nothing")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.max_length = 4, 1, 128
        # one thread, here and in every side's process: a tiny model's steps are all thread synchronisation,
        # which stalls for seconds per step on a busy machine (smoke measures nothing anyway)
        os.environ["OMP_NUM_THREADS"] = "1"
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be >= 2 (step 1 is warm-up, never timed) and --repeats >= 1")
    if args.smoke and args.model:
        ap.error("--smoke builds its own tiny model; drop --model")
    names, methods = select_sides(ap, args)

    import torch

    cpu = host.cpu_model()
    print(f"cpu: {cpu}", flush=True)
    started = time.time()
    work = Path(args.work) / ("smoke" if args.smoke else "")
    model_dir, model_info = resolve_model(args.model, work, args.smoke)
    data_art, source = data_artifact(args.data, work)
    examples = encode(model_dir, data_art, args.max_length)
    mean_len = sum(len(x) for x, _ in examples) / len(examples)
    print(f"model: {model_info['name']} ({model_dir}); data: {source}: {len(examples)} train examples, mean "
          f"{mean_len:.1f} tokens; torch threads {torch.get_num_threads()}", flush=True)

    pf = None
    if any(SIDES[n].mode == "padding_free" for n in names):
        pf = padding_free_check(model_dir, examples)
        print(f"padding-free check: {pf['finding']}", flush=True)
    what = {n: SIDES[n].what + (NOT_EQUIVALENT if pf and SIDES[n].mode == "padding_free" and not pf["equivalent"]
                                else "") for n in names}

    packed_steps = max(3, round(args.steps * BATCH * mean_len / (BATCH * args.max_length)))  # about the same tokens
    order = [n for m in methods for n in interleave([n for n in names if SIDES[n].method == m and SIDES[n].mode],
                                                    [n for n in names if SIDES[n].method == m and not SIDES[n].mode])]
    runs: dict[str, list] = {name: [] for name in order}
    orders = []
    for rep in range(args.repeats):
        this = order if rep % 2 == 0 else order[::-1]
        orders.append(this)
        for name in this:
            r = {"repeat": rep, **run_apart(run_side, name, model_dir, data_art, work, examples, args, packed_steps)}
            runs[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: {r}", flush=True)

    cuda = torch.cuda.is_available()
    memory_key = "peak_cuda_mb" if cuda else "peak_rss_mib"
    sides = {name: summarize(name, what[name], runs[name], memory_key) for name in names}
    ratios, per_repeat, memory_ratios = ratio_tables(sides)
    report(cpu, model_info, sides, ratios, per_repeat, memory_ratios, memory_key, pf)
    wall = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "smoke": args.smoke, "host": host.describe(), "data": source, "examples": len(examples),
        "mean_tokens": round(mean_len, 1), "model": {**model_info, "path": str(model_dir), **model_shape(model_dir)},
        "methods": methods, "lora": LORA, "qlora": QLORA if "qlora" in methods else None, "batch_size": BATCH,
        "max_length": args.max_length, "steps": args.steps, "packed_steps": packed_steps, "repeats": args.repeats,
        "order": orders, "torch_threads": torch.get_num_threads(), "device": "cuda" if cuda else "cpu",
        "timing": "end of optimizer step 1 to end of step N (global torch optimizer-step post-hook, same on every "
                  "side); step 1 is warm-up, excluded on every side; setup, model load, saving excluded",
        "tokens": "non-padding tokens (summed example lengths) of the batches of steps 2..N, recorded at collation",
        "memory_key": memory_key,
        "memory": "peak of each run's own process (forked from a server that imported the libraries; spawned on "
                  "CUDA): peak RSS (VmHWM) in peak_rss_mib, torch.cuda.max_memory_allocated in peak_cuda_mb on "
                  "CUDA; model load, setup and training included; a side's peak is the median over its repeats",
        "ratio": "median tokens/s of the edgeft variant / median tokens/s of the baseline of the same method, this run",
        "memory_ratio": "peak memory (memory_key) of the edgeft variant / that of the baseline of the same method, "
                        "this run; below 1: edgeft needs less",
        "padding_free_check": pf, "sides": sides, "ratios": ratios, "ratios_per_repeat": per_repeat,
        "memory_ratios": memory_ratios, "wall_s": wall}, indent=2) + "\n")
    print(f"wall time {wall:.0f} s; wrote {out}")


def select_sides(ap, args) -> tuple[list, list]:
    """The side names to run (in SIDES order) and their methods, from --sides, --methods and --skip-ablation."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    names = [n.strip() for n in args.sides.split(",") if n.strip()]
    if set(methods) - set(METHODS):
        ap.error(f"--methods: {', '.join(sorted(set(methods) - set(METHODS)))} unknown; choose from {', '.join(METHODS)}")
    if set(names) - set(SIDES):
        ap.error(f"--sides: {', '.join(sorted(set(names) - set(SIDES)))} unknown; choose from {', '.join(SIDES)}")
    if names and methods and {SIDES[n].method for n in names} - set(methods):
        off = [n for n in names if SIDES[n].method not in methods]
        ap.error(f"--sides {', '.join(off)}: not a method of --methods {args.methods}; add their method "
                 "(lora or qlora) to --methods, or drop --methods")
    methods = methods or sorted({SIDES[n].method for n in names}, key=METHODS.index) or ["lora"]
    names = [n for n, s in SIDES.items() if (n in names if names else s.method in methods)
             and not (args.skip_ablation and s.mask4d)]
    for m in methods:
        kinds = {bool(SIDES[n].mode) for n in names if SIDES[n].method == m}
        if kinds != {True, False}:
            ap.error(f"{m}: needs at least one trainer_ baseline and one edgeft side to compare; pick both in --sides")
    return names, methods


def run_side(name: str, model_dir: Path, data_art, work: Path, examples: list, args, packed_steps: int) -> dict:
    """One run of side `name` (in the process run_apart gives it)."""
    s = SIDES[name]
    if s.mode:
        return trainer_run(model_dir, examples, args, s.mode, s.method)
    return edgeft_run(model_dir, data_art, work, args, packed_steps if s.packing else args.steps, s.method,
                      packing=s.packing, mask4d=s.mask4d, full_logits=s.full_logits)


def interleave(baselines: list, variants: list) -> list:
    """baseline, variant, baseline, variant, ... then the variants left over."""
    out = []
    for i in range(max(len(baselines), len(variants))):
        out += baselines[i:i + 1] + variants[i:i + 1]
    return out


def summarize(name: str, what: str, runs: list, memory_key: str) -> dict:
    """Median tokens/s over the repeats, its min/max and spread ((max - min) / median); median peak memory."""
    rates = [r["tokens_per_s"] for r in runs]
    med = round(statistics.median(rates), 1)
    peaks = {k: round(statistics.median(r[k] for r in runs), 1) for k in ("peak_rss_mib", "peak_cuda_mb")
             if all(r.get(k) is not None for r in runs)}
    return {"kind": "baseline" if SIDES[name].mode else "edgeft", "method": SIDES[name].method, "what": what,
            "steps": runs[0]["steps"], "timed_steps": runs[0]["timed_steps"],
            "tokens_per_s": med, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "spread_pct": round(100 * (max(rates) - min(rates)) / med, 1),
            "padding_share": runs[0]["padding_share"], **peaks, "peak_memory": peaks[memory_key], "runs": runs}


def ratio_tables(sides: dict) -> tuple[dict, dict, dict]:
    """{variant: {baseline of its method: ratio of the median tokens/s}}, the same per repeat (paired runs), and
    {variant: {baseline: ratio of the peak memories}}."""
    ratios, per_repeat, memory = {}, {}, {}
    for v, sv in sides.items():
        if sv["kind"] != "edgeft":
            continue
        base = [b for b, sb in sides.items() if sb["kind"] == "baseline" and sb["method"] == sv["method"]]
        ratios[v] = {b: round(sv["tokens_per_s"] / sides[b]["tokens_per_s"], 3) for b in base}
        per_repeat[v] = {b: [round(rv["tokens_per_s"] / rb["tokens_per_s"], 3)
                             for rv, rb in zip(sv["runs"], sides[b]["runs"])] for b in base}
        memory[v] = {b: round(sv["peak_memory"] / sides[b]["peak_memory"], 3) for b in base}
    return ratios, per_repeat, memory


def report(cpu: str, model: dict, sides: dict, ratios: dict, per_repeat: dict, memory_ratios: dict,
           memory_key: str, pf: dict | None) -> None:
    """The CPU, the sides (what each is, median tokens/s, spread, peak memory) and every variant's tokens/s and
    memory ratio against every baseline of its method."""
    print(f"\ncpu: {cpu}; model: {model['name']} ({model['weights']} weights)")
    mem = "peak RSS MiB" if memory_key == "peak_rss_mib" else "peak CUDA MiB"
    print(f"side                               non-pad tok/s (median)   min .. max     spread  padding  steps "
          f"{mem:>14s}")
    for name, s in sides.items():
        print(f"{name:34s} {s['tokens_per_s']:14.1f} {s['tokens_per_s_min']:12.1f} .. {s['tokens_per_s_max']:<9.1f}"
              f"{s['spread_pct']:5.1f}% {s['padding_share']:8.2f} {s['steps']:4d} {s['peak_memory']:14.1f}")
    print()
    for name, s in sides.items():
        print(f"  {name}: {s['what']}")
    for method in dict.fromkeys(s["method"] for s in sides.values()):
        rows = {v: r for v, r in ratios.items() if sides[v]["method"] == method}
        base = list(next(iter(rows.values())))
        head = "".join(f"{b.removeprefix('trainer_').removeprefix('qlora_'):>18s}" for b in base)
        print(f"\n{method}: tokens/s ratio (median / median)  {head}")
        for v, row in rows.items():
            print(f"{v:42s} " + "".join(f"{row[b]:17.2f}x" for b in base))
        print(f"{method}: peak memory ratio (edgeft / baseline)" + " " * 3 + head)
        for v in rows:
            print(f"{v:42s} " + "".join(f"{memory_ratios[v][b]:17.2f}x" for b in base))
        print("per-repeat tokens/s ratios: " + "; ".join(f"{v} vs {b}: {per_repeat[v][b]}" for v in rows for b in base))
    if pf:
        print(f"padding-free: {pf['finding']}")


@contextmanager
def _ablation(mask4d: bool, full_logits: bool):
    """edgeft with packed rows carrying a 4D mask (no varlen) and/or the model's own full-vocabulary loss."""
    from edgeft.training import batching

    saved = batching.use_varlen, batching._PLAIN_HEAD_TYPES
    try:
        if mask4d:
            batching.use_varlen = lambda model: None
        if full_logits:
            batching._PLAIN_HEAD_TYPES = ()
        yield
    finally:
        batching.use_varlen, batching._PLAIN_HEAD_TYPES = saved


def edgeft_run(model_dir: Path, data_art, work: Path, args, steps: int, method: str, packing: bool,
               mask4d: bool = False, full_logits: bool = False) -> dict:
    """The edgeft train stage (LoRA r=16 all-linear; QLoRA: on the QLORA 4-bit base) for `steps` optimizer steps
    of batch 8."""
    from edgeft.stages import train
    from edgeft.training import loop

    cfg = train.Config(method=method, lora_r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                       **QLORA, batch_size=BATCH, max_length=args.max_length, lr=args.lr, max_steps=steps,
                       packing=packing, eval_samples=0, log_every=1, seed=0)
    out = work / f"train-{method}-{'packed' if packing else 'grouped'}-{time.time_ns()}"
    clock = StepClock()
    collate = loop._collate

    def counted(*a, **kw):
        batch, n_tok = collate(*a, **kw)
        clock.batch(n_tok, batch["input_ids"].numel())
        return batch, n_tok

    loop._collate = counted
    try:
        with _ablation(mask4d, full_logits), clock:
            m = train.run(str(model_dir), cfg, out, data=data_art).metrics
    finally:
        loop._collate = collate
        shutil.rmtree(out, ignore_errors=True)
    return {**clock.result(steps), "final_loss": m["train_loss"], "peak_cuda_mb": m.get("peak_cuda_mb"),
            "trainable_params": m["trainable_params"], "loop_tokens_per_s": m["tokens_per_s"]}


if __name__ == "__main__":
    main()
