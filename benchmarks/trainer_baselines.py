"""The transformers Trainer + peft baselines of benchmarks/train_throughput.py, and what they share with edgeft's side.

BATCH, LORA and QLORA are the settings of every side; StepClock times every side the same way (a global torch
optimizer-step post-hook, tokens counted at collation); run_apart runs every side in a process of its own and
adds that process's peak memory; padding_free_check tests on the model itself whether
DataCollatorWithFlattening's rows keep their examples apart (see train_throughput.py's docstring for the
finding); trainer_run runs one Trainer baseline, LoRA or QLoRA.
"""

from __future__ import annotations

import gc
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BATCH = 8
LORA = {"r": 16, "alpha": 32, "target_modules": "all-linear"}
# QLoRA's 4-bit base on every qlora side, named as edgeft's train.Config fields: NF4 with double quantization,
# computing in float32 (bitsandbytes 0.50 runs NF4 on CPU too)
QLORA = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
# imported once by the fork server every side's process starts from: a side pays no interpreter start-up
_PRELOAD = ["torch", "transformers.trainer", "transformers.models.llama.modeling_llama", "peft", "bitsandbytes",
            "edgeft.stages.train"]
_context = None


class StepClock:
    """End-of-optimizer-step times (a global torch hook: the same event in Trainer and in edgeft's loop)
    and per-batch token counts in collation order (batch k is consumed by step k: no grad accumulation)."""

    def __init__(self):
        self.ends: list[float] = []
        self.batches: list[tuple[int, int]] = []  # (non-padding tokens, tensor positions)

    def __enter__(self):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        cuda = torch.cuda.is_available()

        def stamp(opt, a, kw) -> None:
            if cuda:
                torch.cuda.synchronize()  # the step's kernels have finished, not merely been queued
            self.ends.append(time.perf_counter())

        self._handle = register_optimizer_step_post_hook(stamp)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def batch(self, tokens: int, positions: int) -> None:
        self.batches.append((tokens, positions))

    def result(self, steps: int) -> dict:
        """Steps 2..N: their time, their non-padding tokens, tokens/s; padding share over steps 1..N."""
        if len(self.ends) != steps or len(self.batches) < steps:
            raise RuntimeError(f"expected {steps} optimizer steps and batches, saw {len(self.ends)} steps and "
                               f"{len(self.batches)} batches")
        timed = self.ends[-1] - self.ends[0]
        tokens = sum(t for t, _ in self.batches[1:steps])
        real, positions = sum(t for t, _ in self.batches[:steps]), sum(p for _, p in self.batches[:steps])
        return {"steps": steps, "timed_steps": steps - 1, "timed_s": round(timed, 3), "tokens": tokens,
                "tokens_per_s": round(tokens / timed, 1), "padding_share": round(1 - real / positions, 3)}


def run_apart(fn, *args, **kwargs) -> dict:
    """fn(*args, **kwargs) -> dict, run in a process of its own (forked from a server holding the imported
    libraries; on a CUDA host, spawned), with that process's peak RSS (VmHWM, MiB: model load, setup and
    training included) and its wall time in it (process_s: what a run costs, not what is timed) added."""
    global _context
    if _context is None:
        import torch

        if torch.cuda.is_available():
            # a forked child cannot use CUDA once its parent initialized it, and on a CUDA host the preloaded
            # libraries do: each run starts a fresh interpreter instead (outside the timed steps either way)
            _context = multiprocessing.get_context("spawn")
        else:
            _context = multiprocessing.get_context("forkserver")  # clean: no thread pool of this process is forked
            _context.set_forkserver_preload(_PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=_context) as pool:
        return pool.submit(_measured, fn, args, kwargs).result()


def _measured(fn, args: tuple, kwargs: dict) -> dict:
    from benchmarks.common import peak_rss_mib

    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return {**out, "peak_rss_mib": round(peak_rss_mib(), 1), "process_s": round(time.perf_counter() - started, 1)}


def padding_free_check(model_dir: Path, examples: list, tol: float = 1e-4) -> dict:
    """Does a DataCollatorWithFlattening row give each example's own logits (no attention across examples)?

    Checked on this model, as Trainer calls it (no attention_mask, no use_cache argument), with the
    config's default use_cache=True and with use_cache=False.
    """
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    picked = sorted(examples[:16], key=lambda e: len(e[0]))
    picked = [picked[0], picked[len(picked) // 2], picked[-1]]  # three lengths
    batch = DataCollatorWithFlattening()([{"input_ids": x, "labels": y} for x, y in picked])
    diffs = {}
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([x]), use_cache=False).logits[0] for x, _ in picked]
        for use_cache in (True, False):
            model.config.use_cache = use_cache
            flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
            at, worst = 0, 0.0
            for ref in alone:
                worst = max(worst, float((flat[at:at + len(ref)] - ref).abs().max()))
                at += len(ref)
            diffs[use_cache] = worst
    attn = model.config._attn_implementation
    import transformers

    equivalent = diffs[False] <= tol
    finding = (f"transformers {transformers.__version__}, attention '{attn}': a flattened row vs each example alone, "
               f"max |logit diff| {diffs[True]:.2e} with the default use_cache=True "
               f"({'isolated' if diffs[True] <= tol else 'CROSS-ATTENDS: a DynamicCache disables the packed-sequence mask'}), "
               f"{diffs[False]:.2e} with use_cache=False "
               f"({'isolated: block-diagonal mask from position_ids' if equivalent else 'CROSS-ATTENDS'}); "
               f"the padding-free baseline runs with use_cache=False"
               + ("" if equivalent else ": NOT equivalent training, reported anyway"))
    del model
    gc.collect()
    return {"transformers": transformers.__version__, "attn_implementation": attn, "tolerance": tol,
            "max_abs_logit_diff_use_cache_true": diffs[True], "max_abs_logit_diff_use_cache_false": diffs[False],
            "isolated_with_default_use_cache": diffs[True] <= tol, "equivalent": equivalent, "finding": finding}


def trainer_run(model_dir: Path, examples: list, args, mode: str, method: str = "lora") -> dict:
    """transformers Trainer + peft LoRA (method lora) or QLoRA (method qlora) for args.steps optimizer steps;
    mode: defaults | group_by_length | padding_free."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorWithFlattening, Trainer, TrainingArguments

    torch.manual_seed(0)
    if method == "qlora":  # the usual peft QLoRA recipe: 4-bit load, prepare_model_for_kbit_training, LoRA
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        dtype = getattr(torch, QLORA["compute_dtype"])
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=QLORA["quant_type"],
                                   bnb_4bit_use_double_quant=QLORA["double_quant"], bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=dtype,
                                                     device_map={"": "cuda" if torch.cuda.is_available() else "cpu"})
        # peft's default recomputes activations (gradient checkpointing); edgeft's train stage does not unless
        # asked (train.gradient_checkpointing), so neither side does here: the same work on both
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    elif method == "lora":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        raise ValueError(f"method {method!r}: lora or qlora")
    if mode != "defaults":
        model.config.use_cache = False  # no KV cache in training; padding-free needs it for its packed mask
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=LORA["r"], lora_alpha=LORA["alpha"],
                                             lora_dropout=0.0, target_modules=LORA["target_modules"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    clock = StepClock()
    flatten = DataCollatorWithFlattening()

    def padded(rows):
        n = max(len(r["input_ids"]) for r in rows)
        ids = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        clock.batch(int(mask.sum()), mask.numel())
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def flattened(rows):
        batch = flatten(rows)
        n = sum(len(r["input_ids"]) for r in rows)
        clock.batch(n, batch["input_ids"].numel())
        return batch

    ds = [{"input_ids": x, "labels": y} for x, y in examples]
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=BATCH, max_steps=args.steps,
                                  learning_rate=args.lr, warmup_ratio=0.03, lr_scheduler_type="cosine",
                                  weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", save_strategy="no",
                                  report_to=[], logging_steps=max(1, args.steps // 4),
                                  use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                                  remove_unused_columns=False, disable_tqdm=True, seed=0,
                                  group_by_length=mode == "group_by_length")
        trainer = Trainer(model=model, args=targs, train_dataset=ds,
                          data_collator=flattened if mode == "padding_free" else padded)
        with clock:
            out = trainer.train()
    del trainer, model
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {**clock.result(args.steps), "final_loss": round(out.training_loss, 4), "peak_cuda_mb": peak,
            "trainable_params": trainable}
