"""Generation over an onnxruntime-genai model dir (the model builder's output): greedy or sampled.

Torch-free (numpy + onnxruntime_genai) so it runs on the device. It reads a type dir written by
`edgeft.stages.export_onnx` with `route: genai`: `model.onnx` with GroupQueryAttention and a KV
cache that onnxruntime-genai keeps in preallocated buffers (past and present share one buffer of
`max_length` positions), `genai_config.json`, and the hf artifact's own tokenizer files. The token
loop runs inside onnxruntime-genai (C++), so per-token Python overhead is one call, not one copy
of every layer's cache as in `edgeft.runtime.onnx.OnnxRuntime`.

onnxruntime-genai's tokenizer does not add BOS: `encode` adds it by the tokenizer config's rule
(as `edgeft.runtime.prompt` does), and generation takes ids, so any tokenizer can feed it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

from edgeft.runtime.base import GenResult, empty_or_none
from edgeft.runtime.onnx import MODEL_FILE, choose_next, eos_ids

GENAI_CONFIG_FILE = "genai_config.json"  # written by the model builder: the graph's IO names and search defaults
_PROVIDERS = {"CPUExecutionProvider": None, "CUDAExecutionProvider": "cuda",
              "DmlExecutionProvider": "dml", "WebGpuExecutionProvider": "webgpu"}


class GenaiRuntime:
    """An onnxruntime-genai model over one exported type dir, with the edgeft runtime methods."""

    def __init__(self, model_dir: str | Path, n_threads: int = 2, n_ctx: int = 0,
                 provider: str = "CPUExecutionProvider"):
        t0 = time.perf_counter()
        self.model_dir = Path(model_dir)
        cfg_path = self.model_dir / GENAI_CONFIG_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path}: not an onnxruntime-genai model dir; pass a type dir "
                                    "of an onnx artifact exported with route: genai")
        if provider not in _PROVIDERS:
            raise ValueError(f"provider {provider!r}: onnxruntime-genai takes one of {list(_PROVIDERS)}")
        gcfg = json.loads(cfg_path.read_text())["model"]
        self.context_length = int(gcfg.get("context_length") or 2048)
        self.n_ctx = min(n_ctx or self.context_length, self.context_length)  # KV buffer positions
        self.eos_ids = eos_ids(self.model_dir) or frozenset(_as_list(gcfg.get("eos_token_id")))
        config = og.Config(str(self.model_dir))
        config.clear_providers()
        if _PROVIDERS[provider]:
            config.append_provider(_PROVIDERS[provider])
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        tok_cfg = _read_json(self.model_dir / "tokenizer_config.json")
        self._bos = gcfg.get("bos_token_id") if tok_cfg.get("add_bos_token") else None
        self.size_bytes = sum(p.stat().st_size for p in self.model_dir.glob(MODEL_FILE + "*")
                              if p.is_file())
        self.load_s = time.perf_counter() - t0

    def encode(self, text: str) -> list[int]:
        """Text to ids with onnxruntime-genai's tokenizer, BOS added by the tokenizer config's rule."""
        ids = [int(i) for i in self.tokenizer.encode(text)]
        if self._bos is not None and (not ids or ids[0] != self._bos):
            ids = [int(self._bos)] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids to text."""
        return self.tokenizer.decode(np.asarray(ids, dtype=np.int32))

    def generate(self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 ignore_eos: bool = False) -> GenResult:
        """Greedy (temperature 0) or sampled continuation of `ids`, stopping before EOS (unless ignore_eos)."""
        if (empty := empty_or_none(ids, max_new_tokens)) is not None:
            return empty
        limit = min(len(ids) + max_new_tokens, self.n_ctx)
        if len(ids) >= limit:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.n_ctx}-token context")
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=limit, do_sample=False)
        gen = og.Generator(self.model, params)
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        stopped = False
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([ids], dtype=np.int32))  # prefill: runs the prompt's forward now
        t_first = t0
        while len(tokens) < max_new_tokens and len(ids) + len(tokens) < limit:
            # the choice is made here (same rule as OnnxRuntime), not by genai's search: EOS stays ours
            nxt = choose_next(_last_row(gen), temperature, top_k, top_p, rng)
            if not tokens:  # the first token is chosen: TTFT holds the prompt's forward alone
                t_first = time.perf_counter()
            if ((nxt not in self.eos_ids or ignore_eos) and len(tokens) + 1 < max_new_tokens
                    and len(ids) + len(tokens) + 1 < limit):
                gen.append_tokens(np.asarray([[nxt]], dtype=np.int32))  # runs its forward now
            if nxt in self.eos_ids and not ignore_eos:
                stopped = True
                break
            tokens.append(nxt)
        t_end = time.perf_counter()
        return GenResult(tokens=tokens, ttft_s=t_first - t0, decode_s=t_end - t_first,
                         prompt_tokens=len(ids), stopped_at_eos=stopped)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab] float32 from one pass over `ids`."""
        if not ids:
            raise ValueError("empty sequence: pass at least one token id")
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=min(len(ids) + 1, self.context_length), do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(np.asarray([ids], dtype=np.int32))
        out = np.asarray(gen.get_output("logits"))
        if out.shape[1] != len(ids):
            raise RuntimeError(f"{self.model_dir}: the model returns logits for {out.shape[1]} of "
                               f"{len(ids)} positions (exported with prune_lm_head?); re-export")
        return out[0].astype(np.float32, copy=False)

    def close(self) -> None:
        """Release the model (its weights and buffers)."""
        self.tokenizer = None
        self.model = None


def _last_row(gen) -> np.ndarray:
    logits = np.asarray(gen.get_logits())
    return logits.reshape(-1, logits.shape[-1])[-1]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _as_list(v) -> list[int]:
    return [int(x) for x in v] if isinstance(v, list) else ([int(v)] if v is not None else [])
