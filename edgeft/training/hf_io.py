"""Loading helpers shared by the torch stages: where a base model lives, its tokenizer, memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgeft import artifact, safetensors_file
from edgeft.constants import TOKENIZER_FILES
from edgeft.errors import UserError


def resolve_model(src, trust_remote_code: bool = False) -> Path:
    """A local model dir for an hf artifact, a local dir or a hub id (hub ids from the local cache)."""
    if isinstance(src, artifact.Artifact):
        return src.path
    path = Path(str(src)).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"base.model: {path} has no config.json; pass a transformers model dir")
        check_remote_code(path, trust_remote_code)
        check_weights(path)
        return path
    if str(src).count("/") != 1 or str(src).startswith((".", "/", "~")):
        raise UserError(f"base.model: '{src}' is neither an existing dir nor a hub id (org/name); "
                        "pass a local model dir or a hub id")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(str(src), allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                "*.jinja", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated: all the same to the user
        raise UserError(f"base.model: cannot load hub model '{src}' ({type(e).__name__}); download it "
                        "once with network access or pass a local dir") from None
    check_remote_code(path, trust_remote_code)
    check_weights(path)
    return path


def check_remote_code(model_dir: Path, allowed: bool) -> None:
    """A model that ships its own Python code runs it only when the recipe says so."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{model_dir / 'config.json'}: unreadable ({e}); re-download or re-save the model") from None
    if config.get("auto_map") and not allowed:
        raise UserError(f"base.model: {model_dir} ships its own model code (auto_map in config.json), which edgeft "
                        "does not run by default; set base.trust_remote_code=true if you trust it")


def check_weights(model_dir: Path) -> None:
    """Refuse pickle-only checkpoints and truncated or corrupt safetensors before any stage loads them.

    Cheap: reads each file's JSON header and checks that the file holds every tensor it lists.
    """
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt")]
        hint = (f"it has only pickle weights ({', '.join(pickles[:3])}), which edgeft never loads; convert them "
                "to safetensors (model.save_pretrained(dir, safe_serialization=True))" if pickles else
                "it has no *.safetensors weights")
        raise UserError(f"base.model: {model_dir}: {hint}")
    for f in files:
        safetensors_file.read_header(f, complete=True)  # a corrupt or truncated file: a UserError naming it


def run_data(src: artifact.Artifact, need: str) -> artifact.Artifact | None:
    """The data artifact that trained `src` (holding file `need`): an ancestor records its id, the pipeline
    puts it in <run>/data. None when `src` did not come through a pipeline run."""
    from edgeft.constants import KIND_DATA, MANIFEST_NAME

    for art in artifact.lineage(src.path):
        data_id = art.inputs.get("data_id")
        cand = art.path.parent / "data"
        if data_id and (cand / MANIFEST_NAME).is_file():
            found = artifact.load(cand, kind=KIND_DATA)
            if found.id == data_id and (found.path / need).is_file():
                return found
    return None


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer files present in a model dir."""
    return artifact.hash_files([model_dir / f for f in TOKENIZER_FILES if (model_dir / f).is_file()])


def weights_hash(model_dir: Path) -> str:
    """sha256 over a model dir's weight files (safetensors, else pytorch .bin), in name order."""
    files = sorted(Path(model_dir).glob("*.safetensors")) or sorted(Path(model_dir).glob("pytorch_model*.bin"))
    return artifact.hash_files(files)


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


