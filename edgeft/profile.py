"""Device profiles: what a target can hold and run, loaded from profiles/NAME.yaml or a path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeft.config import from_dict, load_yaml
from edgeft.errors import UserError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str = "x86-cpu"
    description: str = ""
    memory_gb: float = 16.0  # device RAM (unified memory on a Jetson), GiB
    memory_budget_gb: float = 8.0  # what the model may use: weights + KV cache + runtime, GiB
    bandwidth_gbs: float = 36.0  # memory bandwidth, GB/s (datasheet or measured): bounds decode tok/s
    threads: int = 2  # CPU threads for the runtimes
    context_length: int = 512  # tokens the deployed model must serve
    gguf: tuple[str, ...] = ("f16", "q8_0", "q4_k_m")  # GGUF types to build (empty = none)
    onnx: tuple[str, ...] = ("fp32", "int8")  # ONNX types to build (empty = none)
    onnx_provider: str = "CPUExecutionProvider"  # onnxruntime execution provider on the device
    n_gpu_layers: int = 0  # llama.cpp layers offloaded to the GPU (-1 = all)
    accuracy_budget: float = 0.95  # a variant must keep this share of the tuned model's rouge_l
    bench_samples: int = 120  # eval prompts measured per variant (0 = all)


def resolve(name_or_path: str) -> Path:
    """A profile name from profiles/ or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"--profile: file not found: {p}")
        return p
    cand = PROFILES_DIR / f"{name_or_path}.yaml"
    if not cand.is_file():
        names = sorted(x.stem for x in PROFILES_DIR.glob("*.yaml"))
        raise UserError(f"--profile: unknown profile '{name_or_path}'; choose one of {', '.join(names)} "
                        "or pass a YAML path")
    return cand


def load(name_or_path: str, overrides: dict | None = None) -> Profile:
    """Parse and validate a profile; `overrides` are `key: value` strings from the command line."""
    path = resolve(name_or_path)
    raw = load_yaml(path)
    raw.update(overrides or {})
    prof = from_dict(Profile, raw, str(path))
    if prof.memory_budget_gb > prof.memory_gb:
        raise UserError(f"{path}: memory_budget_gb {prof.memory_budget_gb} exceeds memory_gb {prof.memory_gb}")
    if prof.threads < 1:
        raise UserError(f"{path}: threads must be >= 1")
    return prof
