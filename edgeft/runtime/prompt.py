"""Turn chat messages into token ids without torch or transformers (tokenizers + jinja2 only).

Training and every runtime build prompts through this one module, so the ids a GGUF, ONNX or torch
model sees on the device are exactly the ids it was trained on. The chat template renders the same
way transformers renders it (sandboxed jinja2, trim_blocks, lstrip_blocks).
"""

from __future__ import annotations

import contextlib
import functools
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


# A chat template renders a few kB; these bound what a hostile one can make the device do
MAX_RENDER_CHARS = 1 << 20  # output characters
MAX_RENDER_S = 5.0  # seconds (enforced where a timer signal is available: the main thread on POSIX)
_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class PromptFormatter:
    """Chat template + tokenizer.json of one model dir; renders messages and encodes them.

    `files` (name -> bytes) replaces reading the dir: a bundle passes the bytes it verified, so a file
    swapped on disk after the check is never the one used."""

    def __init__(self, tokenizer_dir: str | Path, files: dict[str, bytes] | None = None):
        from tokenizers import Tokenizer

        self.dir = Path(tokenizer_dir)
        if files is None:
            files = {n: (self.dir / n).read_bytes() for n in _TOKENIZER_NAMES if (self.dir / n).is_file()}
        self._files = files
        if "tokenizer.json" not in files:
            raise UserError(f"{self.dir}: no tokenizer.json; save the tokenizer with a fast tokenizer "
                            "(transformers save_pretrained writes it)")
        try:
            self.tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
            self.config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
        except Exception as e:  # bad UTF-8, bad JSON, or tokenizers' own exception type
            raise UserError(f"{self.dir}: cannot read the tokenizer ({(str(e).splitlines() or [''])[0][:200]}); "
                            "save it again with transformers save_pretrained") from None
        if not isinstance(self.config, dict):
            raise UserError(f"{self.dir / 'tokenizer_config.json'}: expected a JSON object")
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False)) and self.bos_token is not None
        self.bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = self.tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    @cached_property
    def template_source(self) -> str:
        """The model's chat template, or the plain one when it has none."""
        if "chat_template.jinja" in self._files:
            return self._files["chat_template.jinja"].decode("utf-8", errors="replace")
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
        import jinja2

        def raise_exception(msg):
            raise UserError(f"{self.dir}: chat template refused the messages: {msg}")

        env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.template_source)
        except jinja2.TemplateError as e:
            raise UserError(f"{self.dir}: the chat template does not parse ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); fix or remove it") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Messages to text with the chat template, bounded in output size and time."""
        import jinja2

        out, size = [], 0
        try:
            with _deadline(MAX_RENDER_S):
                for chunk in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     bos_token=self.bos_token or "", eos_token=self.eos_token or ""):
                    size += len(chunk)
                    if size > MAX_RENDER_CHARS:
                        raise _TooBig
                    out.append(chunk)
        except _TooBig:
            raise UserError(f"{self.dir}: the chat template produced over {MAX_RENDER_CHARS} characters; "
                            "refusing it (hostile or broken template)") from None
        except TimeoutError:
            raise UserError(f"{self.dir}: the chat template ran over {MAX_RENDER_S:g} s; refusing it "
                            "(hostile or broken template)") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{self.dir}: the chat template failed ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); fix or remove it") from None
        return "".join(out)

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


class _TooBig(Exception):
    pass


@functools.cache
def _sandbox_class():
    """jinja2's immutable sandbox, plus: no `**`, and no string or list from `*` or `+` over the output bound.
    Built on first use: jinja2 is imported only when a template renders."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**":
                raise SecurityError("the power operator is not allowed in a chat template")
            if operator == "*":  # refuse before building: 'x' * 300000000 is the attack
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
                    raise _TooBig
            out = super().call_binop(context, operator, left, right)
            if isinstance(out, (str, list, tuple)) and len(out) > MAX_RENDER_CHARS:
                raise _TooBig
            return out

    return Bounded


@contextlib.contextmanager
def _deadline(seconds: float):
    """Raise TimeoutError in the block after `seconds` (SIGALRM timer; a no-op off the main thread or on Windows)."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _token_text(tok) -> str | None:
    if isinstance(tok, dict):  # AddedToken serialised
        return tok.get("content")
    return tok
