"""Merge a LoRA/QLoRA adapter into a 16-bit copy of its base, and prove the merge is right.

QLoRA adapters were trained against the NF4-dequantized base, so they are merged into exactly
those dequantized weights, as QLoRA intends. After merging, two checks run in fp32 and are
recorded: merged logits equal base+adapter logits (max |diff| <= tolerance), and the merged model
differs from the base (an adapter that changed nothing is a failed fine-tune, not a success).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from edgeft import artifact
from edgeft.constants import ADAPTER_DIR, KIND_ADAPTER, KIND_HF
from edgeft.errors import StageFailure, UserError
from edgeft.stages import hf_io

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Config:
    dtype: str = "float16"  # saved weights: float16 | bfloat16 | float32
    tolerance: float = 1e-4  # max |merged - (base + adapter)| logit difference allowed, fp32
    min_change: float = 1e-3  # merged must differ from the base by more than this (max |logit diff|)
    verify_seqs: int = 4  # random token sequences checked
    verify_len: int = 48  # tokens per sequence


def run(src: artifact.Artifact, cfg: Config, out: Path) -> artifact.Artifact:
    """Merge the adapter artifact `src` into its base; fails the stage if a check fails."""
    src = artifact.load(src.path, kind=KIND_ADAPTER)
    validate(cfg)
    train_cfg = src.manifest["params"]["config"]
    base_dir = hf_io.resolve_model(src.manifest["inputs"]["base_model"])

    def payload(tmp: Path) -> dict:
        merged, checks = merge(base_dir, src.path / ADAPTER_DIR, train_cfg, cfg)
        merged.to(DTYPES[cfg.dtype]).save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer(src.path, tmp)
        return checks

    return artifact.build(out, kind=KIND_HF, stage="merge", params=cfg, parent=src, payload=payload,
                          inputs={"base_model": str(base_dir)})


def validate(cfg: Config) -> None:
    """Refuse an unknown saved dtype before anything runs."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"merge.dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")


def merge(base_dir: Path, adapter_dir: Path, train_cfg: dict, cfg: Config):
    """Return (merged fp32 model, check metrics); raises StageFailure when a check fails."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qlora = train_cfg["method"] == "qlora"
    fp32 = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    ids = _verify_ids(fp32.config.vocab_size, cfg)
    if qlora:
        quant = AutoModelForCausalLM.from_pretrained(
            base_dir, quantization_config=hf_io.bnb_config(train_cfg["quant_type"], train_cfg["double_quant"],
                                                           torch.float32),
            dtype=torch.float32, device_map={"": "cpu"})
        n_deq = _load_dequantized(quant, fp32)
        reference = PeftModel.from_pretrained(quant, adapter_dir)
    else:
        n_deq = 0
        reference = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    with torch.no_grad():
        ref_logits = reference(ids).logits.float()
        with reference.disable_adapter():
            base_logits = reference(ids).logits.float()
    del reference
    merged = PeftModel.from_pretrained(fp32, adapter_dir).merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits.float()
        low = merged.to(DTYPES[cfg.dtype]).float()(ids).logits.float() if cfg.dtype != "float32" else merged_logits
    merged.float()
    diff = (merged_logits - ref_logits).abs().max().item()
    change = (merged_logits - base_logits).abs().max().item()
    checks = {"merge_max_abs_diff": diff, "merge_tolerance": cfg.tolerance, "change_vs_base": change,
              "saved_dtype_max_abs_diff": (low - ref_logits).abs().max().item(),
              "dequantized_nf4_tensors": n_deq, "from_qlora": qlora}
    if diff > cfg.tolerance:
        raise StageFailure(f"merge: merged logits differ from base+adapter by {diff:.2e} > merge.tolerance "
                           f"{cfg.tolerance:.0e}; the adapter does not match this base (check base.model)")
    if change <= cfg.min_change:
        raise StageFailure(f"merge: merged model equals the base (max logit change {change:.2e}); the adapter "
                           "learned nothing: train longer or raise train.lr")
    return merged, checks


def _load_dequantized(quant_model, fp32_model) -> int:
    """Copy the dequantized 4-bit weights of `quant_model` into `fp32_model`; returns how many."""
    import bitsandbytes as bnb

    targets = dict(fp32_model.named_modules())
    n = 0
    for name, mod in quant_model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state).float()
            with torch.no_grad():
                targets[name].weight.copy_(w.reshape(targets[name].weight.shape))
            n += 1
    if n == 0:
        raise StageFailure("merge: the qlora base loaded without any 4-bit layer; bitsandbytes did not quantize")
    return n


def _verify_ids(vocab: int, cfg: Config) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (cfg.verify_seqs, cfg.verify_len), generator=g)
