"""The parity gate export_onnx runs after every export, against PyTorch and the HF tokenizer.

1. Tokenizer: the device tokenizer's ids equal the HF (transformers) tokenizer's ids on every prompt.
2. fp32: greedy tokens equal torch fp32 greedy on every prompt (all eval prompts of the fine-tune
   data when the lineage has them, plus fixed texts); a flip at a near-tie is counted, not failed.
3. Every type: teacher-forced top-1 agreement with torch and mean KL(torch || onnx) over the rows
   that pick the torch greedy continuation of each prompt (and its stop), the positions a generated
   answer is made of (the prompt's own rows, e.g. a question being read, are not counted); below the
   type's minimum the export fails with a diagnosis.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.bench.metrics import log_softmax
from edgeft.errors import StageFailure

PARITY_TEXTS = ("The quick brown fox jumps over", "Question: How do I reset the unit?\nAnswer:",
                "1, 2, 3, 4,")  # plus one chat-template prompt when there is no eval data
_TIE_REL = 1e-4  # top-2 gap / top logit below which fp32 may flip (noise seen: ~2e-6)


@dataclass(frozen=True)
class Prompt:
    label: str  # "eval:17" (line of eval.jsonl) or "text:0"
    ids: list[int]  # HF tokenizer ids: the reference every runtime tokenizer must reproduce
    text: str  # the rendered prompt (chat template applied for eval records)
    messages: tuple | None = None  # the turns before the answer, for eval records


@dataclass(frozen=True)
class Reference:
    label: str
    prompt: list[int]
    tokens: list[int]  # torch greedy continuation, EOS excluded
    logits: np.ndarray | None  # torch teacher-forced logits over prompt + tokens (sampled prompts only)


def build_prompts(hf_dir: Path, eval_records: list[dict] | None, max_prompts: int) -> list[Prompt]:
    """Fixed texts plus every eval prompt (chat template applied), tokenized by the HF tokenizer."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    out = [Prompt(f"text:{i}", list(tok(t).input_ids), t) for i, t in enumerate(PARITY_TEXTS)]
    convs = [(f"eval:{i + 1}", tuple(r["messages"][:-1])) for i, r in enumerate(eval_records or [])
             if r.get("messages") and r["messages"][-1].get("role") == "assistant"]
    if max_prompts and len(convs) > max_prompts:
        step = len(convs) / max_prompts
        convs = [convs[int(i * step)] for i in range(max_prompts)]
    if not convs and tok.chat_template:
        convs = [("chat:0", ({"role": "user", "content": "What does error code E4 mean?"},))]
    for label, msgs in convs:
        if not tok.chat_template:
            text = "\n".join(m["content"] for m in msgs)
            out.append(Prompt(label, list(tok(text).input_ids), text))
            continue
        try:
            text = tok.apply_chat_template(list(msgs), add_generation_prompt=True, tokenize=False)
        except TemplateError:  # templates that insist on a system turn or other roles
            continue
        # the project's BOS rule (edgeft.runtime.prompt, used by train too): add it unless the text has it
        bos_in_text = bool(tok.bos_token) and text.startswith(tok.bos_token)
        ids = tok(text, add_special_tokens=not bos_in_text).input_ids
        out.append(Prompt(label, list(ids), text, msgs))
    return out


def check_tokenizer(prompts: list[Prompt], encode: Callable[[Prompt], list[int]], who: str) -> int:
    """Raise unless `encode` (a runtime's tokenizer) gives the HF ids on every prompt; returns the count."""
    for p in prompts:
        got = list(encode(p))
        if got == p.ids:
            continue
        k = next((j for j, (a, b) in enumerate(zip(got, p.ids)) if a != b), min(len(got), len(p.ids)))
        raise StageFailure(
            f"{who} tokenizer differs from the HF tokenizer on parity prompt {p.label} ({p.text[:60]!r}) "
            f"at id {k}: HF {p.ids[max(0, k - 2):k + 3]} vs {who} {got[max(0, k - 2):k + 3]} "
            f"(lengths {len(p.ids)} vs {len(got)}); the exported tokenizer files do not reproduce "
            "the model's tokenizer: check tokenizer.json / tokenizer_config.json (added tokens, "
            "add_bos_token, normalizer) in the hf artifact")
    return len(prompts)


def torch_references(hf_dir: Path, prompts: list[Prompt], fp32_rt, n_new: int,
                     tf_prompts: int) -> list[Reference]:
    """torch fp32 greedy continuation of every prompt; teacher-forced logits kept for `tf_prompts` of them.

    Greedy decoding is a chain of argmaxes, so torch's greedy tokens are found with ONE torch pass
    per prompt: the fp32 ONNX model proposes its greedy continuation, torch teacher-forces it, and
    every proposed token (and the stop at EOS) must be torch's argmax at its position. The first
    position where it is not is torch's own choice: the reference ends there and the gate (fp32)
    then fails unless that position is a near-tie. 1 forward per prompt instead of 1 per token.
    """
    import torch
    from transformers import AutoModelForCausalLM

    keep = _spread(len(prompts), tf_prompts)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    # small models: one thread is faster per short pass, and it does not spin against a busy machine
    torch.set_num_threads(1 if sum(p.numel() for p in model.parameters()) < 50_000_000 else threads)
    try:
        refs = _torch_refs(model, prompts, fp32_rt, n_new, keep)
    finally:
        torch.set_num_threads(threads)
    del model
    return refs


def _torch_refs(model, prompts: list[Prompt], fp32_rt, n_new: int, keep: set[int]) -> list[Reference]:
    import torch

    refs = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            res = fp32_rt.generate(p.ids, n_new)
            proposed = res.tokens
            logits = model(torch.tensor([p.ids + proposed])).logits[0].float().numpy()
            choice = logits[len(p.ids) - 1:].argmax(-1)  # torch's greedy pick after each prefix
            k = next((j for j, t in enumerate(proposed) if int(choice[j]) != t), len(proposed))
            tokens = proposed[:k]
            if k < len(proposed) and int(choice[k]) not in fp32_rt.eos_ids:
                tokens = tokens + [int(choice[k])]  # torch's own token: the ONNX greedy will differ here
                logits = model(torch.tensor([p.ids + tokens])).logits[0].float().numpy()
            elif k == len(proposed) and res.stopped_at_eos and int(choice[k]) not in fp32_rt.eos_ids:
                tokens = tokens + [int(choice[k])]  # torch goes on where ONNX stopped at EOS
                logits = model(torch.tensor([p.ids + tokens])).logits[0].float().numpy()
            else:
                logits = logits[: len(p.ids) + len(tokens)]
            refs.append(Reference(p.label, list(p.ids), tokens, logits if i in keep or tokens != proposed
                                  else None))
    return refs


def gate(rt, refs: list[Reference], type_name: str, n_new: int, min_top1: float,
         where: Path, fix: str = "") -> dict:
    """Greedy and teacher-forced comparison with torch through runtime `rt`; raises on a failed check."""
    greedy_ok, ties, hits, kl_sum, max_diff, worst = 0, 0, [], 0.0, 0.0, (1.0, "")
    for ref in refs:
        if ref.logits is not None:
            logits = rt.logits(ref.prompt + ref.tokens)
            diff = np.abs(logits - ref.logits).max(axis=-1)
            max_diff = max(max_diff, float(diff.max()))
            s = len(ref.prompt) - 1  # rows that pick the continuation (and its stop): what generation uses
            hit = logits[s:].argmax(-1) == ref.logits[s:].argmax(-1)
            hits.append(hit)
            worst = min(worst, (float(hit.mean()), ref.label))
            ref_lp = log_softmax(ref.logits[s:])
            kl_sum += float((np.exp(ref_lp) * (ref_lp - log_softmax(logits[s:]))).sum())
        got = rt.generate(ref.prompt, n_new).tokens
        if got == ref.tokens:
            greedy_ok += 1
        elif type_name == "fp32":
            if not _near_tie(rt, ref, got):
                k = _first_diff(got, ref.tokens)
                raise StageFailure(
                    f"{where}: fp32 ONNX greedy tokens differ from PyTorch on parity prompt {ref.label} "
                    f"at new token {k}: torch {_at(ref.tokens, k)} vs onnx {_at(got, k)}, not a near-tie "
                    f"(torch top-2 margin above {_TIE_REL:g} relative). The exported graph computes "
                    "something else: check config.json (rope_scaling, sliding_window, attention "
                    f"settings) against what the exporter supports for this model_type{fix}")
            ties += 1  # fp32 rounding can flip a near-tie; the rest of this prompt diverges
    allhits = np.concatenate(hits) if hits else np.zeros(0, bool)
    n_pos = int(allhits.size)
    metrics = {"greedy_match": round(greedy_ok / len(refs), 4),
               "top1_agreement": round(float(allhits.mean()), 4) if n_pos else None,
               "kld": float(f"{kl_sum / n_pos:.4g}") if n_pos else None,
               "max_abs_logit_diff": float(f"{max_diff:.4g}"), "min_top1": min_top1}
    if type_name == "fp32":
        metrics["greedy_near_tie_flips"] = ties
    if n_pos and metrics["top1_agreement"] < min_top1:
        raise StageFailure(
            f"{where}: {type_name} teacher-forced top-1 agreement with PyTorch is "
            f"{metrics['top1_agreement']:.4f} < {min_top1} over {n_pos} positions of {len(hits)} prompts "
            f"(mean KL {metrics['kld']:.3g} nats, worst prompt {worst[1]} at {worst[0]:.3f}, max|logit "
            f"diff| {max_diff:.3g}); the quantization loses too much for this model{fix}")
    return metrics


def _near_tie(rt, ref: Reference, got: list[int]) -> bool:
    """True when the first differing greedy token was torch's runner-up at a near-tie."""
    k = _first_diff(got, ref.tokens)
    row_i = len(ref.prompt) + k - 1  # the torch logits row that chose new token k
    if ref.logits is None or row_i >= len(ref.logits):
        return False
    row = np.asarray(ref.logits[row_i])
    order = np.argsort(row)
    top, runner_up = float(row[order[-1]]), int(order[-2])
    ours = got[k] if k < len(got) else None  # None: the ONNX model stopped at EOS
    took_runner_up = ours == runner_up if ours is not None else runner_up in rt.eos_ids
    return took_runner_up and top - float(row[runner_up]) <= _TIE_REL * max(1.0, abs(top))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _at(tokens: list[int], k: int):
    return tokens[k] if k < len(tokens) else "EOS"


def _spread(n: int, count: int) -> set[int]:
    """`count` indices spread evenly over range(n) (all when count is 0 or >= n)."""
    if not count or count >= n:
        return set(range(n))
    return {int(i * n / count) for i in range(count)}
