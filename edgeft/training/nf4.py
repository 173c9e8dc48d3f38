"""Which 4-bit kernel bitsandbytes really runs on this host, and keeping QLoRA's numerics as asked.

bitsandbytes 0.50 has two CPU paths for `Linear4bit`:
- dequantize the NF4 weight and run a torch matmul in `compute_dtype` (training, and inference on
  CPUs without AVX512-BF16);
- on CPUs that report AVX512-BF16, inference (eval mode, no grad) goes through a fused kernel that
  casts activations to bf16 whatever `compute_dtype` says, and repacks the weight in place on the
  first call. The repacked weight stays repacked: a training step after an eval pass then takes the
  inference kernel, which has no autograd.

Training pins every layer to the first path (`pin_dequantize`), so the requested compute dtype is what
runs and an eval pass changes nothing. `host_kernel` names the path bitsandbytes takes for inference
here; merge measures how far that path is from fp32 and records it as a metric, never as a gate.
"""

from __future__ import annotations

import torch

KERNEL_DEQUANT = "dequantize_4bit + torch matmul"
KERNEL_FUSED_BF16 = "fused CPU gemv_4bit, bf16 activations (AVX512-BF16)"
KERNEL_CUDA = "CUDA gemv/matmul_4bit"


def fused_kernel_available() -> bool:
    """True when bitsandbytes would run 4-bit inference on this CPU through its fused bf16 kernel."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def linear4bit_layers(model) -> list:
    """Every bitsandbytes `Linear4bit` module of `model`."""
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def pin_dequantize(model, compute_dtype: torch.dtype, device: torch.device) -> dict:
    """Make every 4-bit layer dequantize and compute in `compute_dtype`; returns the numerics record."""
    layers = linear4bit_layers(model)
    fused = device.type == "cpu" and any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    for m in layers:
        m.support_avx512bf16_for_cpu = False  # bitsandbytes' own switch for the fused inference path
    name = str(compute_dtype).removeprefix("torch.")
    return {"nf4_layers": len(layers), "nf4_kernel": KERNEL_CUDA if device.type == "cuda" else KERNEL_DEQUANT,
            "activation_dtype": name, "compute_dtype_requested": name, "compute_dtype_honoured": True,
            "fused_bf16_kernel_available": fused, "fused_bf16_kernel_disabled": fused}


def host_kernel(model, compute_dtype: torch.dtype) -> dict:
    """The 4-bit inference path bitsandbytes takes for `model` where it is loaded (CUDA, or this CPU), and its
    activation dtype."""
    layers = linear4bit_layers(model)
    asked = str(compute_dtype).removeprefix("torch.")
    if layers and layers[0].weight.device.type == "cuda":
        return {"kernel": KERNEL_CUDA, "activation_dtype": asked, "compute_dtype_requested": asked,
                "compute_dtype_honoured": True}
    fused = any(getattr(m, "support_avx512bf16_for_cpu", False) for m in layers)
    active = "bfloat16" if fused else asked
    return {"kernel": KERNEL_FUSED_BF16 if fused else KERNEL_DEQUANT, "activation_dtype": active,
            "compute_dtype_requested": asked, "compute_dtype_honoured": active == asked}


def dequantized_weight(layer) -> torch.Tensor:
    """The fp32 weight a 4-bit layer stands for; refuses a weight bitsandbytes repacked for its fused kernel
    (its inverse re-quantizes the block scales, so it would not give the trained-against weights)."""
    import bitsandbytes.functional as F

    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("this 4-bit layer was repacked by an inference pass; dequantize before running it")
    return F.dequantize_4bit(layer.weight.data, state).float()
