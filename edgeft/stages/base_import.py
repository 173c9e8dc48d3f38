"""Import a GGUF file as the base model: a transformers model dir the chain can train, cached by sha256.

`base.model` may be a `.gguf` file (or a dir holding exactly one). transformers dequantizes its weights
to float32; the tokenizer is rebuilt from the GGUF's own metadata rather than from the loader's
guesses: BOS/EOS/PAD/UNK ids, `add_bos_token`, the chat template, and the pre-tokenizer that
`tokenizer.ggml.pre` names (transformers 4.57 makes eos `<|im_start|>` for SmolLM2, adds a BOS the
GGUF says not to add, drops SmolLM's digit split, and saves a copy of the whole GGUF as
`tokenizer.model`). Architectures the chain cannot carry to the end are refused with the list.

The result is an `hf` artifact (kind hf, stage base_import) under EDGEFT_HOME/imported-SHA, whose
manifest records the source file's sha256 and its tensor types, and which the train stage takes as
its parent: `edgeft show` walks from any later artifact back to the GGUF file.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import KIND_HF
from edgeft.errors import UserError

# GGUF general.architecture -> what it becomes; the rest of the chain (GGUF writer, ONNX) supports these
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
# architectures transformers 4.57 loads from GGUF, but not as llama.cpp runs them: why, for the refusal
_MISREAD = {"gemma3": "transformers rebuilds its SentencePiece vocab as a Unigram model (other token ids than "
                      "llama.cpp's) and ignores the file's per-layer sliding-window pattern and attention scale; "
                      "start from the Hugging Face model dir instead"}
# tokenizer.ggml.pre -> the tokenizers pre-tokenizer that splits the same way llama.cpp does
_PRE = ("gpt2", "gpt-2", "default", "smollm", "llama-bpe", "llama3", "qwen2")


@dataclass(frozen=True)
class Config:
    source: str = opt("", "the .gguf file (or a dir holding exactly one)")


def source_file(model: str) -> Path | None:
    """The .gguf file `model` names (a file, or a dir with one .gguf and no config.json), else None."""
    p = Path(str(model)).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(p.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UserError(f"base.model: {p} holds {len(found)} .gguf files; name the one to import")
    return None


def ensure(model: str, cache: Path) -> artifact.Artifact:
    """The imported hf artifact for GGUF `model`, built once per file content under `cache`."""
    src = source_file(model)
    if src is None:
        raise UserError(f"base.model: {model} is not a .gguf file; pass the file or a dir holding one")
    sha = artifact.sha256_file(src)
    return run(None, Config(source=str(src)), cache / f"imported-{sha[:16]}", sha256=sha)


def run(src, cfg: Config, out: Path, sha256: str | None = None) -> artifact.Artifact:
    """Import `cfg.source` into an hf artifact at `out` (skipped when that file was imported already)."""
    path = source_file(cfg.source)
    if path is None:
        raise UserError(f"base_import.source: {cfg.source} is not a .gguf file")
    sha256 = sha256 or artifact.sha256_file(path)
    # the id depends on the file's content, not on where it lies
    params = {"source_sha256": sha256}

    def payload(tmp: Path) -> dict:
        meta = read_metadata(path)  # only on a miss: reading 49k vocabulary strings takes seconds
        _import(path, meta, tmp)
        return {"source": str(path), "source_quant_types": meta["tensor_types"], "architecture": meta["arch"],
                "tokenizer": {k: meta[k] for k in ("model", "pre", "bos", "eos", "add_bos")}}

    return artifact.build(out, kind=KIND_HF, stage="base_import", params=params, parent=None, payload=payload,
                          inputs={"source_sha256": sha256})


def read_metadata(path: Path) -> dict:
    """The GGUF keys the import needs; an unsupported architecture or pre-tokenizer is a UserError."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # a truncated or foreign file: numpy/struct errors of many kinds
        raise UserError(f"{path}: not a readable GGUF file ({type(e).__name__}); download it again") from None

    def get(key, default=None):
        f = r.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        return v

    arch = get("general.architecture")
    if arch not in ARCHITECTURES:
        why = f" ({arch}: {_MISREAD[arch]})" if arch in _MISREAD else ""
        raise UserError(f"{path}: GGUF architecture '{arch}' is not supported by the chain; supported: "
                        f"{', '.join(ARCHITECTURES)}{why}")
    model = get("tokenizer.ggml.model")
    pre = get("tokenizer.ggml.pre", "default")
    if model != "gpt2" and model != "llama":
        raise UserError(f"{path}: tokenizer model '{model}' is not supported (gpt2 byte-level BPE or llama "
                        "SentencePiece)")
    if model == "gpt2" and pre not in _PRE:
        raise UserError(f"{path}: pre-tokenizer '{pre}' is not one edgeft reproduces; supported: {', '.join(_PRE)}")
    tokens = get("tokenizer.ggml.tokens") or []

    def token(key):
        i = get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return {"arch": arch, "model": model, "pre": pre, "bos": token("tokenizer.ggml.bos_token_id"),
            "eos": token("tokenizer.ggml.eos_token_id"), "pad": token("tokenizer.ggml.padding_token_id"),
            "unk": token("tokenizer.ggml.unknown_token_id"),
            "add_bos": bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
            "chat_template": get("tokenizer.chat_template"),
            "tensor_types": dict(sorted(Counter(t.tensor_type.name for t in r.tensors).items()))}


def _import(path: Path, meta: dict, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="edgeft-import-") as tmp:
        link = Path(tmp) / path.name  # transformers wants (dir, file name); a link keeps the source untouched
        link.symlink_to(path.resolve())
        with contextlib.redirect_stderr(io.StringIO()):  # the loader's progress bar and tokenizer notices
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
    ids = {k: tok.convert_tokens_to_ids(meta[k]) for k in ("bos", "eos", "pad") if meta[k] is not None}
    model.config.bos_token_id = ids.get("bos")
    model.config.eos_token_id = ids.get("eos")
    model.config.pad_token_id = ids.get("pad")
    if model.generation_config is not None:
        model.generation_config.bos_token_id, model.generation_config.eos_token_id = ids.get("bos"), ids.get("eos")
        model.generation_config.pad_token_id = ids.get("pad")
    model.save_pretrained(out, safe_serialization=True)
    for key in ("bos", "eos", "pad", "unk"):
        if meta[key] is not None:
            setattr(tok, f"{key}_token", meta[key])
    tok.add_bos_token = meta["add_bos"]
    tok.add_eos_token = False
    if meta["chat_template"]:
        tok.chat_template = meta["chat_template"]
    if meta["model"] == "gpt2":
        tok.backend_tokenizer.pre_tokenizer = _pre_tokenizer(meta["pre"])
    tok.save_pretrained(out)
    sp = out / "tokenizer.model"
    if sp.is_file() and sp.read_bytes()[:4] == b"GGUF":  # transformers' copy of the whole GGUF
        sp.unlink()
    _fix_tokenizer_config(out / "tokenizer_config.json", meta)
    shutil.rmtree(out / ".cache", ignore_errors=True)


def _pre_tokenizer(pre: str):
    """The tokenizers pre-tokenizer splitting text as llama.cpp's `pre` does (then byte-level)."""
    from tokenizers import Regex, pre_tokenizers

    from edgeft.gguf.vocab import PRE_TOKENIZER_REGEX

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre in ("gpt2", "gpt-2", "default"):
        return byte_level
    if pre == "smollm":  # single digits, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = PRE_TOKENIZER_REGEX["llama-bpe" if pre in ("llama-bpe", "llama3") else pre]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])


def _fix_tokenizer_config(path: Path, meta: dict) -> None:
    """What the GGUF says, in tokenizer_config.json: BOS adding and the special tokens, as text."""
    cfg = json.loads(path.read_text())
    cfg["add_bos_token"] = meta["add_bos"]
    cfg["add_eos_token"] = False
    for key in ("bos", "eos", "pad", "unk"):
        if meta[key] is not None:
            cfg[f"{key}_token"] = meta[key]
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
