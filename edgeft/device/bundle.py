"""Open a bundle (dist/PROFILE) on the device: verify it as a whole, then open its runtime.

Torch-free: stdlib, numpy, tokenizers and the one runtime the bundle names (llama_cpp or
onnxruntime). A bundle is trusted only as a whole: its manifest (and, where the device trusts keys,
its Ed25519 signature) covers every file in it; no file outside the manifest, no symlink and no path
outside the bundle is accepted, and every path bundle.json names must be a manifest entry. What is
verified is what is used: small files (bundle.json, tokenizer, template, manual) are used from the
bytes that were hashed, a GGUF is handed to llama.cpp through the file descriptor it was hashed
through, and ONNX files (opened by onnxruntime itself) are hashed again once the session is built.
A GPU setting the device cannot honour falls back to the CPU with a warning on stderr.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from edgeft import artifact
from edgeft.constants import (
    BUNDLE_FILE,
    BUNDLE_MODEL_DIR,
    BUNDLE_VERSION,
    KIND_BUNDLE,
    MANIFEST_NAME,
    RETRIEVAL_FILE,
    SIGNATURE_FILE,
)
from edgeft.errors import UserError
from edgeft.runtime.grounding import Spec

KEEP_BYTES = 64 << 20  # files up to this size are kept as the verified bytes the device then uses
_MANIFEST_MAX = 16 << 20
_UNLISTED_OK = (MANIFEST_NAME, SIGNATURE_FILE)
_RUNTIME_OPENED = (".onnx", ".data", ".onnx_data")  # onnxruntime opens these itself: hashed again after load
_FIX = "copy the bundle again from the build host"


@dataclass
class Bundle:
    """A verified bundle directory, its bundle.json, and the verified bytes or open files it is used from."""

    path: Path
    spec: dict  # bundle.json
    manifest: dict  # manifest.json (sha256 of every file)
    signer: str | None = None  # key id of a valid signature, None when unsigned
    blobs: dict[str, bytes] = field(default_factory=dict, repr=False)  # rel path -> verified bytes
    handles: dict[str, int] = field(default_factory=dict, repr=False)  # rel path -> fd it was hashed through

    @property
    def model_path(self) -> Path:
        """The .gguf file (through its verified descriptor) or the ONNX model dir."""
        return self._opened(self.spec["variant"]["path"])

    @property
    def lora_path(self) -> Path | None:
        """The LoRA GGUF applied over the model at run time (adapter exports), through its verified descriptor."""
        rel = self.spec["variant"].get("lora")
        return self._opened(rel) if rel else None

    def _opened(self, rel: str) -> Path:
        """/proc/self/fd/N for a file held open since it was hashed (so a swap on disk cannot reach the
        runtime); the plain path where /proc is missing or the file is opened by its runtime itself."""
        fd = self.handles.get(rel)
        proc = Path(f"/proc/self/fd/{fd}")
        return proc if fd is not None and proc.exists() else self.path / rel

    @property
    def format(self) -> str:
        return self.spec["variant"]["format"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / BUNDLE_MODEL_DIR

    def formatter(self):
        """The prompt formatter, built from the verified tokenizer and template bytes."""
        from edgeft.runtime.prompt import PromptFormatter

        prefix = BUNDLE_MODEL_DIR + "/"
        files = {rel[len(prefix):]: b for rel, b in self.blobs.items()
                 if rel.startswith(prefix) and "/" not in rel[len(prefix):]}
        return PromptFormatter(self.tokenizer_dir, files=files)

    def manual_text(self) -> str | None:
        """The bundled manual (verified bytes), or None when the bundle has none."""
        rel = self.spec.get("manual")
        return self.blobs[rel].decode("utf-8", errors="replace") if rel else None

    def grounding_spec(self) -> Spec | None:
        """The retriever settings the model was tuned with (grounded answers), None for a closed-book model."""
        d = self.spec.get("retrieval")
        return None if d is None else Spec.from_dict(d, str(self.path / BUNDLE_FILE))

    def recheck(self, rels: list[str]) -> None:
        """Hash these files again (those a runtime opened by path) against the manifest."""
        artifact.verify_dir(self.path, {rel: self.manifest["files"][rel] for rel in rels}, what="bundle", fix=_FIX)

    def close(self) -> None:
        """Release the descriptors held open since verification."""
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()


def open_bundle(path: str | Path, trusted: list[bytes] | None = None) -> Bundle:
    """Read and verify a bundle; refuse any missing, changed, extra or outside file, or a bad signature."""
    from edgeft.device import signing

    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not mpath.is_file() or mpath.is_symlink():
        raise UserError(f"{path}: not a bundle (no {MANIFEST_NAME}); pass the dist/PROFILE dir that "
                        "`edgeft export` wrote")
    raw = _read_capped(mpath, _MANIFEST_MAX)
    manifest = _json_object(raw, mpath)
    if manifest.get("kind") != KIND_BUNDLE:
        kind = manifest.get("kind")
        raise UserError(f"{path}: artifact kind is '{kind}', not a bundle; pass the dist/PROFILE dir that "
                        "`edgeft export` wrote")
    signer = signing.check(path, raw, trusted or [])
    bundle = Bundle(path, {}, manifest, signer)
    try:
        verify_bundle(path, manifest, bundle)
        bundle.spec = parse_spec(path, bundle.blobs[BUNDLE_FILE], manifest, bundle.blobs)
    except BaseException:
        bundle.close()
        raise
    return bundle


def verify_bundle(path: Path, manifest: dict, into: Bundle | None = None) -> int:
    """Check every listed file's sha256 and that the bundle holds nothing unlisted; returns the count.

    With `into`, small files' verified bytes and model files' open descriptors are kept there."""
    files = manifest.get("files")
    if not isinstance(files, dict) or BUNDLE_FILE not in files:
        raise UserError(f"{path / MANIFEST_NAME}: lists no {BUNDLE_FILE}; {_FIX}")

    def keep(rel: str) -> str | None:
        if into is None or rel.endswith(_RUNTIME_OPENED):
            return None
        return "fd" if rel.endswith(".gguf") else "bytes"

    kept = artifact.verify_dir(path, files, what="bundle", fix=_FIX, exclusive=_UNLISTED_OK, keep=keep,
                               keep_max=KEEP_BYTES)
    if into is not None:
        into.blobs.update({r: v for r, v in kept.items() if isinstance(v, bytes)})
        into.handles.update({r: v for r, v in kept.items() if isinstance(v, int)})
    return len(files)


def parse_spec(path: Path, raw: bytes, manifest: dict, blobs: dict[str, bytes]) -> dict:
    """bundle.json from its verified bytes; every path it names must be a manifest entry in the bundle."""
    where = path / BUNDLE_FILE
    spec = _json_object(raw, where)
    if spec.get("bundle_version") != BUNDLE_VERSION:
        raise UserError(f"{where}: bundle_version {spec.get('bundle_version')} is not {BUNDLE_VERSION}; install the edgeft version "
                        "that built it or re-export")
    files = manifest["files"]
    variant = spec.get("variant")
    rel = variant.get("path") if isinstance(variant, dict) else None
    if not isinstance(rel, str) or variant.get("format") not in ("gguf", "onnx"):
        raise UserError(f"{where}: variant.path and variant.format (gguf or onnx) are required; {_FIX}")
    listed_dir = any(k.startswith(rel.rstrip("/") + "/") for k in files)
    if (variant["format"] == "gguf" and rel not in files) or (variant["format"] == "onnx" and not listed_dir):
        raise UserError(f"{where}: variant.path '{rel[:200]}' is not a file of this bundle's manifest (hostile or "
                        f"edited bundle.json); refusing it; {_FIX}")
    lora = variant.get("lora")
    if lora is not None and (not isinstance(lora, str) or lora not in files or variant["format"] != "gguf"):
        raise UserError(f"{where}: variant.lora '{str(lora)[:200]}' is not a GGUF file of this bundle's manifest "
                        f"(hostile or edited bundle.json); refusing it; {_FIX}")
    manual = spec.get("manual")
    if manual is not None and (not isinstance(manual, str) or manual not in files):
        raise UserError(f"{where}: manual '{str(manual)[:200]}' is not a file of this bundle's manifest (hostile or "
                        f"edited bundle.json); refusing it; {_FIX}")
    _retrieval(path, spec, files, blobs)
    return spec


def _retrieval(path: Path, spec: dict, files: dict, blobs: dict[str, bytes]) -> None:
    """bundle.json's `retrieval` and the bundled retrieval.json must both be absent or say the same thing."""
    where, tuned = path / BUNDLE_FILE, spec.get("retrieval")
    if tuned is None:
        if RETRIEVAL_FILE in files:
            raise UserError(f"{path / RETRIEVAL_FILE}: present, but {BUNDLE_FILE} records no retrieval settings "
                            f"(the two disagree); {_FIX}")
        return
    recorded = Spec.from_dict(tuned, f"{where}: retrieval")
    if RETRIEVAL_FILE not in blobs:
        raise UserError(f"{path / RETRIEVAL_FILE}: missing, but {BUNDLE_FILE} says the model was tuned with "
                        f"retrieval; {_FIX}")
    if Spec.from_dict(_json_object(blobs[RETRIEVAL_FILE], path / RETRIEVAL_FILE), str(path / RETRIEVAL_FILE)) != recorded:
        raise UserError(f"{path / RETRIEVAL_FILE}: differs from {BUNDLE_FILE}'s retrieval settings (the two "
                        f"disagree); {_FIX}")
    if spec.get("manual") is None:
        raise UserError(f"{where}: retrieval settings but no manual to retrieve from; {_FIX}")


def _json_object(raw: bytes, where: Path) -> dict:
    """A JSON object from verified bytes; anything else is a corrupt bundle file."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: corrupt (not a JSON object); {_FIX}")
    return obj


def _read_capped(path: Path, cap: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"{path}: over {cap >> 20} MiB, not a bundle manifest; {_FIX}")
    return data


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
                           kv_type=rt.get("kv_cache_type", "f16"), lora_path=bundle.lora_path)
    if bundle.format == "onnx":
        import onnxruntime as ort

        from edgeft.runtime.onnx import OnnxRuntime

        provider = rt.get("onnx_provider", "CPUExecutionProvider")
        if provider not in ort.get_available_providers():
            _warn(f"onnxruntime here offers {', '.join(ort.get_available_providers())}, not {provider}; "
                  "running on the CPU. On a Jetson install onnxruntime-gpu from NVIDIA's Jetson wheel index")
            provider = "CPUExecutionProvider"
        runtime = OnnxRuntime(bundle.model_path, n_threads=threads, provider=provider)
        # onnxruntime opened the graph and its external data by path: hash what it read once more
        bundle.recheck([r for r in bundle.manifest["files"] if r.startswith(bundle.spec["variant"]["path"] + "/")
                        and r.endswith(_RUNTIME_OPENED)])
        return runtime
    raise UserError(f"{bundle.path / BUNDLE_FILE}: unknown variant format {bundle.format!r} (gguf or onnx)")


def _warn(msg: str) -> None:
    print(f"edgeft: warning: {msg}", file=sys.stderr)
