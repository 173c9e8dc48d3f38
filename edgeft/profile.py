"""Device profiles: what a target can hold and run, loaded from profiles/NAME.yaml or a path.

A profile names the device's memory and the share the model may use, its memory bandwidth (decode
on a small device is bandwidth-bound: it bounds tokens/s), the runtimes and execution provider that
actually install there, the formats to build and the quant ladder (best first) that the pre-flight
steps down when a variant does not fit, the context length to serve, and the accuracy budget.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from edgeft import variants
from edgeft.config import from_dict, load_yaml, opt
from edgeft.errors import UserError, short

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
FORMATS = variants.FORMATS  # ladder entries are FORMAT:QUANT
ONNX_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider",
                  "XnnpackExecutionProvider", "NnapiExecutionProvider", "QNNExecutionProvider",
                  "CoreMLExecutionProvider")
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ACCELERATORS = ("cpu", "cuda")
KV_CACHE_TYPES = ("f16", "f32")  # what edgeft.runtime.gguf offers

# The one mapping of a profile onto stage configs (`edgeft run`, `edgeft export` and `edgeft bench` all use
# stage_config): stage key -> profile key. What to build for the device is the profile's call, and so is how
# the bench runs it; a recipe may not set these keys (edgeft.pipeline.load_recipe refuses them).
STAGE_KEYS = {
    "export_gguf": {"types": "gguf", "threads": "threads"},
    "export_onnx": {"types": "onnx", "route": "onnx_route"},
    "bench": {"max_samples": "bench_samples", "threads": "threads", "n_ctx": "context_length",
              "bandwidth_gbs": "bandwidth_gbs",
              "kv_cache_type": "kv_cache_type", "n_gpu_layers": "n_gpu_layers", "onnx_provider": "onnx_provider",
              "accuracy_budget": "accuracy_budget", "memory_budget_gb": "memory_budget_gb"},
}
# the device's accelerator settings: kept when the bench runs on the device itself, off on the build host
_ON_DEVICE_ONLY = {"n_gpu_layers": 0, "onnx_provider": "CPUExecutionProvider"}


@dataclass(frozen=True)
class Profile:
    name: str = opt("x86-cpu", "profile name: names dist/NAME and bundle files (letters, digits, '.', '_', '-')")
    description: str = opt("", "the device in a sentence or two, for the bundle's README")
    memory_gb: float = opt(16.0, "device RAM (unified memory on a Jetson), GiB")
    memory_budget_gb: float = opt(8.0, "what the model may use: weights + KV cache + runtime, GiB")
    bandwidth_gbs: float = opt(36.0, "memory bandwidth, GB/s (datasheet or measured): bounds decode tok/s")
    threads: int = opt(2, "CPU threads for the runtimes")
    context_length: int = opt(512, "tokens the deployed model must serve")
    gguf: tuple[str, ...] = opt(("f16", "q8_0", "q4_k_m"), "GGUF types to build (empty = none)")
    onnx: tuple[str, ...] = opt(("fp32", "int8"), "ONNX types to build (empty = none)")
    onnx_provider: str = opt("CPUExecutionProvider", "onnxruntime execution provider on the device")
    onnx_route: str = opt("optimum", "ONNX export route: optimum (broad) | genai (onnxruntime-genai builder, CPU/x86)")
    n_gpu_layers: int = opt(0, "llama.cpp layers offloaded to the GPU (-1 = all)")
    accuracy_budget: float = opt(0.95, "a variant must keep this share of the tuned model's rouge_l (0 = no gate)")
    bench_samples: int = opt(120, "eval prompts measured per variant (0 = all)")
    ladder: tuple[str, ...] = opt((), "FORMAT:QUANT best first, exactly the built types; empty = by bits, widest first")
    accelerator: str = opt("cpu", "cpu | cuda: GPU offload and GPU execution providers need cuda")
    kv_cache_type: str = opt("f16", "llama.cpp KV cache precision on the device (pre-flight bytes per value)")
    runtime_overhead_gb: float = opt(0.25, "runtime code, compute buffers (+ CUDA context on a GPU), GiB")
    install: str = opt("pip install 'edgeft[device]'", "how the device runtimes install there (bundle README)")


def resolve(name_or_path: str) -> Path:
    """A profile name from profiles/ or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"--profile: file not found: {p}")
        return p
    cand = PROFILES_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        raise UserError(f"--profile: unknown profile '{name_or_path}'; choose one of {', '.join(names())} "
                        "or pass a YAML path")
    return cand


def names() -> list[str]:
    """The profiles shipped in profiles/."""
    return sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))


def load(name_or_path: str, overrides: dict | None = None) -> Profile:
    """Parse and validate a profile; `overrides` are `key: value` strings from the command line."""
    path = resolve(name_or_path)
    raw = load_yaml(path)
    overrides = dict(overrides or {})
    if ("gguf" in overrides or "onnx" in overrides) and "ladder" not in overrides:
        overrides["ladder"] = ()  # new types without a new ladder: order them by bits, widest first
    raw.update(overrides)
    prof = from_dict(Profile, raw, str(path))
    validate(prof, str(path))
    return prof


_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")


def validate(prof: Profile, where: str = "profile") -> None:
    """Refuse values no device can have, with the key and the fix in one line."""
    def bad(key: str, why: str) -> UserError:
        return UserError(f"{where}: {key}={short(getattr(prof, key))}: {why}")

    if not isinstance(prof.name, str) or not _SAFE_NAME.fullmatch(prof.name):
        raise bad("name", "use 1-64 letters, digits, '.', '_' or '-', not starting with '.' (it names dist/NAME "
                          "and files)")
    for key in ("memory_gb", "memory_budget_gb", "bandwidth_gbs"):
        if not getattr(prof, key) > 0:
            raise bad(key, "must be > 0")
    if prof.memory_budget_gb > prof.memory_gb:
        raise bad("memory_budget_gb", f"exceeds memory_gb {prof.memory_gb}")
    if not 0 <= prof.runtime_overhead_gb < prof.memory_budget_gb:
        raise bad("runtime_overhead_gb", f"must be >= 0 and below memory_budget_gb {prof.memory_budget_gb}")
    if prof.threads < 1:
        raise bad("threads", "must be >= 1")
    if prof.context_length < 16:
        raise bad("context_length", "must be >= 16 tokens")
    if not 0 <= prof.accuracy_budget <= 1:
        raise bad("accuracy_budget", "is a share of the tuned model's rouge_l: use a value in [0, 1], e.g. 0.95")
    if prof.bench_samples < 0:
        raise bad("bench_samples", "must be >= 0 (0 = every eval prompt)")
    if prof.n_gpu_layers < -1:
        raise bad("n_gpu_layers", "must be -1 (all), 0 (CPU) or a layer count")
    if prof.accelerator not in ACCELERATORS:
        raise bad("accelerator", f"use one of {', '.join(ACCELERATORS)}")
    if prof.onnx_route not in ("optimum", "genai"):
        raise bad("onnx_route", "use optimum or genai")
    if prof.onnx_provider not in ONNX_PROVIDERS:
        raise bad("onnx_provider", f"use one of {', '.join(ONNX_PROVIDERS)}")
    if prof.accelerator == "cpu" and (prof.n_gpu_layers != 0 or prof.onnx_provider in GPU_PROVIDERS):
        key = "n_gpu_layers" if prof.n_gpu_layers != 0 else "onnx_provider"
        raise bad(key, "needs a GPU: set accelerator: cuda, or n_gpu_layers: 0 and "
                       "onnx_provider: CPUExecutionProvider")
    if prof.kv_cache_type not in KV_CACHE_TYPES:
        raise bad("kv_cache_type", f"use one of {', '.join(KV_CACHE_TYPES)}")
    for key in FORMATS:
        types = getattr(prof, key)
        if len(set(types)) != len(types):
            raise bad(key, "lists a type twice")
        unknown = [t for t in types if f"{key}:{t}" not in variants.VARIANTS]
        if unknown:
            raise bad(key, f"unknown type {short(unknown[0])}; use some of {', '.join(variants.quants(key))}")
    if not prof.gguf and not prof.onnx:
        raise bad("gguf", "nothing to build: list GGUF or ONNX types")
    built = {f"gguf:{t}" for t in prof.gguf} | {f"onnx:{t}" for t in prof.onnx}
    if prof.ladder:
        malformed = [e for e in prof.ladder if e.partition(":")[0] not in FORMATS or not e.partition(":")[2]]
        if malformed:
            raise bad("ladder", f"entries are FORMAT:QUANT with FORMAT in {', '.join(FORMATS)}, "
                                f"e.g. gguf:q4_k_m; got {short(malformed[0])}")
        if len(set(prof.ladder)) != len(prof.ladder):
            raise bad("ladder", "lists a variant twice")
        extra, missing = sorted(set(prof.ladder) - built), sorted(built - set(prof.ladder))
        if extra or missing:
            raise bad("ladder", f"must list exactly the built types (gguf, onnx): "
                                f"{'not built: ' + ', '.join(extra) if extra else ''}"
                                f"{'; ' if extra and missing else ''}"
                                f"{'missing: ' + ', '.join(missing) if missing else ''}; "
                                "fix the list or set ladder: [] to order by bits")


def ladder(prof: Profile) -> tuple[str, ...]:
    """The profile's variants as FORMAT:QUANT, best first (its ladder, or widest bits first)."""
    if prof.ladder:
        return tuple(prof.ladder)
    entries = [f"gguf:{t}" for t in prof.gguf] + [f"onnx:{t}" for t in prof.onnx]
    return tuple(sorted(entries, key=lambda e: -variants.parse(e).bpw))


def stage_config(stage: str, cfg, prof: Profile, *, on_device: bool, max_context: int = 0):
    """`cfg` (the stage's Config) with `prof`'s keys for that stage (STAGE_KEYS): the one profile mapping.

    on_device: the bench runs on the device the profile describes (`edgeft bench` there); otherwise on
    this build host, so GPU offload and GPU execution providers stay off. max_context: the model's
    max_position_embeddings, which caps the profile's context length (0 = unknown).
    """
    fixed = {key: getattr(prof, pkey) for key, pkey in STAGE_KEYS[stage].items()}
    if not on_device:
        fixed.update({k: v for k, v in _ON_DEVICE_ONLY.items() if k in fixed})
    if "n_ctx" in fixed and max_context:
        fixed["n_ctx"] = min(fixed["n_ctx"], max_context)
    return dataclasses.replace(cfg, **fixed)
