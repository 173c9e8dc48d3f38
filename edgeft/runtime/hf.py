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
        with torch.no_grad():
            x = torch.tensor([ids])
            for _ in range(max_new_tokens):
                res = self.model(input_ids=x, past_key_values=past, use_cache=True)
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

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab] float32."""
        with self._torch.no_grad():
            return self.model(input_ids=self._torch.tensor([ids])).logits[0].float().numpy()

    def close(self) -> None:
        """Drop the model."""
        self.model = None
