"""Loading helpers shared by the torch stages: where a base model lives, its tokenizer, memory."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgeft import artifact
from edgeft.constants import TOKENIZER_FILES
from edgeft.errors import UserError



def resolve_model(src) -> Path:
    """A local model dir for an hf artifact, a local dir or a hub id (hub ids from the local cache)."""
    if isinstance(src, artifact.Artifact):
        return src.path
    path = Path(str(src)).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"base.model: {path} has no config.json; pass a transformers model dir")
        return path
    if str(src).count("/") != 1 or str(src).startswith((".", "/", "~")):
        raise UserError(f"base.model: '{src}' is neither an existing dir nor a hub id (org/name); "
                        "pass a local model dir or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all the same to the user
        raise UserError(f"base.model: cannot load hub model '{src}' ({type(e).__name__}); download it "
                        "once with network access or pass a local dir") from None


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer files present in a model dir."""
    return artifact.hash_files([model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()])


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """Copy the tokenizer and generation files so the artifact stands alone."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copyfile(src_dir / name, dst_dir / name)


def bnb_config(quant_type: str, double_quant: bool, compute_dtype):
    """The bitsandbytes 4-bit config QLoRA trains and merges with."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (2**20 if sys.platform == "darwin" else 2**10), 1)
