"""Can this llama.cpp build run on this CPU? A smoke generation in a child process. Torch-free.

A llama.cpp built for instructions the CPU cannot execute (a `-march=native` wheel from another CPU,
AMX in a VM that does not allow it) dies with SIGILL on its first matmul, killing whatever process
loaded it. The check therefore runs in a child: it writes a tiny random-weight llama GGUF (Q8_0,
Q4_0 and F32 tensors, so the quantized matmul kernels run too), generates a few tokens, and the
parent names the death (SIGILL comes with the build fix) instead of a bare exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeft import host

_N_EMBD, _N_FF, _N_HEAD, _N_CTX = 256, 512, 4, 64
_TIMEOUT_S = 120


def check(model: str | Path | None = None, n_tokens: int = 8, timeout_s: float = _TIMEOUT_S) -> tuple[bool, str]:
    """(ok, one line): generate `n_tokens` from `model` (default: a tiny GGUF written here) in a child."""
    with tempfile.TemporaryDirectory(prefix="edgeft-smoke-") as tmp:
        path = Path(model) if model else Path(tmp) / "smoke.gguf"
        job = json.dumps({"model": str(path), "write": model is None, "n_tokens": n_tokens})
        code = "from edgeft.runtime.smoke import child_main; child_main()"
        try:
            proc = subprocess.run([sys.executable, "-c", code], input=job, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return False, f"llama.cpp smoke generation did not finish in {timeout_s:.0f} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        res = json.loads(lines[-1])
        return True, (f"llama.cpp runs on this CPU: {res['n_tokens']} tokens generated in {res['ms']:.0f} ms "
                      f"({'the bundle model' if model else 'a tiny Q8_0/Q4_0 test model'})")
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
    if host.is_sigill(proc.returncode):
        return False, f"llama.cpp cannot run on this CPU: {host.describe_exit(proc.returncode)}"
    return False, f"llama.cpp smoke generation failed ({host.describe_exit(proc.returncode)}): {tail}"


def child_main() -> None:
    """Child side: write the tiny model when asked, load it, generate greedily, print one JSON line."""
    from edgeft.runtime.gguf import GGUFRuntime

    job = json.loads(sys.stdin.read())
    if job["write"]:
        write_tiny_gguf(Path(job["model"]))
    with GGUFRuntime(job["model"], n_threads=1, n_ctx=_N_CTX) as rt:
        t0 = time.perf_counter()
        g = rt.generate([1, 10, 20, 30], job["n_tokens"], ignore_eos=True)
        ms = (time.perf_counter() - t0) * 1000
    print(json.dumps({"n_tokens": len(g.tokens), "ms": ms}), flush=True)


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 1-block random-weight llama GGUF with a byte vocabulary; its matmuls are Q8_0 and Q4_0."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("edgeft-smoke")
    w.add_context_length(_N_CTX)
    w.add_embedding_length(_N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(_N_FF)
    w.add_head_count(_N_HEAD)
    w.add_head_count_kv(_N_HEAD)
    w.add_rope_dimension_count(_N_EMBD // _N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [6] * 256)  # unknown, control x2, byte
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def mat(rows: int, cols: int, qtype) -> tuple:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        return gguf.quants.quantize(data, qtype), qtype

    Q8, Q4 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0
    tensors = {"token_embd.weight": mat(vocab, _N_EMBD, Q8), "output.weight": mat(vocab, _N_EMBD, Q8),
               "blk.0.attn_q.weight": mat(_N_EMBD, _N_EMBD, Q4), "blk.0.attn_k.weight": mat(_N_EMBD, _N_EMBD, Q4),
               "blk.0.attn_v.weight": mat(_N_EMBD, _N_EMBD, Q8),
               "blk.0.attn_output.weight": mat(_N_EMBD, _N_EMBD, Q8),
               "blk.0.ffn_gate.weight": mat(_N_FF, _N_EMBD, Q4), "blk.0.ffn_up.weight": mat(_N_FF, _N_EMBD, Q4),
               "blk.0.ffn_down.weight": mat(_N_EMBD, _N_FF, Q8)}
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(name, np.ones(_N_EMBD, dtype=np.float32))
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
