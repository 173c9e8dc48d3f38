"""Training throughput: `edgeft` train vs vanilla transformers Trainer + peft baselines, timed the same way.

Same model (a 58M-parameter Llama config: hidden 512, 8 layers, 32k vocab, random weights), same LoRA
(r=16, alpha 32, all linear layers), same examples (chat-rendered, loss on answers only), same optimizer
(AdamW, lr, warm-up + cosine, clip 1.0) and batch size 8 on every side.

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

edgeft variants: edgeft without packing (length-grouped batches, LM head only on labelled positions),
edgeft with packing (length-aware rows of max_length, attention per sample), and two ablations that show
what each part buys: packing with a 4D block-diagonal mask instead of per-sample attention, and that plus
the model's own full-vocabulary loss.

Timing, identical on every side: one global torch optimizer-step post-hook (the same event in Trainer
and in edgeft's loop) stamps the end of every optimizer step. A run's time is from the end of step 1 to
the end of step N: the first step is warm-up and excluded on both sides, and so are model load, setup,
saving and teardown; what is timed is N-1 whole steps (batch collation, forward, backward, clipping,
optimizer and scheduler step, logging). Tokens are NON-PADDING tokens (the summed lengths of the examples)
of the batches of steps 2..N, recorded at collation in order on both sides. Every side runs --repeats
times (3), interleaved baseline / edgeft / stronger baseline / edgeft variant ..., the order reversed on
every other repeat; reported: the median tokens/s, its min, max and spread, and the ratio of every edgeft
variant against every baseline (medians of this same run; per-repeat ratios alongside).

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/train_throughput.py \\
        --data /work/shared/data/emanual-tv/qa.jsonl --out runs/bench/train_throughput.json
Without --data (or when it is missing) it uses the embedded demo manual's QA pairs. --smoke: a tiny model
(hidden 64, 2 layers, its own 512-piece tokenizer), 4 steps, 1 repeat: every code path in well under a
minute; its numbers say nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.trainer_baselines import BATCH, LORA, StepClock, padding_free_check, trainer_run  # noqa: E402

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=2048)
SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=512)
SMOKE_VOCAB = 512
DEFAULT_DATA = ""  # the embedded demo QA; pass --data for a real set (the reference used emanual-tv qa.jsonl)

# name -> what it is. Baselines first; the interleaved order alternates them with the edgeft variants.
BASELINES = {
    "trainer_defaults": "Trainer defaults: batches padded to their longest example, random order",
    "trainer_group_by_length": "Trainer group_by_length=True + use_cache=False: padded, similar lengths batched",
    "trainer_padding_free": "Trainer + DataCollatorWithFlattening (padding-free, position_ids), use_cache=False",
}
VARIANTS = {
    "edgeft": "edgeft: length-grouped batches, LM head on labelled positions only",
    "edgeft_packing": "edgeft packing: rows of max_length, attention per sample (varlen)",
    "edgeft_packing_mask4d": "ablation: packing with a 4D block-diagonal mask instead of varlen",
    "edgeft_packing_mask4d_full_logits": "ablation: packing, 4D mask and the model's full-vocabulary loss",
}
NOT_EQUIVALENT = " (cross-attends: not equivalent)"


def main() -> None:
    """Run every side --repeats times, interleaved; print medians, spread and ratios; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
    if args.steps < 2 or args.repeats < 1:
        ap.error("--steps must be >= 2 (step 1 is warm-up, never timed) and --repeats >= 1")

    import torch

    started = time.time()
    work = Path(args.work)
    if args.smoke:
        work = work / "smoke"
        model_dir = build_model(work / "model-smoke", config=SMOKE_CONFIG, tokenizer=smoke_tokenizer(work))
    else:
        model_dir = build_model(work / "model58m")
    data_art, source = data_artifact(args.data, work)
    examples = encode(model_dir, data_art, args.max_length)
    mean_len = sum(len(x) for x, _ in examples) / len(examples)
    print(f"data: {source}: {len(examples)} train examples, mean {mean_len:.1f} tokens; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    pf = padding_free_check(model_dir, examples)
    print(f"padding-free check: {pf['finding']}", flush=True)
    what = {**BASELINES, **VARIANTS}
    if not pf["equivalent"]:
        what["trainer_padding_free"] += NOT_EQUIVALENT

    packed_steps = max(3, round(args.steps * BATCH * mean_len / (BATCH * args.max_length)))  # about the same tokens
    runners = {
        "trainer_defaults": lambda: trainer_run(model_dir, examples, args, "defaults"),
        "trainer_group_by_length": lambda: trainer_run(model_dir, examples, args, "group_by_length"),
        "trainer_padding_free": lambda: trainer_run(model_dir, examples, args, "padding_free"),
        "edgeft": lambda: edgeft_run(model_dir, data_art, work, args, args.steps, packing=False),
        "edgeft_packing": lambda: edgeft_run(model_dir, data_art, work, args, packed_steps, packing=True),
        "edgeft_packing_mask4d": lambda: edgeft_run(model_dir, data_art, work, args, packed_steps, packing=True,
                                                    mask4d=True),
        "edgeft_packing_mask4d_full_logits": lambda: edgeft_run(model_dir, data_art, work, args, packed_steps,
                                                                packing=True, mask4d=True, full_logits=True),
    }
    variants = [v for v in VARIANTS if not (args.skip_ablation and "mask4d" in v)]
    order = interleave(list(BASELINES), variants)
    runs: dict[str, list] = {name: [] for name in order}
    orders = []
    for rep in range(args.repeats):
        this = order if rep % 2 == 0 else order[::-1]
        orders.append(this)
        for name in this:
            r = {"repeat": rep, **runners[name]()}
            runs[name].append(r)
            print(f"[{rep + 1}/{args.repeats}] {name}: {r}", flush=True)
            gc.collect()

    sides = {name: summarize("baseline" if name in BASELINES else "edgeft", what[name], runs[name])
             for name in [*BASELINES, *variants]}
    ratios, per_repeat = ratio_tables(sides, list(BASELINES), variants)
    report(sides, ratios, per_repeat, pf)
    wall = round(time.time() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = SMOKE_CONFIG if args.smoke else CONFIG
    out.write_text(json.dumps({
        "smoke": args.smoke, "data": source, "examples": len(examples), "mean_tokens": round(mean_len, 1),
        "model": {**cfg, "vocab_size": vocab_size(model_dir), "params": n_params(model_dir)},
        "lora": LORA, "batch_size": BATCH, "max_length": args.max_length, "steps": args.steps,
        "packed_steps": packed_steps, "repeats": args.repeats, "order": orders,
        "torch_threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu",
        "timing": "end of optimizer step 1 to end of step N (global torch optimizer-step post-hook, same on every "
                  "side); step 1 is warm-up, excluded on every side; setup, model load, saving excluded",
        "tokens": "non-padding tokens (summed example lengths) of the batches of steps 2..N, recorded at collation",
        "ratio": "median tokens/s of the edgeft variant / median tokens/s of the baseline, this run",
        "padding_free_check": pf, "sides": sides, "ratios": ratios, "ratios_per_repeat": per_repeat,
        "wall_s": wall}, indent=2) + "\n")
    print(f"wall time {wall:.0f} s; wrote {out}")


def interleave(baselines: list, variants: list) -> list:
    """baseline, variant, baseline, variant, ... then the variants left over."""
    out = []
    for i in range(max(len(baselines), len(variants))):
        out += baselines[i:i + 1] + variants[i:i + 1]
    return out


def summarize(kind: str, what: str, runs: list) -> dict:
    """Median tokens/s over the repeats, its min/max and spread ((max - min) / median)."""
    rates = [r["tokens_per_s"] for r in runs]
    med = round(statistics.median(rates), 1)
    return {"kind": kind, "what": what, "steps": runs[0]["steps"], "timed_steps": runs[0]["timed_steps"],
            "tokens_per_s": med, "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates),
            "spread_pct": round(100 * (max(rates) - min(rates)) / med, 1),
            "padding_share": runs[0]["padding_share"], "runs": runs}


def ratio_tables(sides: dict, baselines: list, variants: list) -> tuple[dict, dict]:
    """{variant: {baseline: ratio of the reported medians}}, and the same per repeat (paired runs)."""
    ratios, per_repeat = {}, {}
    for v in variants:
        ratios[v] = {b: round(sides[v]["tokens_per_s"] / sides[b]["tokens_per_s"], 3) for b in baselines}
        per_repeat[v] = {b: [round(rv["tokens_per_s"] / rb["tokens_per_s"], 3)
                             for rv, rb in zip(sides[v]["runs"], sides[b]["runs"])] for b in baselines}
    return ratios, per_repeat


def report(sides: dict, ratios: dict, per_repeat: dict, pf: dict) -> None:
    """The sides (what each is, median tokens/s, spread) and every variant's ratio against every baseline."""
    print("\nside                               non-pad tok/s (median)   min .. max     spread  padding  steps")
    for name, s in sides.items():
        print(f"{name:34s} {s['tokens_per_s']:14.1f} {s['tokens_per_s_min']:12.1f} .. {s['tokens_per_s_max']:<9.1f}"
              f"{s['spread_pct']:5.1f}% {s['padding_share']:8.2f} {s['steps']:4d}")
    print()
    for name, s in sides.items():
        print(f"  {name}: {s['what']}")
    base = list(next(iter(ratios.values())))
    print("\nratio (median / median)             " + "".join(f"{b[len('trainer_'):]:>18s}" for b in base))
    for v, row in ratios.items():
        print(f"{v:34s} " + "".join(f"{row[b]:17.2f}x" for b in base))
    print("per-repeat ratios: " + "; ".join(f"{v} vs {b}: {per_repeat[v][b]}" for v in ratios for b in base))
    print(f"padding-free: {pf['finding']}")


def build_model(out: Path, config: dict | None = None, tokenizer: Path | None = None) -> Path:
    """A Llama of `config` (default: the 58M CONFIG) with seeded random weights and `tokenizer`'s vocab
    (default: the benchmarks' 32k tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    if tokenizer is None:
        from benchmarks.common import VOCAB, benchmark_tokenizer

        tokenizer, vocab = benchmark_tokenizer(), VOCAB
    else:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                         rms_norm_eps=1e-5, **(config or CONFIG)))
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in Path(tokenizer).iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def smoke_tokenizer(work: Path) -> Path:
    """A SMOKE_VOCAB-piece tokenizer (chat template included) trained on the demo manual: seconds, offline."""
    from edgeft.demo.manual import generate_manual
    from edgeft.demo.tokenizer import train_tokenizer

    out = work / f"tokenizer-{SMOKE_VOCAB}"
    if (out / "tokenizer.json").is_file():
        return out
    manual = generate_manual(0)
    texts = [t for t in manual.text().splitlines() if t.strip()]
    texts += [q for f in manual.facts for q in f.train_questions] + [f.answer for f in manual.facts]
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, SMOKE_VOCAB, tmp)
    tmp.rename(out)
    return out


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary size from its saved config."""
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def n_params(model_dir: Path) -> int:
    """Parameter count from the saved config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in m.parameters())


def data_artifact(path: str, work: Path):
    """An edgeft data artifact of `path`, or of the embedded demo QA pairs when the file is missing."""
    from edgeft.stages import data

    if path and Path(path).is_file():
        return data.run(None, data.Config(train=path, eval=""), work / "data" / Path(path).stem), path
    from edgeft.demo.manual import write_embedded_data

    src = work / "embedded"
    src.mkdir(parents=True, exist_ok=True)
    write_embedded_data(src, 0)
    return data.run(None, data.Config(train=str(src / "train.jsonl"), eval=""), work / "data" / "embedded"), \
        "embedded demo manual QA (fallback)"


def encode(model_dir: Path, data_art, max_length: int) -> list:
    """The train split as (ids, labels): exactly what the train stage feeds its loop."""
    from edgeft.constants import TRAIN_FILE
    from edgeft.records import read_jsonl
    from edgeft.runtime.prompt import PromptFormatter
    from edgeft.training.examples import encode as _examples

    return _examples(PromptFormatter(model_dir), read_jsonl(data_art.path / TRAIN_FILE), max_length)


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


def edgeft_run(model_dir: Path, data_art, work: Path, args, steps: int, packing: bool, mask4d: bool = False,
               full_logits: bool = False) -> dict:
    """The edgeft train stage (LoRA r=16 all-linear) for `steps` optimizer steps of batch 8."""
    from edgeft.stages import train
    from edgeft.training import loop

    cfg = train.Config(method="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"], target_modules=LORA["target_modules"],
                       batch_size=BATCH, max_length=args.max_length, lr=args.lr, max_steps=steps, packing=packing,
                       eval_samples=0, log_every=1, seed=0)
    out = work / f"train-{'packed' if packing else 'grouped'}-{time.time_ns()}"
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
            "loop_tokens_per_s": m["tokens_per_s"]}


if __name__ == "__main__":
    main()
