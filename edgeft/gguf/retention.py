"""How much of the tune a quantized GGUF file keeps.

For every 2-D weight the tune changed, the file's weight (dequantized) is projected on the tune's change:
retained = <file - base, tuned - base> / |tuned - base|^2, summed over tensors. 1 means the file carries the
whole change (plus noise orthogonal to it); 0 means it was rounded back to the base; above 1, the rounding
exaggerates it.

Why it is measured: a base imported from a quantized GGUF already lies on that file's grid. A tune moves the
weights by less than a quantization step, so re-quantizing to a type whose grid contains the source's snaps
them back onto it: SmolLM2 from its Q4_1 file, tuned and exported to Q5_K_M (Q5_1 for the 576-wide rows: the
same 32-weight blocks, half the step) kept 8-14% of the tune in most projections, with a smaller weight error
than Q4_K_M, whose rows kept 75-88%. The weight error cannot show this; this share does.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np

from edgeft.gguf import writer as gguf_writer
from edgeft.safetensors_file import SafeTensorsFile


def tune_retained(tuned_dir: Path, base_dir: Path, gguf_file: Path) -> dict | None:
    """{"share", "min_share", "min_tensor", "tensors"} for `gguf_file` made from `tuned_dir`; None when the two
    models do not have the same tensors and shapes (a pruned model) or the tune changed no weight the file has.
    A weight counts as changed only where it differs from the base rounded to the tuned file's dtype."""
    import gguf

    spec, hp, _ = gguf_writer.model_spec(tuned_dir)
    tuned_at, base_at = gguf_writer.tensor_locations(Path(tuned_dir)), gguf_writer.tensor_locations(Path(base_dir))
    reader = gguf.GGUFReader(gguf_file)
    in_file = {t.name: t for t in reader.tensors}
    num = den = 0.0
    worst, n = (np.inf, ""), 0
    with ExitStack() as stack:
        handles: dict[Path, SafeTensorsFile] = {}

        def opened(path: Path) -> SafeTensorsFile:
            if path not in handles:
                handles[path] = stack.enter_context(SafeTensorsFile(path))
            return handles[path]

        for name in sorted(tuned_at):
            if not name.endswith(".weight"):
                continue
            stem = name[: -len(".weight")]
            gname = gguf_writer.gguf_tensor_name(spec, stem)
            if gname is None or f"{gname}.weight" not in in_file:
                continue
            if name not in base_at:
                return None
            tuned = opened(tuned_at[name])
            t, b = tuned.read_f32(name), opened(base_at[name]).read_f32(name)
            if t.shape != b.shape:
                return None
            b = stored(b, tuned.dtype(name))  # the base as the tuned file's dtype holds it: rounding is no tune
            d = t - b
            dd = float(np.dot(d.ravel(), d.ravel()))
            if t.ndim != 2 or dd == 0.0:
                continue
            rec = in_file[f"{gname}.weight"]
            q = gguf.quants.dequantize(rec.data, rec.tensor_type).reshape(t.shape).astype(np.float32)
            heads = gguf_writer.qk_heads(spec, hp, stem)
            if heads:
                q = gguf_writer.unpermute_qk(q, heads)
            qd = float(np.dot((q - b).ravel(), d.ravel()))
            num, den, n = num + qd, den + dd, n + 1
            worst = min(worst, (qd / dd, name))
    if not n:
        return None
    return {"share": round(num / den, 4), "min_share": round(worst[0], 4), "min_tensor": worst[1], "tensors": n}


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 `x` rounded as a safetensors `dtype` (F16, BF16: round to nearest even) would store it."""
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        u = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16) << 16
        return u.astype(np.uint32).view(np.float32)
    return x
