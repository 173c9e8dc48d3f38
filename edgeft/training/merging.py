"""Merging a LoRA adapter into its base and proving the merge right (the merge stage and adapter GGUF exports).

`cfg` is the merge stage's Config (dtype, tolerance, max_kl, min_change, verify_seqs, verify_len).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from edgeft.errors import StageFailure
from edgeft.training import hf_io

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def merge(base_dir: Path, adapter_dir: Path, train_cfg: dict, cfg, base_sha256: str | None = None,
          trained_on: str = "cpu"):
    """Return (merged fp32 model, check metrics); raises StageFailure when a check fails. `trained_on` is the
    device the train stage ran on (its manifest's metrics.device): a QLoRA base is quantized there again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if base_sha256 and hf_io.weights_hash(base_dir) != base_sha256:
        raise StageFailure(f"merge: the base model at {base_dir} is not the one the adapter was trained on "
                           "(its weights sha256 differs from the train manifest's); point base.model at the "
                           "original weights or train again")
    qlora = train_cfg["method"] == "qlora"
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = _verify_ids(fp32.config.vocab_size, cfg)
    quant, n_deq, where = None, 0, {}
    if qlora:
        quant, where = load_nf4(base_dir, train_cfg, trained_on)
        n_deq = load_dequantized(quant, fp32)  # before any forward: the fused kernel repacks weights
    model = PeftModel.from_pretrained(fp32, adapter_dir)
    model.eval()
    with torch.no_grad():
        ref_logits = model(ids).logits.float()
        with model.disable_adapter():
            base_logits = model(ids).logits.float()
    kernel = _host_kernel_deviation(quant, adapter_dir, ids, ref_logits, train_cfg) if qlora else {}
    del quant
    merged = model.merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits.float()
        low = merged.to(DTYPES[cfg.dtype]).float()(ids).logits.float() if cfg.dtype != "float32" else merged_logits
    merged.float()
    agree = compare_logits(ref_logits, merged_logits)
    change = (merged_logits - base_logits).abs().max().item()
    checks = {"merge_max_abs_diff": agree["max_abs_diff"], "merge_rel_diff": agree["rel_diff"],
              "merge_top1_agreement": agree["top1_agreement"], "merge_kl": agree["kl_mean"],
              "merge_tolerance": cfg.tolerance, "change_vs_base": change,
              "saved_dtype_max_abs_diff": (low - ref_logits).abs().max().item(),
              "dequantized_nf4_tensors": n_deq, "from_qlora": qlora, **where, **kernel}
    if agree["rel_diff"] > cfg.tolerance or agree["decisive_mismatches"] or agree["kl_mean"] > cfg.max_kl:
        raise StageFailure(
            f"merge: merged logits differ from base+adapter on the same fp32 weights by {agree['rel_diff']:.2e} "
            f"of the logit scale (merge.tolerance {cfg.tolerance:.0e}), with {agree['decisive_mismatches']} "
            f"decisive top-1 changes and KL {agree['kl_mean']:.1e} (merge.max_kl {cfg.max_kl:.0e}); the merge "
            "is wrong for this adapter (check its adapter_config.json and the peft version)")
    if change <= cfg.min_change:
        raise StageFailure(f"merge: merged model equals the base (max logit change {change:.2e}); the adapter "
                           "learned nothing: train longer or raise train.lr")
    return merged, checks


def compare_logits(ref: torch.Tensor, other: torch.Tensor) -> dict:
    """How far `other` is from `ref` ([..., vocab]): max |diff|, the same over ref's max |logit|, top-1
    agreement, top-1 changes the difference cannot explain (ref's margin > 2x max |diff|), mean KL."""
    ref, other = ref.reshape(-1, ref.shape[-1]).double(), other.reshape(-1, other.shape[-1]).double()
    diff = (ref - other).abs().max().item()
    scale = ref.abs().max().item()
    top_ref, top_other = ref.argmax(-1), other.argmax(-1)
    rows = torch.arange(ref.shape[0])
    margin = ref[rows, top_ref] - ref[rows, top_other]
    decisive = int(((top_ref != top_other) & (margin > 2 * diff)).sum())
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(other, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0).mean().item()
    return {"max_abs_diff": diff, "rel_diff": diff / scale if scale else diff,
            "top1_agreement": (top_ref == top_other).double().mean().item(), "decisive_mismatches": decisive,
            "kl_mean": kl}


def load_nf4(base_dir: Path, train_cfg: dict, trained_on: str = "cpu"):
    """(the base as QLoRA trained on it: bitsandbytes 4-bit, {nf4_trained_on, nf4_quantized_on}).

    bitsandbytes' CPU and CUDA quantizers do not give the same NF4 weights: with double quantization the
    block scales round differently (about 5e-4 on weights of 0.1), and a few codes differ on large tensors.
    So a base trained on CUDA is quantized on CUDA again when one is visible; where none is, the CPU
    quantizer's weights are used, a warning says so, and the manifest records both devices."""
    from transformers import AutoModelForCausalLM

    trained = "cuda" if str(trained_on).startswith("cuda") else "cpu"
    device = "cuda" if trained == "cuda" and torch.cuda.is_available() else "cpu"
    if device != trained:
        print(f"edgeft: warning: this QLoRA adapter was trained on a {trained}-quantized NF4 base; no CUDA device "
              "is visible, so it is merged into the CPU quantizer's NF4 weights (block scales differ by about 5e-4); "
              "merge on a CUDA host for the exact trained-against weights", file=sys.stderr)
    dtype = DTYPES.get(train_cfg.get("compute_dtype", "float32"), torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=hf_io.bnb_config(train_cfg["quant_type"], train_cfg["double_quant"], dtype),
        dtype=torch.float32, device_map={"": device})
    return model, {"nf4_trained_on": trained, "nf4_quantized_on": device}


def load_dequantized(quant_model, fp32_model) -> int:
    """Copy the dequantized 4-bit weights of `quant_model` into `fp32_model`; returns how many."""
    from edgeft.training import nf4

    targets = dict(fp32_model.named_modules())
    layers = set(map(id, nf4.linear4bit_layers(quant_model)))
    n = 0
    for name, mod in quant_model.named_modules():
        if id(mod) in layers:
            with torch.no_grad():
                targets[name].weight.copy_(nf4.dequantized_weight(mod).reshape(targets[name].weight.shape))
            n += 1
    if n == 0:
        raise StageFailure("merge: the qlora base loaded without any 4-bit layer; bitsandbytes did not quantize")
    return n


def _host_kernel_deviation(quant, adapter_dir: Path, ids, ref_logits, train_cfg: dict) -> dict:
    """Base+adapter through the 4-bit inference kernel this host really runs, against the fp32 reference."""
    from peft import PeftModel

    from edgeft.training import nf4

    info = nf4.host_kernel(quant, DTYPES.get(train_cfg.get("compute_dtype", "float32"), torch.float32))
    device = quant.get_input_embeddings().weight.device
    # device_map kept as loaded: peft's default ("auto") moves a model loaded on the CPU to any visible GPU
    model = PeftModel.from_pretrained(quant, adapter_dir, device_map={"": str(device)})
    model.eval()
    with torch.no_grad():
        got = model(ids.to(device)).logits.float().cpu()
    agree = compare_logits(ref_logits, got)
    return {"nf4_kernel": info["kernel"], "nf4_kernel_activation_dtype": info["activation_dtype"],
            "nf4_kernel_rel_diff": agree["rel_diff"], "nf4_kernel_max_abs_diff": agree["max_abs_diff"],
            "nf4_kernel_top1_agreement": agree["top1_agreement"], "nf4_kernel_kl": agree["kl_mean"]}


def _verify_ids(vocab: int, cfg) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (cfg.verify_seqs, cfg.verify_len), generator=g)
