"""Graph-level conversions of an fp32 ONNX decoder for export_onnx: fp16, int8 and int4 as MatMulNBits.

Each writes a standalone type dir (model.onnx + sidecars copied from the fp32 dir). `check_graph`
validates any written model with onnx.checker on its path (the only form that works past the 2 GB
protobuf limit, with external data) and by opening an onnxruntime session on it.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from edgeft.errors import StageFailure
from edgeft.runtime.onnx import MODEL_FILE

INT4_ALGOS = ("rtn", "hqq")  # round to nearest per block; HQQ (half-quadratic, calibration-free)
_MATMUL_NBITS = "MatMulNBits"


def convert_fp16(base: Path, out: Path, large: bool) -> None:
    """fp16 everywhere (IO and KV cache included) except the normalisations, which stay fp32 end to end.

    RMSNorm squares the residual stream: past |x| = 256 that overflows fp16 (the demo's last block reaches
    350, so the final norm turned to inf and top-1 agreement fell to 0.95). Torch computes norms in fp32;
    so do we: every node of a norm subgraph is blocked, and the converter's fp32 -> fp16 -> fp32 cast
    pairs between blocked nodes are then removed, so no intermediate value passes through fp16.
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    copy_sidecars(base, out)
    graph = onnx.load(str(base / MODEL_FILE), load_external_data=False).graph
    norm_nodes = [n.name for n in graph.node if _NORM_NODE.search(n.name) and n.op_type != "Constant"]
    # a path, not a ModelProto: the converter then runs shape inference on disk, fine past 2 GB
    model = convert_float_to_float16(str(base / MODEL_FILE), keep_io_types=False,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Pow", "ReduceMean"],
                                     node_block_list=norm_nodes)
    drop_cast_round_trips(model.graph)
    OnnxModel(model).topological_sort()  # the casts around blocked ops are appended out of order
    onnx.save(model, str(out / MODEL_FILE), save_as_external_data=large,
              all_tensors_to_one_file=True, location=MODEL_FILE + "_data")


# nodes inside a normalisation module as exporters name them: /model/norm/Pow, /model/layers.0/input_layernorm/Mul,
# .../self_attn/q_norm/... (optimum names nodes by module path)
_NORM_NODE = re.compile(r"(^|/)[^/]*norm[^/]*/", re.IGNORECASE)


def drop_cast_round_trips(graph) -> int:
    """Remove the float16 converter's Cast(fp16) -> Cast(fp32) pairs between two blocked (fp32) nodes.

    The converter wraps each blocked node on its own, so a chain of blocked nodes still round-trips every
    intermediate value through fp16. A pair is recognised by the converter's own node names; the fp32
    consumer is rewired to the fp32 value and whatever is left unused is deleted. Returns pairs removed.
    """
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    removed, dead = 0, set()
    for up in list(graph.node):
        if up.op_type != "Cast" or not up.name.endswith("_cast_to_fp16_node"):
            continue
        src, half = up.input[0], up.output[0]
        if src not in producers:  # a graph input or initializer: leave the converter's choice
            continue
        for down in consumers.get(half, []):
            if down.op_type != "Cast" or not down.name.endswith("_cast_to_fp32_node"):
                continue
            for n in consumers.get(down.output[0], []):
                for k, name in enumerate(n.input):
                    if name == down.output[0]:
                        n.input[k] = src
            if down.output[0] in outputs:
                continue
            dead.add(id(down))
            removed += 1
        if half not in outputs and all(id(c) in dead for c in consumers.get(half, [])):
            dead.add(id(up))
    kept = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(kept)
    return removed


def quantize_int8(base: Path, out: Path, *, block_size: int, accuracy_level: int, embeddings: bool,
                  large: bool, keep_float: Iterable[str] = (), head: bool = True,
                  absmax: dict | None = None, smooth_alpha: float = 0.0) -> dict:
    """Weight-only int8, as llama.cpp's Q8_0: every MatMul with constant weights, the LM head included, as
    com.microsoft MatMulNBits (bits 8, symmetric, one fp32 scale per `block_size` weights along K), and with
    `embeddings` the token embedding as an 8-bit GatherBlockQuantized. Activations are not quantized per
    tensor: accuracy_level 0 keeps them float, 4 quantizes them per block of the same size at run time.

    onnxruntime's dynamic quantization (per-tensor uint8 activations) lost a real model: SmolLM2-135M fell to
    teacher-forced top-1 0.842 (benchmarks/onnx_int8.py has the measurements). A tied LM head reaches the
    graph as MatMul(x, Transpose(embedding)); the Transpose is folded into its own initializer first, so the
    head is quantized too instead of staying fp32 (a fifth of SmolLM2's weights; `head=False` leaves it).
    MatMuls named in `keep_float` (module paths, e.g. model.layers.28.mlp.down_proj) keep float weights. With
    `smooth_alpha` > 0 and `absmax` (per module path: max |input| per channel, edgeft.onnx.smooth.input_absmax),
    activation outliers are first moved into the weights (edgeft.onnx.smooth). Returns what was applied."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    copy_sidecars(base, out)
    model = onnx.load(str(base / MODEL_FILE))
    untied = fold_weight_transposes(model.graph) if head else 0
    smoothed = []
    if smooth_alpha > 0 and absmax:
        from edgeft.onnx.smooth import smooth

        smoothed = smooth(model.graph, absmax, smooth_alpha)
    keep = set(keep_float)
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and module_path(n.name) in keep]
    cfg = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                       bits=8, op_types_to_quantize=("MatMul",))
    with quiet("onnxruntime.quantization.matmul_nbits_quantizer"):
        quant = MatMulNBitsQuantizer(model, algo_config=cfg, nodes_to_exclude=excluded)
        quant.process()
    model = quant.model.model
    gathers = quantize_gathers_int8(model.graph, block_size) if embeddings else 0
    nodes = sum(n.op_type == _MATMUL_NBITS for n in model.graph.node)
    if not nodes:
        raise StageFailure(f"{out / MODEL_FILE}: the int8 quantizer converted no MatMul to {_MATMUL_NBITS} "
                           "(weights not initializers?); export fp16 or fp32 instead")
    if embeddings and not gathers:
        raise StageFailure(f"{out / MODEL_FILE}: int8_embeddings is on but no embedding Gather with constant "
                           "weights and a row length divisible by 16 was found; set export_onnx.int8_embeddings=false")
    quant.model.save_model_to_file(str(out / MODEL_FILE), use_external_data_format=large)
    return {"method": "weight-only MatMulNBits", "bits": 8, "block_size": block_size, "symmetric": True,
            "accuracy_level": accuracy_level, "matmulnbits_nodes": nodes, "untied_transposes": untied,
            "embeddings": f"int8 ({gathers} GatherBlockQuantized)" if gathers else "fp32",
            "float_matmuls": sorted(module_path(n) for n in excluded),
            **({"smooth_alpha": smooth_alpha, "smoothed_matmuls": len(smoothed)} if smooth_alpha > 0 else {})}


def module_path(node_name: str) -> str:
    """The torch module an exporter's node belongs to: /model/layers.28/mlp/down_proj/MatMul -> model.layers.28.mlp.down_proj."""
    return node_name.strip("/").rsplit("/", 1)[0].replace("/", ".")


def fold_weight_transposes(graph) -> int:
    """Replace Transpose(initializer) feeding only MatMul weight inputs by a transposed initializer; returns how many.

    optimum exports a tied LM head as MatMul(x, Transpose(embed_tokens.weight)): a weight quantizer sees no
    constant there and leaves the head in float."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for k, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, k))
    outputs = {o.name for o in graph.output}
    folded = []
    for n in graph.node:
        if n.op_type != "Transpose" or n.input[0] not in inits or n.output[0] in outputs:
            continue
        uses = consumers.get(n.output[0], [])
        if not uses or any(c.op_type != "MatMul" or k != 1 for c, k in uses):
            continue
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[n.input[0]])
        graph.initializer.append(numpy_helper.from_array(weight.transpose(perm).copy(), n.output[0]))
        folded.append(n)
    for n in folded:
        graph.node.remove(n)
    return len(folded)


def quantize_gathers_int8(graph, block_size: int) -> int:
    """Gather(2-D float initializer, ids) on axis 0 -> com.microsoft GatherBlockQuantized, 8 bits: uint8 codes
    (zero point 128, the op's default), one fp32 scale per block of a row (symmetric, absmax/127). The block is
    `block_size`, halved (to 16 at least) until it divides the row: the op does not pad (SmolLM2's 576 takes 64
    for 128). A table no such block divides is left as it is. Returns the Gathers converted."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    users: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            users[name] = users.get(name, 0) + 1
    done = 0
    for idx, n in enumerate(list(graph.node)):
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type != "Gather" or n.input[0] not in inits or axis != 0:
            continue
        w = numpy_helper.to_array(inits[n.input[0]])
        bs = block_size
        while w.ndim == 2 and bs > 16 and w.shape[1] % bs:
            bs //= 2
        if w.ndim != 2 or w.dtype != np.float32 or w.shape[1] % bs:
            continue
        blocks = w.reshape(w.shape[0], -1, bs)
        scale = np.abs(blocks).max(-1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        codes = (np.clip(np.rint(blocks / safe), -127, 127) + 128).astype(np.uint8).reshape(w.shape)
        name = n.input[0]
        graph.initializer.extend([numpy_helper.from_array(codes, name + "_Q8"),
                                  numpy_helper.from_array(scale.astype(np.float32), name + "_scales")])
        node = helper.make_node("GatherBlockQuantized", [name + "_Q8", n.input[1], name + "_scales"], [n.output[0]],
                                name=(n.name or "gather") + "_Q8", domain="com.microsoft", gather_axis=0,
                                quantize_axis=1, block_size=bs, bits=8)
        graph.node.remove(n)
        graph.node.insert(idx, node)
        if users.get(name) == 1:  # nothing else reads the float table
            graph.initializer.remove(inits[name])
        done += 1
    return done


def quantize_int4(base: Path, out: Path, *, algo: str, block_size: int, symmetric: bool,
                  accuracy_level: int, embeddings: bool, large: bool) -> dict:
    """Weight-only int4: MatMul as com.microsoft MatMulNBits (RTN or HQQ), and with `embeddings` the token
    embedding Gather as GatherBlockQuantized (RTN: onnxruntime has no HQQ Gather). Returns what was applied."""
    import numpy as np
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    copy_sidecars(base, out)
    model = onnx.load(str(base / MODEL_FILE))

    def rtn(*ops: str):
        return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                            accuracy_level=accuracy_level, op_types_to_quantize=ops)

    gather = ("Gather",) if embeddings else ()
    if algo == "hqq":  # always asymmetric (it optimises scale and zero point together); the embedding by RTN
        passes = [HQQWeightOnlyQuantConfig(block_size=block_size, bits=4, op_types_to_quantize=("MatMul",))]
        passes += [rtn(*gather)] if gather else []
    else:
        passes = [rtn("MatMul", *gather)]
    # quiet: one INFO line per node, and numpy's divide warning on all-zero blocks (their scale is 0, handled)
    with quiet("onnxruntime.quantization.matmul_nbits_quantizer"), np.errstate(divide="ignore", invalid="ignore"):
        for cfg in passes:
            quant = MatMulNBitsQuantizer(model, algo_config=cfg)
            quant.process()
            model = quant.model.model
        nodes = [n for n in model.graph.node if n.op_type == _MATMUL_NBITS]
        if algo == "hqq":  # HQQ's config has no accuracy_level: set it on the nodes it wrote
            for n in nodes:
                kept = [a for a in n.attribute if a.name != "accuracy_level"]
                del n.attribute[:]
                n.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", accuracy_level)])
        quant.model.save_model_to_file(str(out / MODEL_FILE), use_external_data_format=large)
    if not nodes:
        raise StageFailure(f"{out / MODEL_FILE}: the int4 quantizer converted no MatMul to "
                           f"{_MATMUL_NBITS} (weights not initializers?); export int8 instead")
    gathers = sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node)
    if embeddings and not gathers:
        raise StageFailure(f"{out / MODEL_FILE}: int4_embeddings is on but the quantizer found no embedding "
                           "Gather with constant weights; set export_onnx.int4_embeddings=false")
    return {"algo": algo, "block_size": block_size, "symmetric": symmetric if algo == "rtn" else False,
            "accuracy_level": accuracy_level, "matmulnbits_nodes": len(nodes),
            "embeddings": f"int4 rtn ({gathers} GatherBlockQuantized)" if gathers else "fp32"}


def check_graph(model_dir: Path, model_file: str = MODEL_FILE) -> None:
    """onnx.checker on the file path (works past 2 GB with external data), then an onnxruntime session."""
    import onnx
    import onnxruntime as ort

    path = model_dir / model_file
    _register_ort_default_domain_ops()
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise StageFailure(f"{path}: fails onnx.checker: {e}") from None
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise StageFailure(f"{path}: onnxruntime cannot open it: {str(e).splitlines()[0]}") from None


def _register_ort_default_domain_ops() -> None:
    """Give onnx.checker the schema of SimplifiedLayerNormalization, an onnxruntime op in the default domain.

    The genai builder emits it (RMSNorm) in the ai.onnx domain, where onnx itself has no schema; the
    checker would stop there and validate nothing else. com.microsoft ops are skipped by the checker.
    """
    from onnx import defs

    try:
        defs.get_schema("SimplifiedLayerNormalization", 1, "")
        return
    except defs.SchemaError:
        pass
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"]
    P = defs.OpSchema.FormalParameter
    A = defs.OpSchema.Attribute
    schema = defs.OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[P("X", "T"), P("scale", "V")],
        outputs=[P("Y", "V"), P("inv_std_var", "U", param_option=defs.OpSchema.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("U", ["tensor(float)", "tensor(double)"], ""), ("V", floats, "")],
        attributes=[A("axis", defs.OpSchema.AttrType.INT, ""), A("epsilon", defs.OpSchema.AttrType.FLOAT, ""),
                    A("stash_type", defs.OpSchema.AttrType.INT, "")])
    defs.register_schema(schema)


def model_bytes(model_dir: Path) -> int:
    """Bytes of the graph and its external data files."""
    return sum(p.stat().st_size for p in model_dir.glob(MODEL_FILE + "*") if p.is_file())


def copy_sidecars(base: Path, out: Path) -> None:
    """config.json and tokenizer files from the fp32 dir: every type dir runs standalone."""
    out.mkdir(parents=True, exist_ok=True)
    for p in base.iterdir():
        if p.is_file() and not p.name.startswith(MODEL_FILE):
            shutil.copy2(p, out / p.name)


@contextmanager
def quiet(logger_name: str):
    """Raise one logger to ERROR for the duration (quantizers log progress at INFO/WARNING)."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)
