"""Greedy generation over a transformers model: the reference the exported variants are compared to.

The only runtime that imports torch; the bench imports it lazily, for hf variants alone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from edgeft.runtime.base import GenResult


class HFRuntime:
    """A transformers causal LM in fp32 on CPU, with a KV-cache greedy loop."""

    def __init__(self, model_dir: str | Path, n_threads: int = 2):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(n_threads)
        t0 = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - t0
        eos = self.model.config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.size_bytes = sum(os.path.getsize(p) for p in Path(model_dir).glob("*.safetensors"))
        self._torch = torch

    def generate(self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> GenResult:
        """Greedy decode from prompt ids, stopping at EOS (unless ignore_eos, for fixed-length timing)."""
        torch = self._torch
        out, past, stopped = [], None, False
        t0 = time.perf_counter()
        t_first = None
        with torch.inference_mode():
            x = torch.tensor([ids])
            for _ in range(max_new_tokens):
                # logits of the last position only: the prompt's other rows pick nothing
                res = self.model(input_ids=x, past_key_values=past, use_cache=True, logits_to_keep=1)
                past = res.past_key_values
                tok = int(res.logits[0, -1].argmax())
                if t_first is None:
                    t_first = time.perf_counter()
                if tok in self.eos_ids and not ignore_eos:
                    stopped = True
                    break
                out.append(tok)
                x = torch.tensor([[tok]])
        t_end = time.perf_counter()
        t_first = t_first or t_end
        return GenResult(out, t_first - t0, t_end - t_first, len(ids), stopped)

    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> list[GenResult]:
        """Greedy decode of many prompts, `batch_size` at a time (left-padded, similar lengths together).

        One token of a 135M fp32 model costs a read of all its weights (memory-bound on a CPU): a batch of 8
        decodes ~5x the tokens per second of one prompt. Each result's ttft_s is that prompt's own first
        forward, timed alone (a batch has no per-prompt first-token time); decode_s is its batch's."""
        results: list[GenResult | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            for i, (tokens, stopped, decode_s) in zip(idx, self._greedy_batch([prompts[i] for i in idx],
                                                                             max_new_tokens)):
                results[i] = GenResult(tokens, self.first_token_s(prompts[i]), decode_s, len(prompts[i]), stopped)
        return results

    def first_token_s(self, ids: list[int]) -> float:
        """Seconds for one prompt's forward to its first token (the KV cache starts empty)."""
        torch = self._torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            int(self.model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1).logits[0, -1].argmax())
            return time.perf_counter() - t0

    def _greedy_batch(self, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], bool, float]]:
        torch = self._torch
        width = max(len(p) for p in prompts)
        pad = next(iter(self.eos_ids), 0)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        past = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            for step in range(max_new):
                res = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=past,
                                 use_cache=True, logits_to_keep=1)
                past = res.past_key_values
                nxt = res.logits[:, -1].argmax(-1)
                for r, tok in enumerate(nxt.tolist()):
                    if done[r]:
                        continue
                    if tok in self.eos_ids:
                        done[r] = True
                    else:
                        out[r].append(tok)
                if all(done) or step == max_new - 1:
                    break
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=-1)
                pos = pos[:, -1:] + 1
        decode_s = time.perf_counter() - t0
        return [(o, d, decode_s) for o, d in zip(out, done)]

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab] float32."""
        with self._torch.no_grad():
            return self.model(input_ids=self._torch.tensor([ids])).logits[0].float().numpy()

    def close(self) -> None:
        """Drop the model."""
        self.model = None
