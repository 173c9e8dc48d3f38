"""An Ollama Modelfile beside a .gguf: FROM, TEMPLATE (from the chat template), stop tokens, parameters.

A Jinja chat template cannot be translated to Go's text/template in general, so it is measured
instead: each role's text is rendered around a marker to learn its prefix and suffix, the generation
prompt is what add_generation_prompt appends, and the Go template built from those pieces is
checked by rendering a multi-turn conversation both ways (Jinja vs an emulation of the Go
template). Only a template that reproduces the Jinja text exactly is written; otherwise the
Modelfile goes without TEMPLATE (Ollama then falls back to the GGUF's tokenizer.chat_template) and
the reason is returned. The leading BOS is left out: llama.cpp adds it when tokenizing.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgeft.runtime.prompt import PromptFormatter

MODELFILE_SUFFIX = ".Modelfile"  # model-q4_k_m.gguf -> model-q4_k_m.Modelfile (ollama create -f ...)
_MARK = "\x01EDGEFT\x01"
_ROLES = ("system", "user", "assistant")
_MAX_CTX = 4096  # num_ctx default: the model's context, capped for small devices
# Greedy decoding, as the bench and the parity gate measure the model; no repeat penalty, so Ollama's
# output matches theirs token for token.
_PARAMETERS = {"temperature": 0, "repeat_penalty": 1, "top_k": 1}


def write(gguf_path: Path, tokenizer_dir: Path, ctx: int, adapter: Path | None = None) -> dict:
    """Write `<gguf stem>.Modelfile` next to `gguf_path`; return what went in (or why TEMPLATE is absent)."""
    fmt = PromptFormatter(tokenizer_dir)
    template, why = go_template(fmt)
    stops = stop_tokens(fmt, template is not None)
    lines = [f"FROM ./{gguf_path.name}"]
    if adapter is not None:
        lines.append(f"ADAPTER ./{adapter.name}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    for s in stops:
        lines.append(f"PARAMETER stop {_quote(s)}")
    params = dict(_PARAMETERS, num_ctx=min(ctx, _MAX_CTX))
    lines += [f"PARAMETER {k} {v}" for k, v in params.items()]
    out = gguf_path.with_suffix(MODELFILE_SUFFIX)
    out.write_text("\n".join(lines) + "\n")
    return {"file": out.name, "template": template is not None, "template_note": why, "stop": stops,
            "parameters": params}


def go_template(fmt: PromptFormatter) -> tuple[str | None, str | None]:
    """(Ollama Go template, None) when the chat template is reproduced exactly, else (None, reason)."""
    try:
        parts = {r: _pieces(fmt, r) for r in _ROLES}
        gen = _strip_bos(fmt, fmt.render([{"role": "user", "content": _MARK}], add_generation_prompt=True))
        base = _strip_bos(fmt, fmt.render([{"role": "user", "content": _MARK}]))
    except Exception as e:  # a template that refuses a lone system or assistant turn, or raises
        return None, f"chat template cannot be measured role by role ({type(e).__name__}: {e})"
    if not gen.startswith(base):
        return None, "add_generation_prompt rewrites the conversation instead of appending to it"
    gen_prompt = gen[len(base):]
    for role, p in parts.items():
        if p is None:
            return None, f"the {role} turn does not render its content verbatim"
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Torque?"},
             {"role": "assistant", "content": "45 Nm."}, {"role": "user", "content": "Interval?"}]
    want = _strip_bos(fmt, fmt.render(convo, add_generation_prompt=True))
    got = "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in convo) + gen_prompt
    if got != want:
        return None, "per-role pieces do not reproduce a multi-turn conversation (the template depends on " \
                     "position or merges turns); Ollama will use the GGUF's chat template"
    branches = ""
    for i, r in enumerate(_ROLES):
        keyword = "if" if i == 0 else "else if"
        branches += ("{{ " + keyword + ' eq .Role "' + r + '" }}' + _go(parts[r][0]) + "{{ .Content }}"
                     + _go(parts[r][1]))
    # no whitespace trimming ({{- ... -}}) anywhere: the turn pieces carry significant newlines
    tpl = ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
           f"{branches}{{{{ end }}}}"
           f'{{{{ if and $last (ne .Role "assistant") }}}}{_go(gen_prompt)}{{{{ end }}}}{{{{ end }}}}')
    return tpl, None


def stop_tokens(fmt: PromptFormatter, have_template: bool) -> list[str]:
    """EOS plus the special tokens that end an assistant turn in the template."""
    stops = [fmt.eos_token] if fmt.eos_token else []
    if have_template:
        suffix = _pieces(fmt, "assistant")[1]
        specials = {a.content for a in fmt.tokenizer.get_added_tokens_decoder().values() if a.special}
        stops += [s for s in sorted(specials) if s in suffix and s not in stops]
    return [s for s in stops if s.isprintable()]  # a newline in a stop string would start a Modelfile line


def _pieces(fmt: PromptFormatter, role: str) -> tuple[str, str] | None:
    text = _strip_bos(fmt, fmt.render([{"role": role, "content": _MARK}]))
    if text.count(_MARK) != 1:
        return None
    pre, suf = text.split(_MARK)
    return pre, suf


def _strip_bos(fmt: PromptFormatter, text: str) -> str:
    if fmt.add_bos and fmt.bos_token and text.startswith(fmt.bos_token):
        return text[len(fmt.bos_token):]
    return text


def _go(text: str) -> str:
    """Literal text inside a Go template in a Modelfile's TEMPLATE \"\"\"...\"\"\": an opening `{{` and every
    double quote become Go string actions, so no run of quotes can close the block and add lines."""
    return re.sub(r'\{\{|"', lambda m: '{{ "{{" }}' if m.group() == "{{" else '{{ "\\"" }}', text)


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
