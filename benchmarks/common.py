"""Shared by the benchmarks: real-size Llama-style models with random weights, built offline.

`build_random_model(out_dir, name)` writes a transformers model dir (config.json, sharded fp32
safetensors + index, a 32,000-piece SentencePiece BPE tokenizer) for one of MODELS. Weights come
from a seeded generator, so the same name gives the same bytes. The tokenizer is trained once on
local text (the Python standard library sources of the running interpreter: a few MB of prose and
code, enough for a real 32k vocab) and cached under ~/.cache/edgeft (or $EDGEFT_HOME).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import sys
from pathlib import Path

VOCAB = 32000
# Llama-style shapes. 0.35b: hidden 1024, 24 layers (335M params); 1.1b: TinyLlama-1.1B's shape.
MODELS = {
    "0.35b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=4, max_position_embeddings=2048),
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=2048),
}
_SHARD_BYTES = 2 << 30  # safetensors shard size: keeps the builder's own peak memory near one shard
_INIT_STD = 0.02  # the usual Llama initializer range
_TOKENIZER_TEXT_BYTES = 12 << 20  # stdlib text fed to the tokenizer trainer


def cache_dir() -> Path:
    """edgeft's cache root ($EDGEFT_HOME or ~/.cache/edgeft)."""
    return Path(os.environ.get("EDGEFT_HOME") or Path.home() / ".cache" / "edgeft")


def build_random_model(out_dir: str | Path, name: str) -> Path:
    """Write the random-weight Llama-style model `name` ('0.35b' or '1.1b') to `out_dir`; return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = benchmark_tokenizer()
    for f in tok_dir.iterdir():
        shutil.copy2(f, out / f.name)
    cfg = LlamaConfig(vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=False, torch_dtype="float32", architectures=["LlamaForCausalLM"],
                      **MODELS[name])
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    weight_map, shard, shard_bytes, shards = {}, {}, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        fname = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        shards.append(fname)
        weight_map.update({k: fname for k in shard})
        shard, shard_bytes = {}, 0

    for tname, shape in _tensor_shapes(cfg):
        if len(shape) == 1:
            t = torch.ones(shape)  # RMSNorm weights start at 1
        else:
            t = torch.empty(shape).normal_(0.0, _INIT_STD, generator=gen)
        shard[tname] = t
        shard_bytes += t.numel() * 4
        if shard_bytes >= _SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum((out / s).stat().st_size for s in shards)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return out


def n_params(name: str) -> int:
    """Parameter count of MODELS[name]."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, **MODELS[name])
    total = 0
    for _, shape in _tensor_shapes(cfg):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def benchmark_tokenizer() -> Path:
    """A 32k SentencePiece BPE tokenizer dir trained on stdlib text, built once and cached."""
    from edgeft.demo.tokenizer import train_tokenizer

    files = _stdlib_files()
    key = hashlib.sha256(f"{VOCAB}|{sys.version}|{len(files)}".encode()).hexdigest()[:12]
    out = cache_dir() / f"bench-tokenizer-{key}"
    if (out / "tokenizer.json").is_file():
        return out
    texts, size = [], 0
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            line = line.strip()
            if len(line) > 3:
                texts.append(line[:2000])
                size += len(line)
        if size > _TOKENIZER_TEXT_BYTES:
            break
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, VOCAB, tmp)
    tmp.rename(out)
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _stdlib_files() -> list[Path]:
    lib = Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    skip = ("site-packages", "test", "idlelib", "lib2to3")
    return sorted(p for p in lib.rglob("*.py") if not any(s in p.relative_to(lib).parts for s in skip))


def _tensor_shapes(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama tensor names and shapes, in the order save_pretrained writes them."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


# --smoke: a tiny random-weight Llama (the dims K-quants and MatMulNBits accept; intermediate != vocab so
# no exporter takes the MLP for the head) with a small tokenizer, both built in seconds.
SMOKE_VOCAB = 1024
SMOKE_MODEL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=512)
_SMOKE_TOKENIZER_TEXT_BYTES = 1 << 20


def build_smoke_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny random-weight model of SMOKE_MODEL (one fp32 safetensors file) to `out_dir`; return it."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in smoke_tokenizer().iterdir():
        shutil.copy2(f, out / f.name)
    cfg = LlamaConfig(vocab_size=SMOKE_VOCAB, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32",
                      architectures=["LlamaForCausalLM"], **SMOKE_MODEL)
    cfg.save_pretrained(out)
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, _INIT_STD, generator=gen)
               for name, shape in _tensor_shapes(cfg)}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def smoke_tokenizer() -> Path:
    """A SMOKE_VOCAB-piece SentencePiece BPE tokenizer dir trained on 1 MiB of stdlib text, built once and cached."""
    from edgeft.demo.tokenizer import train_tokenizer

    files = _stdlib_files()
    key = hashlib.sha256(f"smoke|{SMOKE_VOCAB}|{sys.version}|{len(files)}".encode()).hexdigest()[:12]
    out = cache_dir() / f"bench-smoke-tokenizer-{key}"
    if (out / "tokenizer.json").is_file():
        return out
    texts, size = [], 0
    for f in files:
        lines = [ln.strip()[:2000] for ln in f.read_text(errors="replace").splitlines() if len(ln.strip()) > 3]
        texts += lines
        size += sum(map(len, lines))
        if size > _SMOKE_TOKENIZER_TEXT_BYTES:
            break
    tmp = out.with_name(f"{out.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, SMOKE_VOCAB, tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out



# The data settings of a retrieval-tuned run (recipes/smollm2-grounded.yaml), for grounded smoke runs.
GROUNDED_DATA = {"heldout_facts": 0.3, "unanswerable": 0.15, "train_phrasings": 1, "retrieval_k": 3,
                 "manual_heldout": 0}


def build_smoke_run(run: str | Path, grounded: bool = False) -> Path:
    """A run dir like `edgeft run` leaves (tests/conftest.py's make_tiny_run): the embedded data artifact and
    the SMOKE_MODEL random-weight Llama as its tuned (merge) hf artifact, in seconds; returns the run dir.
    grounded: the data artifact of a retrieval-tuned run (GROUNDED_DATA), so its bundle answers grounded."""
    from edgeft import artifact
    from edgeft.stages import data

    run = Path(run)
    data.run(None, data.Config(**(GROUNDED_DATA if grounded else {})), run / "data")

    def payload(staging: Path) -> dict:
        build_smoke_model(staging)
        return {}

    artifact.build(run / "merge", kind="hf", stage="merge", params={"model": "smoke", **SMOKE_MODEL,
                                                                   "weights": "random"},
                   parent=None, payload=payload)
    return run


def build_smoke_bundle(work: str | Path, max_new_tokens: int = 16, grounded: bool = False) -> tuple[Path, Path]:
    """A GGUF q8_0 bundle (profile tiny, one thread) of build_smoke_run's model under `work`, as tests/test_ask.py
    builds one: (bundle dir, data artifact dir). Random weights, so the export's top-1 bars and the bench's
    accuracy gate are off; answers are capped at `max_new_tokens`."""
    from edgeft import profile
    from edgeft.stages.bundle import Config as BundleConfig
    from edgeft.stages.bundle import run as export_bundle

    work = Path(work)
    run = build_smoke_run(work / "run", grounded)
    # grounded prompts carry k passages: in the smoke vocabulary they need more than the tiny profile's 256
    prof = profile.load("tiny", {"gguf": "q8_0", "onnx": "", "bench_samples": "2", "accuracy_budget": "0",
                                 "threads": "1", **({"context_length": "512"} if grounded else {})})
    params = {"export_gguf": {"min_top1_q8_0": 0.0, "min_top1_quant": 0.0, "parity_samples": 4}}
    art = export_bundle(run, BundleConfig(profile=prof, stage_params=params, max_new_tokens=max_new_tokens),
                        work / "bundle")
    return art.path, run / "data"


if __name__ == "__main__":
    print(build_random_model(sys.argv[1], sys.argv[2]))
