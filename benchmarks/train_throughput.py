"""Training throughput: `edgeft` train vs a vanilla transformers Trainer + peft baseline.

Same model (a 58M-parameter Llama config: hidden 512, 8 layers, 32k vocab, random weights), same LoRA
(r=16, alpha 32, all linear layers), same examples (chat-rendered, loss on answers only), same optimizer
(AdamW, lr, warm-up + cosine, clip 1.0) and batch size 8. The baseline pads each batch to its longest
example, in random order, as `Trainer` does by default. Throughput counts NON-PADDING tokens per second
of the training loop; the ratios are against the baseline measured in this same run.

Variants: edgeft without packing (length-grouped batches, LM head only on labelled positions), edgeft
with packing (length-aware rows of max_length, attention per sample), and two ablations that show what
each part buys: packing with a 4D block-diagonal mask instead of per-sample attention, and that plus
the model's own full-vocabulary loss.

    flock /tmp/edgeft-heavy.lock .venv/bin/python benchmarks/train_throughput.py \\
        --data /work/shared/data/emanual-tv/qa.jsonl --out runs/bench/train_throughput.json
Without --data (or when it is missing) it uses the embedded demo manual's QA pairs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=2048)
DEFAULT_DATA = ""  # the embedded demo QA; pass --data for a real set (the reference used emanual-tv qa.jsonl)


def main() -> None:
    """Run the baseline and the edgeft variants; print tokens/s and ratios; write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA, help="JSONL of any edgeft format (default: the embedded demo QA)")
    ap.add_argument("--steps", type=int, default=16, help="baseline optimizer steps (batch 8)")
    ap.add_argument("--max-length", type=int, default=512, help="tokens per example / packed row")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="/tmp/edgeft-bench-train", help="scratch dir (model, data artifact)")
    ap.add_argument("--out", default="runs/bench/train_throughput.json")
    ap.add_argument("--skip-ablation", action="store_true", help="skip the two ablation variants")
    args = ap.parse_args()

    import torch

    work = Path(args.work)
    model_dir = build_model(work / "model58m")
    data_art, source = data_artifact(args.data, work)
    examples = encode(model_dir, data_art, args.max_length)
    mean_len = sum(len(x) for x, _ in examples) / len(examples)
    print(f"data: {source}: {len(examples)} train examples, mean {mean_len:.1f} tokens; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    results = {"baseline_trainer": baseline(model_dir, examples, args)}
    packed_steps = max(3, round(args.steps * 8 * mean_len / (8 * args.max_length)))  # about the same tokens
    results["edgeft"] = edgeft(model_dir, data_art, work, args, args.steps, packing=False)
    results["edgeft_packing"] = edgeft(model_dir, data_art, work, args, packed_steps, packing=True)
    if not args.skip_ablation:
        from edgeft.training import batching

        saved = batching.use_varlen, batching._PLAIN_HEAD_TYPES
        try:
            batching.use_varlen = lambda model: None  # packed rows carry a 4D mask
            results["edgeft_packing_mask4d"] = edgeft(model_dir, data_art, work, args, packed_steps, packing=True)
            batching._PLAIN_HEAD_TYPES = ()  # and the model's own loss: vocabulary logits at every position
            results["edgeft_packing_mask4d_full_logits"] = edgeft(model_dir, data_art, work, args, packed_steps,
                                                                  packing=True)
        finally:
            batching.use_varlen, batching._PLAIN_HEAD_TYPES = saved
    base = results["baseline_trainer"]["tokens_per_s"]
    for r in results.values():
        r["ratio_vs_baseline"] = round(r["tokens_per_s"] / base, 3)
    print("\nvariant                            non-pad tok/s   ratio   padding share   steps")
    for name, r in results.items():
        print(f"{name:34s} {r['tokens_per_s']:12.1f} {r['ratio_vs_baseline']:7.2f}x "
              f"{r.get('padding_share') or 0:13.2f} {r['steps']:7d}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": source, "examples": len(examples), "mean_tokens": round(mean_len, 1),
                               "model": {**CONFIG, "vocab_size": 32000, "params": n_params(model_dir)},
                               "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"}, "batch_size": 8,
                               "max_length": args.max_length, "torch_threads": torch.get_num_threads(),
                               "device": "cuda" if torch.cuda.is_available() else "cpu", "results": results},
                              indent=2) + "\n")
    print(f"wrote {out}")


def build_model(out: Path) -> Path:
    """The 58M Llama config with seeded random weights and the benchmarks' 32k tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import VOCAB, benchmark_tokenizer

    if (out / "config.json").is_file():
        return out
    tok = benchmark_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                                         rms_norm_eps=1e-5, **CONFIG))
    model.save_pretrained(out, safe_serialization=True)
    for f in tok.iterdir():
        shutil.copy2(f, out / f.name)
    return out


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


def baseline(model_dir: Path, examples: list, args) -> dict:
    """transformers Trainer + peft LoRA, batches padded to their longest example, random order."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules="all-linear"))
    counts = {"real": 0, "padded": 0}

    def collate(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        counts["real"] += int(mask.sum())
        counts["padded"] += mask.numel()
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    ds = [{"input_ids": x, "labels": y} for x, y in examples]
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=8, max_steps=args.steps,
                                  learning_rate=args.lr, warmup_ratio=0.03, lr_scheduler_type="cosine",
                                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", save_strategy="no",
                                  report_to=[], logging_steps=max(1, args.steps // 4), use_cpu=not torch.cuda.is_available(),
                                  dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate)
        t0 = time.time()
        out = trainer.train()
        wall = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    r = {"tokens": counts["real"], "train_s": round(wall, 2), "tokens_per_s": round(counts["real"] / wall, 1),
         "padding_share": round(1 - counts["real"] / counts["padded"], 3), "steps": args.steps,
         "final_loss": round(out.training_loss, 4), "peak_cuda_mb": peak}
    print(f"baseline Trainer: {r}", flush=True)
    return r


def edgeft(model_dir: Path, data_art, work: Path, args, steps: int, packing: bool) -> dict:
    """The edgeft train stage (LoRA r=16 all-linear) for `steps` optimizer steps of batch 8."""
    from edgeft.stages import train

    cfg = train.Config(method="lora", lora_r=16, lora_alpha=32, target_modules="all-linear", batch_size=8,
                       max_length=args.max_length, lr=args.lr, max_steps=steps, packing=packing, eval_samples=0,
                       log_every=1, seed=0)
    out = work / f"train-{'packed' if packing else 'grouped'}-{time.time_ns()}"
    art = train.run(str(model_dir), cfg, out, data=data_art)
    m = art.metrics
    shutil.rmtree(out, ignore_errors=True)
    rows = steps * 8
    r = {"tokens": m["tokens"], "train_s": m["train_s"], "tokens_per_s": m["tokens_per_s"], "steps": steps,
         "final_loss": m["train_loss"], "peak_cuda_mb": m.get("peak_cuda_mb"),
         "padding_share": round(1 - m["tokens"] / (rows * args.max_length), 3) if packing else None}
    print(f"edgeft packing={packing}: {r}", flush=True)
    return r


if __name__ == "__main__":
    main()
