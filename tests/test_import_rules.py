"""The boundaries that let a device run edgeft without torch: runtime/, bench/ and device/ import no
build-side code (stages/, training/, gguf/, onnx/, bundle/) and no torch stack; the artifact contract imports nothing above it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "edgeft"
DEVICE_SIDE = ("runtime", "bench", "device")
TORCH_STACK = ("torch", "transformers", "peft", "optimum", "accelerate", "bitsandbytes")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _device_files():
    return sorted(p for d in DEVICE_SIDE for p in (PKG / d).rglob("*.py"))


@pytest.mark.parametrize("path", _device_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_device_side_imports_no_training_code(path):
    # the build side: the stages and the components they are made of (converters, quantizers, gates)
    training = ("edgeft.stages", "edgeft.training", "edgeft.gguf", "edgeft.onnx", "edgeft.bundle", "edgeft.demo",
                "edgeft.pipeline")
    bad = sorted(m for m in _imports(path)
                 if any(m == t or m.startswith(t + ".") for t in training) or m.split(".")[0] in TORCH_STACK)
    # the bench may run torch models in its worker on the build host only, behind this one module
    allowed = {"edgeft/runtime/hf.py": {"torch", "transformers", "transformers.AutoModelForCausalLM"}}
    bad = [m for m in bad if m not in allowed.get(str(path.relative_to(PKG.parent)), set())]
    assert not bad, f"{path.relative_to(PKG.parent)} imports {bad}"


def test_the_contract_imports_nothing_above_it():
    for name in ("artifact.py", "constants.py", "errors.py", "host.py", "rss.py"):
        mods = {m for m in _imports(PKG / name) if m.startswith("edgeft")}
        assert mods <= {"edgeft", "edgeft.constants", "edgeft.errors", "edgeft.rss", "edgeft.constants.KINDS",
                        "edgeft.constants.MANIFEST_NAME", "edgeft.constants.MANIFEST_VERSION",
                        "edgeft.constants.TMP_PREFIX", "edgeft.constants.EXIT_BAD_INPUT",
                        "edgeft.constants.EXIT_RUNTIME", "edgeft.errors.StageFailure",
                        "edgeft.errors.UserError"}, (name, sorted(mods))


def test_device_commands_import_with_the_torch_stack_missing():
    mods = [f"edgeft.{p.relative_to(PKG).with_suffix('').as_posix().replace('/', '.')}" for p in _device_files()
            if p.name != "__init__.py" and p.name not in ("hf.py", "plots.py")]
    code = ("import sys\n"
            f"for m in {TORCH_STACK!r}: sys.modules[m] = None\n"
            f"import importlib\nfor m in {mods!r}: importlib.import_module(m)\n"
            "from edgeft import cli, host\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
