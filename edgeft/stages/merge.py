"""Merge a LoRA/QLoRA adapter into a 16-bit copy of its base, and prove the merge is right.

QLoRA adapters were trained against the NF4-dequantized base, so they are merged into exactly
those dequantized weights, as QLoRA intends. The check means the same on every host and model:
the merged model is compared with base + unmerged adapter evaluated on the very same fp32 weights
(no 4-bit kernel in between), by the largest logit difference relative to the logit scale, by
decisive top-1 changes (those the difference cannot explain) and by the mean KL. The base must be
the one the adapter was trained on (weights sha256), and the merged model must differ from the
base. How far the 4-bit kernel this host runs is from those fp32 weights is measured beside it,
with the kernel's name, as a metric only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import ADAPTER_DIR, KIND_ADAPTER, KIND_HF
from edgeft.errors import UserError
from edgeft.training import hf_io
from edgeft.training.merging import DTYPES, merge


@dataclass(frozen=True)
class Config:
    dtype: str = opt("float16", "saved weights: float16 | bfloat16 | float32")
    tolerance: float = opt(1e-4, "max |merged - (base + adapter)| logit difference / max |logit|, both fp32")
    max_kl: float = opt(1e-6, "mean KL(base + adapter || merged) allowed, nats per position")
    min_change: float = opt(1e-3, "merged must differ from the base by more than this (max |logit diff|)")
    verify_seqs: int = opt(4, "random token sequences checked")
    verify_len: int = opt(48, "tokens per sequence")


def run(src: artifact.Artifact, cfg: Config, out: Path) -> artifact.Artifact:
    """Merge the adapter artifact `src` into its base; fails the stage if a check fails."""
    src = artifact.load(src.path, kind=KIND_ADAPTER)
    validate(cfg)
    train_cfg = src.params["config"]
    base_dir = hf_io.resolve_model(src.inputs["base_model"])

    def payload(tmp: Path) -> dict:
        merged, checks = merge(base_dir, src.path / ADAPTER_DIR, train_cfg, cfg,
                               src.inputs.get("base_weights_sha256"), src.metrics.get("device", "cpu"))
        merged.to(DTYPES[cfg.dtype]).save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer(src.path, tmp)
        return checks

    return artifact.build(out, kind=KIND_HF, stage="merge", params=cfg, parent=src, payload=payload,
                          inputs={"base_model": str(base_dir)})


def validate(cfg: Config) -> None:
    """Refuse an unknown saved dtype or a meaningless tolerance before anything runs."""
    if cfg.dtype not in DTYPES:
        raise UserError(f"merge.dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    if not 0 < cfg.tolerance < 1 or cfg.max_kl <= 0:
        raise UserError("merge.tolerance must be in (0, 1) (a share of the logit scale) and merge.max_kl > 0")
