"""What every runtime returns: generated ids with timings. Torch-free (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GenResult:
    """Greedy (or sampled) generation from a prompt of token ids."""

    tokens: list[int]  # generated ids after the prompt, stopping before EOS (EOS not included)
    ttft_s: float  # prompt processing + first token, seconds
    decode_s: float  # the remaining len(tokens) - 1 tokens, seconds
    prompt_tokens: int  # len(prompt ids)
    stopped_at_eos: bool  # True when EOS ended generation rather than max_new_tokens

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second after the first token (0 when fewer than 2 tokens)."""
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def empty_or_none(ids: list[int], max_new_tokens: int) -> GenResult | None:
    """Checks shared by the runtimes' generate(): an empty prompt is an error; no tokens asked, an empty result."""
    if not ids:
        raise ValueError("empty prompt: pass at least one token id (usually BOS)")
    if max_new_tokens <= 0:
        return GenResult(tokens=[], ttft_s=0.0, decode_s=0.0, prompt_tokens=len(ids), stopped_at_eos=False)
    return None


# Every runtime class offers, by convention (no base class):
#   generate(ids: list[int], max_new_tokens: int, ignore_eos=False) -> GenResult    greedy, stops at
#       the model's EOS (ignore_eos: run to max_new_tokens, for fixed-length timing)
#   logits(ids: list[int]) -> numpy.ndarray [len(ids), vocab] float32, one teacher-forced pass
#   close() -> None
