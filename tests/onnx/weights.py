"""Helpers the ONNX quantization tests share: the source weights and the error measure."""

from __future__ import annotations

import numpy as np


def source_weights(model_dir) -> dict[str, np.ndarray]:
    """The model's fp32 tensors by torch name."""
    from safetensors.numpy import load_file

    return load_file(model_dir / "model.safetensors")


def rms_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """Root-mean-square difference relative to the reference's own rms."""
    return float(np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean()))


def graph_nodes(model_file) -> tuple[dict[str, np.ndarray], list[tuple]]:
    """An ONNX graph's initializers by name, and its nodes with their attributes as (node, {name: value})."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_file)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    return inits, [(n, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in graph.node]
