"""Greedy generation and teacher-forced logits over a GGUF file with llama.cpp. Torch-free.

Token ids go straight into llama.cpp batches (never re-tokenized), so every runtime sees the same
prompt. Prompt tokens are decoded in one batch with logits for the last position only (what a
device does for time to first token); `logits` asks for every position instead. The KV cache is
cleared at the start of every call.
"""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import llama_cpp
import numpy as np

from edgeft.runtime.base import GenResult

# KV cache precision: llama.cpp defaults to F16, which alone moves logits by ~1e-3 relative on an
# F32 model; F32 makes an F32 GGUF match PyTorch to ~1e-6 (parity tests), F16 is what devices run.
_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}


class GGUFRuntime:
    """One GGUF model loaded with llama.cpp on the CPU (or with n_gpu_layers offloaded)."""

    def __init__(self, path: str | Path, n_threads: int = 2, n_ctx: int = 512, n_gpu_layers: int = 0,
                 kv_type: str = "f16", lora_path: str | Path | None = None, lora_scale: float = 1.0):
        # lora_path: a GGUF LoRA adapter (edgeft.gguf.lora) applied at run time over this base, times lora_scale
        if kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type {kv_type!r}; valid: {', '.join(_KV_TYPES)}")
        self.path = Path(path)
        self.size_bytes = self.path.stat().st_size
        t0 = time.perf_counter()
        self._llm = llama_cpp.Llama(
            model_path=str(self.path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n_threads,
            n_threads_batch=n_threads, n_gpu_layers=n_gpu_layers, logits_all=False, verbose=False,
            type_k=_KV_TYPES[kv_type], type_v=_KV_TYPES[kv_type],
            lora_path=str(lora_path) if lora_path else None, lora_scale=lora_scale)
        self.lora_path = Path(lora_path) if lora_path else None
        self.load_s = time.perf_counter() - t0  # seconds to mmap the file and build the context
        self.n_ctx = n_ctx
        self.n_vocab = self._llm.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        self._row, self._row_addr = None, None  # numpy view of llama.cpp's one-row logits buffer (see _next)
        self._eog: dict[int, bool] = {}

    def generate(self, ids: list[int], max_new_tokens: int, ignore_eos: bool = False) -> GenResult:
        """Greedy decoding from `ids`; stops before an end-of-generation token (unless ignore_eos, for
        fixed-length timing) or after max_new_tokens."""
        if not ids:
            raise ValueError("generate needs at least one prompt token")
        self._check_len(len(ids) + max_new_tokens)
        self._clear()
        tokens: list[int] = []
        stopped = False
        t0 = time.perf_counter()
        tok = int(np.argmax(self._decode(ids, 0, all_logits=False)[-1]))
        t_first = time.perf_counter()
        while len(tokens) < max_new_tokens:
            if not ignore_eos and self._is_eog(tok):
                stopped = True
                break
            tokens.append(tok)
            if len(tokens) < max_new_tokens:
                tok = self._next(tok, len(ids) + len(tokens) - 1)
        t_end = time.perf_counter()
        return GenResult(tokens=tokens, ttft_s=t_first - t0, decode_s=t_end - t_first,
                         prompt_tokens=len(ids), stopped_at_eos=stopped)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab] float32 from one pass over `ids`."""
        self._check_len(len(ids))
        self._clear()
        return self._decode(ids, 0, all_logits=True)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """llama.cpp's tokenization of `text`; special-token text (e.g. "</s>") becomes its token."""
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids` (SentencePiece keeps the leading space of the first piece)."""
        return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def perf(self, reset: bool = False) -> dict:
        """llama.cpp's own timings since the last reset: prompt/eval ms and token counts."""
        d = llama_cpp.llama_perf_context(self._llm.ctx)
        out = {"t_p_eval_ms": d.t_p_eval_ms, "t_eval_ms": d.t_eval_ms, "n_p_eval": d.n_p_eval,
               "n_eval": d.n_eval}
        if reset:
            llama_cpp.llama_perf_context_reset(self._llm.ctx)
        return out

    @property
    def eos_id(self) -> int:
        """The model's end-of-sequence token id."""
        return self._llm.token_eos()

    def close(self) -> None:
        """Free the llama.cpp context and model."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> GGUFRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_len(self, n: int) -> None:
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens exceed the context of {self.n_ctx}; pass a larger n_ctx")

    def _clear(self) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llm.ctx), True)

    def _is_eog(self, tok: int) -> bool:
        """llama.cpp's end-of-generation test, memoised per token id (one ctypes call per id, not per step)."""
        eog = self._eog.get(tok)
        if eog is None:
            eog = self._eog[tok] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, tok))
        return eog

    def _next(self, tok: int, pos: int) -> int:
        """Decode one token at `pos` and return the greedy next one: the decode loop's hot path, kept to
        llama_decode plus an argmax over llama.cpp's logits in place (no batch rebuild, no copy)."""
        b = self._batch
        b.token[0], b.pos[0], b.logits[0], b.n_tokens = tok, pos, True, 1
        if llama_cpp.llama_decode(self._llm.ctx, b) != 0:
            raise RuntimeError(f"llama_decode failed at position {pos} ({self.path})")
        # llama_get_logits also synchronises (a GPU backend copies logits asynchronously) and closes llama.cpp's
        # own timing of this token; the numpy view is re-made only when the buffer has moved (it grows rarely)
        ptr = llama_cpp.llama_get_logits(self._llm.ctx)
        addr = ctypes.cast(ptr, ctypes.c_void_p).value
        if addr != self._row_addr:
            self._row, self._row_addr = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)), addr
        return int(self._row.argmax())

    def _decode(self, ids: list[int], pos0: int, all_logits: bool) -> np.ndarray:
        """Decode `ids` at positions pos0.. in one batch; logits of every position or of the last."""
        b = self._batch
        n = len(ids)
        for i, tok in enumerate(ids):
            b.token[i] = tok
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = all_logits or i == n - 1
        b.n_tokens = n
        rc = llama_cpp.llama_decode(self._llm.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} ({self.path})")
        rows = n if all_logits else 1
        ptr = llama_cpp.llama_get_logits(self._llm.ctx)
        return np.ctypeslib.as_array(ptr, shape=(rows * self.n_vocab,)).reshape(rows, self.n_vocab).copy()
