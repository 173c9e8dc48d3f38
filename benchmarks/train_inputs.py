"""What the training benchmarks train on: the model (--model) and the data artifact, built or found offline.

The models: the 58M-parameter Llama CONFIG with random weights and the benchmarks' 32k tokenizer (the default),
SMOKE_CONFIG with a 512-piece tokenizer trained on the demo manual (--smoke), SmolLM2-135M-Instruct ('smollm2':
the pipeline's cached base_import artifact of the registry's GGUF), or any local transformers model dir.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
              num_key_value_heads=8, max_position_embeddings=2048)
SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=512)
SMOKE_VOCAB = 512
# Real-size shapes with random weights and the benchmarks' 32k vocab, for speed and memory where no weights can be
# fetched: --model random:NAME. llama3.2-1b is Llama 3.2 1B's body (hidden 2048, 16 layers, GQA 32/8, MLP 8192,
# tied embeddings), about 1.0B parameters with the 32k vocab instead of its 128k.
SHAPES = {"llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)}
RANDOM = "random:"
DEFAULT_DATA = ""  # the embedded demo QA; pass --data for a real set (the reference used emanual-tv qa.jsonl)


def resolve_model(name: str, work: Path, smoke: bool) -> tuple[Path, dict]:
    """(model dir, what it is): the tiny smoke model, the 58M random config (name ''), a real-size random shape
    ('random:NAME', NAME in SHAPES), SmolLM2-135M-Instruct ('smollm2': the pipeline's cached base_import of the
    registry's GGUF) or a local transformers model dir."""
    from edgeft.constants import SMOLLM2

    if smoke:
        return build_model(work / "model-smoke", config=SMOKE_CONFIG, tokenizer=smoke_tokenizer(work)), \
            {"name": "smoke (tiny Llama config)", "weights": "random"}
    if not name:
        return build_model(work / "model58m"), {"name": "58M Llama config", "weights": "random"}
    if name.startswith(RANDOM):
        shape = name[len(RANDOM):]
        if shape not in SHAPES:
            raise SystemExit(f"--model {name}: unknown shape; known: {', '.join(RANDOM + k for k in SHAPES)}")
        return build_model(work / f"model-{shape}", config=SHAPES[shape]), \
            {"name": f"{shape} shape", "weights": "random"}
    if name == SMOLLM2:
        from edgeft.demo import smollm2
        from edgeft.demo.base import cache_dir
        from edgeft.stages import base_import

        art = base_import.ensure(str(smollm2.fetch_gguf()), cache_dir())  # what pipeline.run trains from
        return art.path, {"name": "SmolLM2-135M-Instruct", "weights": "pretrained (Q4_1 GGUF, imported as float32)",
                          "artifact_id": art.id}
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not a transformers model dir (no config.json); pass a local model dir, "
                         f"'{SMOLLM2}', {', '.join(RANDOM + k for k in SHAPES)}, or nothing for the 58M random config")
    return path, {"name": path.name, "weights": "pretrained"}


def model_shape(model_dir: Path) -> dict:
    """The saved config's shape and the parameter count."""
    cfg = json.loads((model_dir / "config.json").read_text())
    keys = (*CONFIG, "vocab_size", "tie_word_embeddings")
    return {**{k: cfg[k] for k in keys if k in cfg}, "params": n_params(model_dir)}


def build_model(out: Path, config: dict | None = None, tokenizer: Path | None = None) -> Path:
    """A Llama of `config` (default: the 58M CONFIG) with seeded random weights and `tokenizer`'s vocab
    (default: the benchmarks' 32k tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    if tokenizer is None:
        from benchmarks.common import VOCAB, benchmark_tokenizer

        tokenizer, vocab = benchmark_tokenizer(), VOCAB
    else:
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2,
                                            "tie_word_embeddings": False, "rms_norm_eps": 1e-5, **(config or CONFIG)}))
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for f in Path(tokenizer).iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return out


def smoke_tokenizer(work: Path) -> Path:
    """A SMOKE_VOCAB-piece tokenizer (chat template included) trained on the demo manual: seconds, offline."""
    from edgeft.demo.manual import generate_manual
    from edgeft.demo.tokenizer import train_tokenizer

    out = work / f"tokenizer-{SMOKE_VOCAB}"
    if (out / "tokenizer.json").is_file():
        return out
    manual = generate_manual(0)
    texts = [t for t in manual.text().splitlines() if t.strip()]
    texts += [q for f in manual.facts for q in f.train_questions] + [f.answer for f in manual.facts]
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, SMOKE_VOCAB, tmp)
    tmp.rename(out)
    return out


def n_params(model_dir: Path) -> int:
    """Parameter count from the saved config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in m.parameters())


def data_artifact(path: str, work: Path):
    """An edgeft data artifact of `path`, or of the embedded demo QA pairs when the file is missing."""
    from edgeft.stages import data

    if path and Path(path).is_file():
        return data.run(None, data.Config(train=path, eval=""), work / "data" / Path(path).stem), path
    from edgeft.demo.manual import write_embedded_data

    src = work / "embedded"
    src.mkdir(parents=True, exist_ok=True)
    write_embedded_data(src, 0)
    return data.run(None, data.Config(train=str(src / "train.jsonl"), eval=""), work / "data" / "embedded"), \
        "embedded demo manual QA (fallback)"


def encode(model_dir: Path, data_art, max_length: int) -> list:
    """The train split as (ids, labels): exactly what the train stage feeds its loop."""
    from edgeft.constants import TRAIN_FILE
    from edgeft.records import read_jsonl
    from edgeft.runtime.prompt import PromptFormatter
    from edgeft.training.examples import encode as _examples

    return _examples(PromptFormatter(model_dir), read_jsonl(data_art.path / TRAIN_FILE), max_length)
