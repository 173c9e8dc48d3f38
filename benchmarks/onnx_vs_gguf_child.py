"""The child processes of benchmarks/onnx_vs_gguf.py: each runtime measured in a fresh interpreter.

`_CHILD` loads one variant (GGUF via llama.cpp, ONNX via onnxruntime-genai or plain onnxruntime) and either
times it (warm-up, one decode, one prefill) or scores it teacher-forced against torch's logits; `_REFERENCE`
computes torch fp32's teacher-forced logits on the accuracy prompt set (built by `_accuracy_sequences`), so the
parent never holds a model. `_child` runs one of them with THREADS threads and returns its JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

THREADS = 2
MAX_SEQ = 256  # tokens per accuracy sequence
# accuracy texts when the model has no eval data (random weights, or a bare hf dir)
TEXTS = (("The quick brown fox jumps over the lazy dog, then runs back across the field to the old barn "
          "where the farmer keeps the tools, the seed and the spare wheels for the tractor."),
         ("Question: How do I reset the unit after a power failure?\nAnswer: Switch it off, wait ten "
          "seconds, hold the reset button for three seconds and switch it on again."),
         ("def mean(xs):\n    \"\"\"Arithmetic mean of a non-empty list.\"\"\"\n    return sum(xs) / len(xs)\n\n"
          "print(mean([1, 2, 3, 4]))  # 2.5\n"),
         ("In 1969 the first crewed landing on the Moon took place; the lunar module touched down in the "
          "Sea of Tranquility and the crew spent about two and a half hours outside."))

_CHILD = r"""
import json, sys
job = json.loads(sys.argv[1])
kind, path = job["kind"], job["path"]
if kind == "gguf":
    from edgeft.runtime.gguf import GGUFRuntime
    rt = GGUFRuntime(path, n_threads=job["threads"], n_ctx=job["n_ctx"], kv_type=job["kv_type"])
elif kind == "genai":
    from edgeft.runtime.onnx_genai import GenaiRuntime
    rt = GenaiRuntime(path, n_threads=job["threads"], n_ctx=job["n_ctx"])
else:
    from edgeft.runtime.onnx import OnnxRuntime
    rt = OnnxRuntime(path, n_threads=job["threads"])
out = {"load_s": rt.load_s}
if job["mode"] == "time":
    dec, pre, n_new = job["decode_ids"], job["prefill_ids"], job["new_tokens"]
    rt.generate(dec, min(16, n_new), ignore_eos=True)  # warm-up: page the weights in, build kernels
    rt.generate(pre, 1, ignore_eos=True)
    r = rt.generate(dec, n_new, ignore_eos=True)
    out["decode_tok_s"] = (len(r.tokens) - 1) / r.decode_s
    r = rt.generate(pre, 1, ignore_eos=True)
    out["prefill_tok_s"] = len(pre) / r.ttft_s
else:  # accuracy: teacher-forced rows against torch's (untimed)
    import numpy as np
    from edgeft.bench.metrics import log_softmax
    agree = n = 0
    kl = 0.0
    with np.load(job["reference"]) as ref:
        for i, (ids, s, e) in enumerate(job["sequences"]):
            got, want = rt.logits(ids)[s - 1:e - 1], ref[f"seq{i}"]
            agree += int((got.argmax(-1) == want.argmax(-1)).sum())
            lp, lq = log_softmax(want), log_softmax(got)
            kl += float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0).sum())
            n += len(want)
    out.update(tf_top1_agreement=agree / n, tf_kld=kl / n, tf_positions=n)
out["peak_rss_mib"] = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
rt.close()
print(json.dumps(out))
"""

_REFERENCE = r"""
import json, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
from edgeft.bench.metrics import log_softmax
job = json.loads(sys.argv[1])
torch.set_num_threads(job["threads"])
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
rows, ent, p1 = {}, [], []
with torch.no_grad():
    for i, (ids, s, e) in enumerate(job["sequences"]):
        rows[f"seq{i}"] = lg = model(torch.tensor([ids])).logits[0, s - 1:e - 1].float().numpy()
        lp = log_softmax(lg)
        ent.append(-(np.exp(lp) * lp).sum(-1))
        p1.append(np.exp(lp.max(-1)))
np.savez(job["out"], **rows)
print(json.dumps({"mean_entropy_nats": float(np.concatenate(ent).mean()),
                  "mean_top1_prob": float(np.concatenate(p1).mean())}))
"""


def _accuracy_sequences(model_dir: Path, data, p: dict) -> tuple[list, dict]:
    """[(ids, start, end)]: rows start-1..end-2 predict ids[start:end]; eval answers if there is data, else texts."""
    from edgeft.constants import EVAL_FILE
    from edgeft.records import read_jsonl
    from edgeft.runtime.prompt import PromptFormatter

    fmt = PromptFormatter(model_dir)
    seqs = []
    if data is not None:
        for rec in read_jsonl(data.path / EVAL_FILE):
            msgs = rec.get("messages")
            if not msgs or msgs[-1].get("role") != "assistant":
                continue
            ids, full = fmt.prompt_ids(msgs[:-1]), fmt.encode(fmt.render(msgs))[:MAX_SEQ]
            start = len(ids) if full[:len(ids)] == ids else 1  # a merge across the boundary: every position
            if start < len(full):
                seqs.append((full, start, len(full)))
            if len(seqs) == p["eval_convs"]:
                break
        if seqs:
            return seqs, {"source": f"{len(seqs)} eval conversations of {data.path / EVAL_FILE} (answer tokens, "
                                    "chat template applied)"}
    for text in TEXTS[:p["texts"]]:
        full = fmt.encode(text)[:MAX_SEQ]
        seqs.append((full, 1, len(full)))
    return seqs, {"source": f"{len(seqs)} fixed texts (every position after the first token)"}


def _child(code: str, job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(THREADS), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(job)], env=env, capture_output=True, text=True,
                          cwd=REPO, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{job.get('mode', 'reference')} child on {job.get('path', job.get('model'))} failed: "
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
