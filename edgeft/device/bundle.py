"""Open a bundle (dist/PROFILE) on the device: verify every file's sha256, then open its runtime.

Torch-free: stdlib, numpy, tokenizers and the one runtime the bundle names (llama_cpp or
onnxruntime). A GPU setting the device cannot honour (no CUDA build of llama.cpp, no CUDA execution
provider) falls back to the CPU with a warning on stderr rather than failing to answer.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from edgeft.artifact import sha256_file
from edgeft.constants import BUNDLE_FILE, BUNDLE_MODEL_DIR, BUNDLE_VERSION, KIND_BUNDLE, MANIFEST_NAME
from edgeft.errors import UserError


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its bundle.json."""

    path: Path
    spec: dict  # bundle.json
    manifest: dict  # manifest.json (sha256 of every file)

    @property
    def model_path(self) -> Path:
        """The .gguf file or the ONNX model dir."""
        return self.path / self.spec["variant"]["path"]

    @property
    def format(self) -> str:
        return self.spec["variant"]["format"]

    @property
    def manual_path(self) -> Path | None:
        """The bundled manual text for retrieval, if any."""
        rel = self.spec.get("manual")
        return self.path / rel if rel else None

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / BUNDLE_MODEL_DIR


def open_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and bundle.json; with `verify`, refuse any missing, changed or extra file."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise UserError(f"{path}: not a bundle (no {MANIFEST_NAME}); pass the dist/PROFILE dir that "
                        "`edgeft export` wrote")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{mpath}: corrupt manifest; copy the bundle again from the build host") from None
    if manifest.get("kind") != KIND_BUNDLE:
        raise UserError(f"{path}: artifact kind is '{manifest.get('kind')}', not a bundle; pass the dist/PROFILE "
                        "dir that `edgeft export` wrote")
    if verify:
        verify_bundle(path, manifest)
    spec = json.loads((path / BUNDLE_FILE).read_text())
    if spec.get("bundle_version") != BUNDLE_VERSION:
        raise UserError(f"{path / BUNDLE_FILE}: bundle_version {spec.get('bundle_version')} is not "
                        f"{BUNDLE_VERSION}; install the edgeft version that built it or re-export")
    return Bundle(path, spec, manifest)


def verify_bundle(path: Path, manifest: dict) -> int:
    """Check the sha256 of every listed file and that the model dir holds nothing unlisted; returns the count."""
    files = manifest.get("files", {})
    if BUNDLE_FILE not in files:
        raise UserError(f"{path / MANIFEST_NAME}: lists no {BUNDLE_FILE}; copy the bundle again from the build host")
    root = path.resolve()
    for rel, meta in files.items():
        f = path / rel
        if Path(rel).is_absolute() or root not in (root / rel).resolve().parents:
            raise UserError(f"{path / MANIFEST_NAME}: entry '{rel}' points outside the bundle (hostile or edited "
                            "manifest); refusing it; copy the bundle again from the build host")
        if not f.is_file():
            raise UserError(f"{f}: missing from the bundle (listed in {MANIFEST_NAME}); copy the bundle again "
                            "from the build host")
        if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
            raise UserError(f"{f}: sha256 does not match the bundle manifest (tampered or corrupted); refusing "
                            "to run it; copy the bundle again from the build host")
    for f in sorted((path / BUNDLE_MODEL_DIR).rglob("*")):
        rel = str(f.relative_to(path))
        if f.is_file() and rel not in files:
            raise UserError(f"{f}: not part of the bundle (unlisted in {MANIFEST_NAME}); remove it or copy the "
                            "bundle again from the build host")
    return len(files)


def open_runtime(bundle: Bundle, threads: int | None = None, n_ctx: int | None = None):
    """The bundle's runtime with its device settings (GPU offload or execution provider), CPU fallback."""
    rt = bundle.spec["runtime"]
    threads = threads or rt["threads"]
    n_ctx = n_ctx or rt["n_ctx"]
    if bundle.format == "gguf":
        import llama_cpp

        from edgeft.runtime.gguf import GGUFRuntime

        layers = rt.get("n_gpu_layers", 0)
        if layers and not llama_cpp.llama_supports_gpu_offload():
            _warn("this llama-cpp-python has no GPU offload (a CPU build); running on the CPU. On a Jetson "
                  "reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\"")
            layers = 0
        return GGUFRuntime(bundle.model_path, n_threads=threads, n_ctx=n_ctx, n_gpu_layers=layers,
                           kv_type=rt.get("kv_cache_type", "f16"))
    if bundle.format == "onnx":
        import onnxruntime as ort

        from edgeft.runtime.onnx import OnnxRuntime

        provider = rt.get("onnx_provider", "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            _warn(f"onnxruntime here offers {', '.join(ort.get_available_providers())}, not {provider}; "
                  "running on the CPU. On a Jetson install onnxruntime-gpu from NVIDIA's Jetson wheel index")
            provider = "CPUExecutionProvider"
        return OnnxRuntime(bundle.model_path, n_threads=threads, provider=provider)
    raise UserError(f"{bundle.path / BUNDLE_FILE}: unknown variant format {bundle.format!r} (gguf or onnx)")


def _warn(msg: str) -> None:
    print(f"edgeft: warning: {msg}", file=sys.stderr)
