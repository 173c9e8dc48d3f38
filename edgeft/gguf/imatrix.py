"""Importance matrix for llama.cpp's quantizer, computed in torch on the fine-tune data.

What llama.cpp's `llama-imatrix` tool collects, per matmul weight: the sum over tokens of the squared
input activation of every column, and the token count; the quantizer weighs each column's rounding
error by sum / count. Here forward pre-hooks on every nn.Linear that maps to a GGUF tensor collect the
same sums while the fp32 model reads the training conversations rendered with the chat template.
The output head is left out, as llama-imatrix does by default. Row permutations (q/k rope layout)
do not touch columns, so the values apply to the GGUF tensors as they are.

The result goes to llama.cpp as `llama_model_quantize_params.imatrix` (an array of name/data/size
records, null-terminated) through llama-cpp-python's ctypes binding, and is saved beside the files
in llama.cpp's imatrix GGUF format (`<name>.in_sum2`, `<name>.counts`), which `llama-quantize
--imatrix` also reads.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np

from edgeft.gguf import writer as gguf_writer

DATASETS_KEY = "imatrix.datasets"  # llama.cpp common/imatrix-loader.h
CHUNK_COUNT_KEY = "imatrix.chunk_count"
CHUNK_SIZE_KEY = "imatrix.chunk_size"


def compute(hf_dir: Path, sequences: list[list[int]]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(sum of squared inputs per column, token count) for every GGUF matmul weight, over `sequences`."""
    import torch
    from transformers import AutoModelForCausalLM

    spec, _, _ = gguf_writer.model_spec(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        name = gguf_writer.gguf_tensor_name(spec, mod_name)
        if name is None or name == "output":
            continue
        key = f"{name}.weight"

        def hook(_mod, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[key] = sums.get(key, 0) + (x * x).sum(0)
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for ids in sequences:
                model(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.float().numpy() for k, v in sums.items()}, counts


def save(path: Path, sums: dict[str, np.ndarray], counts: dict[str, int], arch: str, dataset: str,
         n_chunks: int) -> None:
    """Write llama.cpp's imatrix GGUF (general.type = imatrix) for `llama-quantize --imatrix`."""
    w = gguf.GGUFWriter(path, arch)
    try:
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(DATASETS_KEY, [dataset])
        w.add_uint32(CHUNK_COUNT_KEY, n_chunks)
        w.add_uint32(CHUNK_SIZE_KEY, 1)  # one token per "chunk" unit: counts are token counts
        for name in sorted(sums):
            w.add_tensor(f"{name}.in_sum2", sums[name].astype(np.float32))
            w.add_tensor(f"{name}.counts", np.array([counts[name]], dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()


def quantize_params_array(sums: dict[str, np.ndarray], counts: dict[str, int]):
    """The null-terminated llama_model_imatrix_data array llama.cpp reads; keep the result alive."""
    import llama_cpp

    entries = sorted(sums)
    arr = (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))()
    keep = []
    for i, name in enumerate(entries):
        values = np.ascontiguousarray(sums[name] / max(counts[name], 1), dtype=np.float32)
        keep.append(values)
        arr[i].name = name.encode()
        arr[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = values.size
    arr[len(entries)].name = None  # terminator
    return arr, keep
