"""Ollama Modelfiles: the Go template measured from the chat template, stops and parameters."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from edgeft.gguf import modelfile as gguf_modelfile
from edgeft.runtime.prompt import PromptFormatter

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Llama-2 style: the system prompt is folded into the first user turn, so no per-role pieces exist
LLAMA2 = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
          "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}"
          "<</SYS>> {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }} </s>{% endif %}{% endfor %}")


def _render_go(template: str, messages: list[dict]) -> str:
    """A tiny emulation of the Go template this module writes (range / if-else on .Role / $last)."""
    m = re.fullmatch(r'\{\{ range \$i, \$_ := \.Messages \}\}\{\{ \$last := eq \(len \(slice \$\.Messages \$i\)\) 1 \}\}'
                     r'(.*)\{\{ end \}\}\{\{ if and \$last \(ne \.Role "assistant"\) \}\}(.*)\{\{ end \}\}\{\{ end \}\}',
                     template, re.S)
    assert m, template
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', m.group(1), re.S))
    out = ""
    for i, msg in enumerate(messages):
        out += branches[msg["role"]].replace("{{ .Content }}", msg["content"])
        if i == len(messages) - 1 and msg["role"] != "assistant":
            out += m.group(2)
    return out


def _with_template(src: Path, dst: Path, template: str) -> Path:
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(template)
    return dst


@pytest.mark.parametrize("name", ["own", "chatml"])
def test_template_reproduces_the_chat_template(name, tiny_llama_dir, tmp_path):
    model = tiny_llama_dir if name == "own" else _with_template(tiny_llama_dir, tmp_path / "m", CHATML)
    fmt = PromptFormatter(model)
    tpl, why = gguf_modelfile.go_template(fmt)
    assert why is None
    convo = [{"role": "system", "content": "S"}, {"role": "user", "content": "What torque?"},
             {"role": "assistant", "content": "45 Nm."}, {"role": "user", "content": "And the interval?"}]
    want = fmt.render(convo, add_generation_prompt=True)
    assert _render_go(tpl, convo) == want
    assert _render_go(tpl, convo[:3]) == fmt.render(convo[:3])  # ends on an assistant turn: no generation prompt


def test_modelfile_beside_the_gguf(tiny_llama_dir, tmp_path):
    gguf = tmp_path / "model-q4_k_m.gguf"
    gguf.write_bytes(b"")
    info = gguf_modelfile.write(gguf, tiny_llama_dir, ctx=8192, adapter=tmp_path / "adapter-f32.gguf")
    text = (tmp_path / "model-q4_k_m.Modelfile").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-q4_k_m.gguf" and lines[1] == "ADAPTER ./adapter-f32.gguf"
    assert 'TEMPLATE """{{ range' in text and "Question: {{ .Content }}\n" in text
    assert 'PARAMETER stop "</s>"' in lines and "PARAMETER num_ctx 4096" in lines
    assert "PARAMETER temperature 0" in lines
    assert info["template"] and info["stop"] == ["</s>"]


def test_chatml_stops_on_the_end_of_turn_token(tiny_llama_dir, tmp_path):
    from transformers import AutoTokenizer

    model = _with_template(tiny_llama_dir, tmp_path / "m", CHATML)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(model)
    (model / "chat_template.jinja").write_text(CHATML)
    assert gguf_modelfile.stop_tokens(PromptFormatter(model), True) == ["</s>", "<|im_end|>"]


def test_position_dependent_template_is_left_out_with_a_reason(tiny_llama_dir, tmp_path):
    model = _with_template(tiny_llama_dir, tmp_path / "m", LLAMA2)
    tpl, why = gguf_modelfile.go_template(PromptFormatter(model))
    assert tpl is None and why
    gguf = tmp_path / "model-f16.gguf"
    gguf.write_bytes(b"")
    info = gguf_modelfile.write(gguf, model, ctx=512)
    text = gguf.with_suffix(".Modelfile").read_text()
    assert "TEMPLATE" not in text and 'PARAMETER stop "</s>"' in text and info["template_note"] == why
