"""Turn chat messages into token ids without torch or transformers (tokenizers + jinja2 only).

Training and every runtime build prompts through this one module, so the ids a GGUF, ONNX or torch
model sees on the device are exactly the ids it was trained on. The chat template renders the same
way transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from edgeft.errors import UserError

# Used when the tokenizer has no chat template: an alpaca-style prompt.
PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'assistant' %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


class PromptFormatter:
    """Chat template + tokenizer.json of one model dir; renders messages and encodes them."""

    def __init__(self, tokenizer_dir: str | Path):
        from tokenizers import Tokenizer

        self.dir = Path(tokenizer_dir)
        tj = self.dir / "tokenizer.json"
        if not tj.is_file():
            raise UserError(f"{self.dir}: no tokenizer.json; save the tokenizer with a fast tokenizer "
                            "(transformers save_pretrained writes it)")
        self.tokenizer = Tokenizer.from_file(str(tj))
        cfg_path = self.dir / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @cached_property
    def template_source(self) -> str:
        """The model's chat template, or the plain one when it has none."""
        jinja = self.dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        tpl = self.config.get("chat_template")
        if isinstance(tpl, list):  # named templates: take the default
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        return tpl or PLAIN_TEMPLATE

    @property
    def has_chat_template(self) -> bool:
        """Whether the model dir carries its own chat template."""
        return self.template_source is not PLAIN_TEMPLATE

    @cached_property
    def _template(self):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise UserError(f"{self.dir}: chat template refused the messages: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.template_source)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Messages to text with the chat template."""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode(self, text: str) -> list[int]:
        """Text to ids, BOS prepended when the tokenizer adds one and the text does not start with it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Ids of a conversation ending in a user turn, with the generation prompt appended."""
        return self.encode(self.render(messages, add_generation_prompt=True))

    def decode(self, ids: list[int]) -> str:
        """Ids to text, special tokens dropped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised
        return tok.get("content")
    return tok
