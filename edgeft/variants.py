"""What a variant is: one (format, quant) record owning its file name, size model, runtime and parity bar.

Torch-free (the device's bench reads it). A variant's identity has one form: `Variant`, written as
`FORMAT:QUANT` in profiles and ladders (`key`), `FORMAT-QUANT` in bench reports (`name`), and
`file` inside its export artifact. Nothing parses a quant back out of a file name: an export
artifact's manifest lists what it built, and a loose .gguf file says its type in its header
(`general.file_type`, llama.cpp's LlamaFileType).
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeft.errors import UserError

FORMATS = ("gguf", "onnx")
LLAMA_CPP, ONNXRUNTIME = "llama.cpp", "onnxruntime"


@dataclass(frozen=True)
class Variant:
    """One deployable model type."""

    format: str  # gguf | onnx
    quant: str  # the type name users write: q4_k_m, int4, ...
    bpw: float  # bits per weight of a 2-D tensor, scales included (pre-flight's size model)
    runtime: str  # the device library that loads it: llama.cpp | onnxruntime
    bar_key: str | None  # export config key holding its teacher-forced top-1 bar; None: greedy parity with torch
    min_top1: float | None  # that bar's default (the export stage's Config takes it from here)
    tensor_type: str = ""  # gguf: the ggml type of its 2-D tensors (llama.cpp may widen some: Q4_K_M -> Q6_K)
    file_type: int = -1  # gguf: general.file_type (llama.cpp LlamaFileType) written in the file's header
    llama_ftype: str = ""  # gguf: llama.cpp quantizer target (llama_cpp constant); '' = edgeft's own writer

    @property
    def key(self) -> str:
        """FORMAT:QUANT, as profiles and ladders write it."""
        return f"{self.format}:{self.quant}"

    @property
    def name(self) -> str:
        """FORMAT-QUANT, as bench reports and bundles name it."""
        return f"{self.format}-{self.quant}"

    @property
    def file(self) -> str:
        """Its path inside an export artifact: a .gguf file, or an ONNX model dir."""
        return f"model-{self.quant}.gguf" if self.format == "gguf" else self.quant


def _gguf(quant, bpw, tensor_type, file_type, bar_key=None, min_top1=None, llama_ftype=""):
    return Variant("gguf", quant, bpw, LLAMA_CPP, bar_key, min_top1, tensor_type, file_type, llama_ftype)


def _onnx(quant, bpw, bar_key=None, min_top1=None):
    return Variant("onnx", quant, bpw, ONNXRUNTIME, bar_key, min_top1)


# Our writer's GGUF types, then llama.cpp's quantizer's; the ONNX order is the order export_onnx produces them in.
VARIANTS = {v.key: v for v in (
    _gguf("f32", 32.0, "F32", 0),
    _gguf("f16", 16.0, "F16", 1),
    _gguf("bf16", 16.0, "BF16", 32),
    _gguf("q8_0", 8.5, "Q8_0", 7, "min_top1_q8_0", 0.99),  # 32 int8 + one fp16 scale per block
    _gguf("q4_0", 4.5, "Q4_0", 2, "min_top1_quant", 0.95, "LLAMA_FTYPE_MOSTLY_Q4_0"),  # 32 4-bit + an fp16 scale
    # + an fp16 minimum: the type of SmolLM2's registry GGUF, which a base imported from it re-quantizes to unchanged
    _gguf("q4_1", 5.0, "Q4_1", 3, "min_top1_quant", 0.95, "LLAMA_FTYPE_MOSTLY_Q4_1"),
    _gguf("q4_k_m", 4.89, "Q4_K", 15, "min_top1_quant", 0.95, "LLAMA_FTYPE_MOSTLY_Q4_K_M"),  # K-quant mixes:
    _gguf("q5_k_m", 5.69, "Q5_K", 17, "min_top1_quant", 0.95, "LLAMA_FTYPE_MOSTLY_Q5_K_M"),  # llama.cpp widens
    _gguf("q6_k", 6.5625, "Q6_K", 18, "min_top1_quant", 0.95, "LLAMA_FTYPE_MOSTLY_Q6_K"),  # attn_v, ffn_down
    _onnx("fp32", 32.0),
    _onnx("fp16", 16.0, "min_top1_fp16", 0.99),
    _onnx("int8", 10.0, "min_top1_int8", 0.99),  # MatMulNBits / GatherBlockQuantized: 8 bits + fp32 scale per 16
    _onnx("int4", 5.0, "min_top1_int4", 0.95),  # MatMulNBits / GatherBlockQuantized: 4 bits + fp32 scale per 32
)}


def get(fmt: str, quant: str) -> Variant:
    """The variant FORMAT, QUANT; an unknown one is a UserError listing the known ones."""
    return parse(f"{fmt}:{quant}")


def parse(key: str) -> Variant:
    """The variant of FORMAT:QUANT; an unknown one is a UserError listing the known ones."""
    if key not in VARIANTS:
        raise UserError(f"unknown variant {key!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[key]


def quants(fmt: str) -> tuple[str, ...]:
    """Every quant of a format, in the table's order."""
    return tuple(v.quant for v in VARIANTS.values() if v.format == fmt)


def gguf_from_file_type(file_type: int) -> Variant | None:
    """The gguf variant whose header says `general.file_type` = file_type, or None."""
    return next((v for v in VARIANTS.values() if v.format == "gguf" and v.file_type == file_type), None)


def bar(v: Variant, cfg) -> float | None:
    """The teacher-forced top-1 bar `cfg` (an export stage Config) sets for v; None: greedy parity."""
    return getattr(cfg, v.bar_key) if v.bar_key else None
