"""Tiny models and data built offline: a SentencePiece tokenizer and 2-layer Llama with random weights.

Dims follow the traps in ENVIRONMENT.md: hidden 256 (K-quant rows need multiples of 256, Q8_0 and
MatMulNBits multiples of 32), intermediate 640 != vocab so no exporter mistakes the MLP for the head.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
TINY_VOCAB = 384
TINY_HIDDEN = 256


def pytest_collection_modifyitems(config, items):
    """GPU tests skip cleanly without CUDA: the CPU suite never pretends to cover them."""
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def tiny_corpus(n: int = 600, seed: int = 0) -> list[str]:
    """Repair-manual-like sentences: enough distinct pieces for a 384-token BPE vocab."""
    from edgeft.demo.manual import generate_manual

    manual = generate_manual(seed=seed, n_facts=n // 2)
    return [f.prose for f in manual.facts]


def tiny_qa(n: int = 48, seed: int = 0) -> list[dict]:
    """Question/answer records from the generated manual (train phrasings)."""
    from edgeft.demo.manual import generate_manual

    manual = generate_manual(seed=seed, n_facts=n)
    rng = random.Random(seed)
    return [{"question": rng.choice(f.train_questions), "answer": f.answer} for f in manual.facts]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A 384-piece SentencePiece BPE tokenizer with a chat template, saved as an HF tokenizer dir."""
    from edgeft.demo.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    return train_tokenizer(tiny_corpus(), TINY_VOCAB, out)


def _build_llama(tok_dir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = dict(vocab_size=len(tok), hidden_size=TINY_HIDDEN, intermediate_size=640,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    with torch.no_grad():  # larger-than-default init so greedy outputs are not all one token
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A 2-layer Llama (GQA 4/2 heads, hidden 256) with random weights and the tiny tokenizer."""
    return _build_llama(tiny_tokenizer_dir, tmp_path_factory.mktemp("llama"))


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_bpe_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a SmolLM2-style tokenizer: byte-level BPE after a single-digit split, ChatML
    specials, no BOS added (what Llama 3 / SmolLM2 / Qwen-style vocabularies look like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tiny_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    src = tmp_path_factory.mktemp("bpetok")
    fast.save_pretrained(src)
    return _build_llama(src, tmp_path_factory.mktemp("bpellama"), tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_qa_jsonl(tmp_path_factory) -> Path:
    """48 question/answer lines in JSONL."""
    path = tmp_path_factory.mktemp("data") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny_qa()))
    return path


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Call `edgeft ...` in this process; returns (exit code, stdout, stderr)."""
    from edgeft import cli as cli_mod

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))

    def call(*args):
        code = cli_mod.main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return call


def make_tiny_run(run: Path, model_dir: Path, **data_cfg) -> Path:
    """A run dir like `edgeft run` leaves: the embedded data (data.Config(**data_cfg)) and `model_dir` as the
    tuned hf artifact."""
    import shutil

    from edgeft import artifact
    from edgeft.stages import data

    data.run(None, data.Config(**data_cfg), run / "data")

    def payload(staging: Path) -> dict:
        for f in model_dir.iterdir():
            shutil.copy2(f, staging / f.name)
        return {}

    artifact.build(run / "merge", kind="hf", stage="merge", params={"model": "tiny"}, parent=None, payload=payload)
    return run


FORWARD_S = 0.1  # each forward slowed to at least this: it dwarfs a tiny model's own compute


def slowed(fn):
    """`fn` taking at least FORWARD_S longer: a forward whose cost the timers must attribute correctly."""
    import functools
    import time

    @functools.wraps(fn)
    def wrapper(*a, **k):
        time.sleep(FORWARD_S)
        return fn(*a, **k)
    return wrapper


def assert_forward_accounting(result, n_new: int) -> None:
    """The latency contract of every runtime, with forwards slowed by `slowed`: TTFT holds exactly one
    forward (the prompt's), decode exactly n_new - 1 (the forwards after the first token), so
    decode_tok_s = (n_new - 1) / decode_s counts what it times."""
    assert len(result.tokens) == n_new
    assert FORWARD_S <= result.ttft_s < 2 * FORWARD_S, f"TTFT {result.ttft_s:.3f} s is not one forward"
    assert (n_new - 1) * FORWARD_S <= result.decode_s < n_new * FORWARD_S, \
        f"decode {result.decode_s:.3f} s is not {n_new - 1} forwards"


def make_adapter(base_dir: Path, out: Path, **lora_kwargs) -> Path:
    """A peft LoRA on every linear layer with random (nonzero) A and B, saved like the train stage does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                   "up_proj", "down_proj"], lora_dropout=0.0)
    cfg.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(**cfg))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


# The ONNX export fixtures (tests/stages/test_export_onnx.py, tests/onnx/test_int4.py), built once per session.
# random weights give flat logits (top-1 agreement int8 ~0.85, int4 ~0.5): the gates' minimums are
# tested on their own below, the export fixtures switch them off
NO_MIN = {"min_top1_fp16": 0.0, "min_top1_int8": 0.0, "min_top1_int4": 0.0}

PROMPTS = ("Question: What is the torque for the wheel bolts?\nAnswer:", "The pump",
           "Error code E12 means", "Replace the filter every")
N_NEW = 24


def _hf_artifact(root, model_dir):
    from edgeft import artifact

    return artifact.build(root / "hf", kind="hf", stage="train", params={}, parent=None,
                          payload=lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True) and {})


@pytest.fixture(scope="session")
def hf(tmp_path_factory, tiny_llama_dir):
    return _hf_artifact(tmp_path_factory.mktemp("exp"), tiny_llama_dir)


@pytest.fixture(scope="session")
def exported(hf):
    from edgeft.stages import export_onnx as ex

    return ex.run(hf, ex.Config(types=ex.VALID_TYPES, **NO_MIN), hf.path.parent / "onnx")


@pytest.fixture(scope="session")
def torch_ref(tiny_llama_dir):
    """Prompt ids, torch greedy continuations (HF generate) and teacher-forced logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text).input_ids
            gen = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = gen[0, len(ids):].tolist()
            if new and new[-1] == tok.eos_token_id:
                new = new[:-1]
            logits = model(torch.tensor([ids + new])).logits[0].numpy()
            out.append((ids, new, logits))
    return out


# The small-model families users pick (issue #18): tiny random-weight configs with each family's quirks,
# shared by tests/test_families.py and tests/gguf/test_writer_families.py.
FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text")
GEMMA3_WINDOW = 4  # sliding_window of the tiny Gemma 3: shorter than every test prompt


@pytest.fixture(scope="session")
def tiny_qwen_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE with Qwen2's pre-tokenizer regex (Qwen2 and Qwen3 share it), ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgeft.gguf.vocab import PRE_TOKENIZER_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENIZER_REGEX["qwen2"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(tiny_corpus(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("qwentok")
    tok.save_pretrained(out)
    return out


def build_family(family: str, tok_dir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer random-weight model of `family` (FAMILIES) saved with the tokenizer of `tok_dir`.

    qwen2: q/k/v biases, tied. qwen3: q/k norms, head_dim 128 != hidden / heads (as Qwen3-0.6B), tied.
    gemma3_text: one sliding-window layer (window GEMMA3_WINDOW) and one global, q/k norms, pre/post norms,
    head_dim 128 != hidden / heads, tied, sqrt(hidden)-scaled embeddings, norms stored as w for 1 + w.
    Norms are drawn away from their identity so a wrong offset or a dropped norm shows in the logits."""
    import torch
    from transformers import (
        AutoTokenizer,
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = AutoTokenizer.from_pretrained(tok_dir)
    common = dict(vocab_size=len(tok), hidden_size=TINY_HIDDEN, intermediate_size=640, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    kinds = {
        "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False, rms_norm_eps=1e-5)),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=True, head_dim=128)),
        "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM, dict(
            head_dim=128, query_pre_attn_scalar=128, sliding_window=GEMMA3_WINDOW,
            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)),
    }
    config_cls, model_cls, extra = kinds[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**common, **extra, **overrides}))
    gemma = family.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:  # Gemma's tied embeddings are scaled by sqrt(hidden) = 16: at 0.08 they swamp
                p.normal_(0, 0.02 if gemma and "embed" in name else 0.08)  # the blocks, greedy repeats a token
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
            else:  # a norm: Gemma scales by 1 + w (w = 0 is identity), the others by w (1 is identity)
                p.normal_(0.0 if gemma else 1.0, 0.3 if gemma else 0.2)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if gemma:  # Gemma 3 base models ship no chat template: the plain prompt format applies
        (out / "chat_template.jinja").unlink(missing_ok=True)
        cfg_path = out / "tokenizer_config.json"
        tok_cfg = json.loads(cfg_path.read_text())
        tok_cfg.pop("chat_template", None)
        cfg_path.write_text(json.dumps(tok_cfg, indent=2))
    return out


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory, tiny_tokenizer_dir, tiny_qwen_tokenizer_dir):
    """family -> a lazily built tiny model dir of that family (SentencePiece for llama/gemma3, BPE for qwen)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            tok = tiny_qwen_tokenizer_dir if family.startswith("qwen") else tiny_tokenizer_dir
            built[family] = build_family(family, tok, tmp_path_factory.mktemp(family))
        return built[family]
    return get
