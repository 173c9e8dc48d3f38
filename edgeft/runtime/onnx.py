"""Generation over an exported ONNX decoder with onnxruntime: greedy or sampled, with a KV cache.

Torch-free (numpy + onnxruntime + stdlib) so it runs on the device. It reads the model dir written
by `edgeft.stages.export_onnx` (optimum-onnx's `text-generation-with-past` layout): inputs
`input_ids`, `attention_mask`, optional `position_ids`, `past_key_values.{i}.key/value`
[batch, kv_heads, past_len, head_dim]; outputs `logits` and `present.{i}.key/value`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeft import shapes
from edgeft.runtime.base import GenResult, empty_or_none

MODEL_FILE = "model.onnx"  # the graph inside every exported type dir; external data sits beside it
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32}


class OnnxRuntime:
    """An onnxruntime session over one exported model dir, with the edgeft runtime methods."""

    def __init__(self, model_dir: str | Path, n_threads: int = 2,
                 provider: str = "CPUExecutionProvider"):
        t0 = time.perf_counter()
        self.model_dir = Path(model_dir)
        model_path = self.model_dir / MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(f"{model_path}: no ONNX model; pass a type dir of an onnx "
                                    "artifact (e.g. <artifact>/int8)")
        cfg = json.loads((self.model_dir / CONFIG_FILE).read_text())
        self.n_layers, self.kv_heads, self.head_dim = shapes.n_layers(cfg), shapes.kv_heads(cfg), shapes.head_dim(cfg)
        self.eos_ids = eos_ids(self.model_dir)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n_threads
        opts.inter_op_num_threads = 1  # a decoder graph is a chain: no parallel branches to run
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=[provider])
        except Exception as e:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
            raise ValueError(f"{model_path}: onnxruntime cannot load it ({str(e).splitlines()[0][:200]}); "
                             "the file is corrupt or truncated: re-export it") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self._ids_dtype = _ORT_DTYPES.get(inputs["input_ids"].type, np.int64)
        self._mask_dtype = (_ORT_DTYPES.get(inputs["attention_mask"].type, np.int64)
                            if "attention_mask" in inputs else None)
        self._pos_dtype = (_ORT_DTYPES.get(inputs["position_ids"].type, np.int64)
                           if "position_ids" in inputs else None)
        past = sorted((int(m[1]), m[2] == "value", name)
                      for name in inputs if (m := _PAST.match(name)))
        self._past_names = [name for _, _, name in past]
        self._present_names = [name.replace("past_key_values.", "present.") for name in self._past_names]
        missing = [n for n in self._present_names if n not in outputs]
        if missing or (self._past_names and len(self._past_names) != 2 * self.n_layers):
            raise ValueError(f"{model_path}: past/present names do not pair up "
                             f"({len(self._past_names)} past inputs for {self.n_layers} layers, "
                             f"missing outputs {missing[:4]}); re-export with text-generation-with-past")
        # per input: optimum's fp16 export of some models (gemma) emits float32 presents for later layers
        self._past_dtypes = [_ORT_DTYPES[inputs[n].type] for n in self._past_names]
        if self._past_names:  # static dims in the graph win over config.json (head_dim varies)
            first = inputs[self._past_names[0]]
            self.past_dtype = self._past_dtypes[0]
            _, heads, _, dim = first.shape
            self.kv_heads = heads if isinstance(heads, int) else self.kv_heads
            self.head_dim = dim if isinstance(dim, int) else self.head_dim
        else:
            self.past_dtype = np.float32
        self._output_names = ["logits", *self._present_names]
        self.size_bytes = sum(p.stat().st_size for p in self.model_dir.glob(MODEL_FILE + "*")
                              if p.is_file())
        self.load_s = time.perf_counter() - t0

    def generate(self, ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 ignore_eos: bool = False) -> GenResult:
        """Greedy (temperature 0) or sampled continuation of `ids`, stopping before EOS (unless ignore_eos)."""
        if (empty := empty_or_none(ids, max_new_tokens)) is not None:
            return empty
        rng = np.random.default_rng(seed)
        tokens: list[int] = []
        stopped = False
        t0 = time.perf_counter()
        t_first = t0
        logits, past = self._forward(list(ids), self._empty_past(), 0)
        n_ctx = len(ids)
        while len(tokens) < max_new_tokens:
            nxt = choose_next(logits[-1], temperature, top_k, top_p, rng)
            if not tokens:
                t_first = time.perf_counter()
            if nxt in self.eos_ids and not ignore_eos:
                stopped = True
                break
            tokens.append(nxt)
            if len(tokens) == max_new_tokens:
                break
            if self._past_names:
                logits, past = self._forward([nxt], past, n_ctx)
            else:  # a graph without a cache recomputes the whole sequence
                logits, past = self._forward([*ids, *tokens], past, 0)
            n_ctx += 1
        t_end = time.perf_counter()
        return GenResult(tokens=tokens, ttft_s=t_first - t0, decode_s=t_end - t_first,
                         prompt_tokens=len(ids), stopped_at_eos=stopped)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Teacher-forced logits [len(ids), vocab] float32 from one pass over `ids`."""
        if not ids:
            raise ValueError("empty sequence: pass at least one token id")
        logits, _ = self._forward(list(ids), self._empty_past(), 0)
        return logits

    def close(self) -> None:
        """Release the session (its weights and arenas)."""
        self.session = None

    def _empty_past(self) -> list[np.ndarray]:
        shape = (1, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=dt) for dt in self._past_dtypes]

    def _forward(self, new_ids: list[int], past: list[np.ndarray],
                 past_len: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run `new_ids` after `past_len` cached positions: logits [len(new_ids), vocab] and presents."""
        if self.session is None:
            raise RuntimeError("runtime is closed")
        n = len(new_ids)
        feeds = {"input_ids": np.asarray([new_ids], dtype=self._ids_dtype)}
        if self._mask_dtype is not None:
            feeds["attention_mask"] = np.ones((1, past_len + n), dtype=self._mask_dtype)
        if self._pos_dtype is not None:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=self._pos_dtype)[None, :]
        feeds.update(zip(self._past_names, past))
        logits, *present = self.session.run(self._output_names, feeds)
        present = [p.astype(dt, copy=False) for p, dt in zip(present, self._past_dtypes)]
        return logits[0].astype(np.float32, copy=False), present


def eos_ids(model_dir: str | Path) -> frozenset[int]:
    """EOS ids from config.json and generation_config.json (either may hold an int or a list)."""
    found: set[int] = set()
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        src = json.loads(path.read_text())
        eos = src.get("eos_token_id")
        if isinstance(eos, int):
            found.add(eos)
        elif isinstance(eos, list):
            found.update(int(e) for e in eos)
    return frozenset(found)


def choose_next(row: np.ndarray, temperature: float, top_k: int, top_p: float,
                rng: np.random.Generator) -> int:
    """Next id from one logits row: argmax at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return int(np.argmax(row))
    z = row.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        kth = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p)) + 1]  # smallest prefix reaching top_p
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(p.size, p=p))
