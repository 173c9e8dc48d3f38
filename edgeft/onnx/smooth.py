"""Activation smoothing before 8-bit quantization (SmoothQuant, Xiao et al. 2023), folded into an fp32 decoder graph.

int8 kernels that quantize activations at run time (MatMulNBits accuracy_level 4: int8 per block of the
input dimension) lose most where a few input channels carry outliers: SmolLM2-135M's down_proj inputs peak
at 270x their rms, and each block's step is set by its largest value. Per input channel j of a MatMul,
x_j / s_j and W[j, :] * s_j compute the same product; s_j = max|x_j|^alpha / max|W[j, :]|^(1 - alpha) moves
part of the range from the activation to the weight, whose 8-bit blocks are fixed offline. The 1 / s_j is
folded into whatever produced x, so the graph gains no node:
- an RMSNorm's weight (gamma), when x is Mul(gamma, normalized): q/k/v share one, gate/up another, the LM
  head the final norm's; every MatMul reading that x takes the same s (the max of their weights);
- the up projection's output columns, when x is Mul(act(gate), up) (the MLP's down projection input).
Attention output projections (o_proj) are left: their input mixes value heads that GQA shares.

`input_absmax` measures max|x_j| per MatMul input with torch hooks on calibration prompts; `smooth` rewrites
the graph from those figures.
"""

from __future__ import annotations

import numpy as np

from edgeft.onnx.quant import module_path

_S_MIN, _S_MAX = 1e-2, 1e2  # clamp on s: a dead channel (max|x| = 0) must not zero a weight row


def input_absmax(model, prompts: list[list[int]]) -> dict[str, np.ndarray]:
    """Per nn.Linear of a torch model (by module path): max |input| per input channel over `prompts`, float64."""
    import torch

    seen: dict[str, np.ndarray] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(_m, inp, _out, name=name):
                x = inp[0].detach().abs().reshape(-1, inp[0].shape[-1]).amax(0).double().numpy()
                seen[name] = np.maximum(seen[name], x) if name in seen else x
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for ids in prompts:
                model(torch.tensor([list(ids)]))
    finally:
        for h in hooks:
            h.remove()
    return seen


def smooth(graph, absmax: dict[str, np.ndarray], alpha: float) -> list[str]:
    """Fold per-channel smoothing into `graph` (see the module docstring); returns the module paths smoothed."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    done = []
    groups: dict[str, list] = {}  # x -> the MatMuls reading it with constant weights
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and module_path(n.name) in absmax:
            groups.setdefault(n.input[0], []).append(n)
    for x, mms in groups.items():
        src = producers.get(x)
        others = [r for r in readers.get(x, []) if r not in mms and r.op_type != "Shape"]  # Shape: dims only
        if src is None or src.op_type != "Mul" or others:
            continue  # x feeds something else too (a residual, a norm): scaling it would change that
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in mms]  # [K, N] each
        act = np.max([absmax[module_path(m.name)] for m in mms], axis=0)
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        if act.shape != wmax.shape:
            continue
        s = np.clip(act ** alpha / np.maximum(wmax, 1e-12) ** (1 - alpha), _S_MIN, _S_MAX)
        s = np.where(act > 0, s, 1.0)
        if not _divide_producer(graph, src, s, inits, producers, readers):
            continue
        for m, w in zip(mms, weights):
            _replace(graph, inits, m, 1, (w * s[:, None]).astype(np.float32), "_smoothed")
            done.append(module_path(m.name))
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for n in [n for n in graph.node if n.op_type == "Identity" and not any(o in used for o in n.output)]:
        graph.node.remove(n)  # dedup aliases nothing reads any more
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    for t in [t for t in graph.initializer if t.name not in used]:  # the originals nothing reads any more
        graph.initializer.remove(t)
    return done


def _divide_producer(graph, mul, s: np.ndarray, inits, producers, readers) -> bool:
    """Divide the output of `mul` by s per channel by rewriting a constant it multiplies: an RMSNorm gamma
    [K], or the up projection's weight columns when `mul` is act(gate) * up. False when neither is found."""
    from onnx import numpy_helper

    for k, name in enumerate(mul.input):
        while name not in inits and name in producers and producers[name].op_type == "Identity":
            name = producers[name].input[0]  # exporters dedupe equal tensors (all-ones norms) through Identity
        if name in inits:  # Mul(gamma, normalized)
            gamma = numpy_helper.to_array(inits[name])
            if gamma.shape != s.shape:
                return False
            _replace(graph, inits, mul, k, (gamma / s).astype(np.float32), "_smoothed")
            return True
    for name in mul.input:  # Mul(act(gate), up): up = MatMul(h, W_up) read by this Mul only
        up = producers.get(name)
        if (up is not None and up.op_type == "MatMul" and up.input[1] in inits
                and len(readers.get(name, [])) == 1):
            w = numpy_helper.to_array(inits[up.input[1]])  # [H, I]
            if w.shape[1] != s.shape[0]:
                return False
            _replace(graph, inits, up, 1, (w / s[None, :]).astype(np.float32), "_smoothed")
            return True
    return False


def _replace(graph, inits, node, k: int, value: np.ndarray, suffix: str) -> None:
    """Point input k of `node` at a new initializer holding `value` (the old one may be shared: it stays)."""
    from onnx import numpy_helper

    name = node.input[k].lstrip("/").replace("/", ".") + suffix
    while name in inits:
        name += "_"
    t = numpy_helper.from_array(value, name)
    graph.initializer.append(t)
    inits[name] = t
    node.input[k] = name
