"""The parity gate export_onnx runs after every export, against PyTorch and the HF tokenizer.

1. Tokenizer: the device tokenizer's ids equal the HF (transformers) tokenizer's ids on every prompt
   (all eval prompts of the fine-tune data when the lineage has them, plus fixed texts: cheap).
2. fp32: greedy tokens equal torch fp32 greedy on every sampled prompt (the fixed texts plus an even
   spread of `parity_samples` eval prompts); a flip at a near-tie is counted, not failed.
3. Every type: teacher-forced top-1 agreement with torch and mean KL(torch || onnx) over the rows
   that pick the torch greedy continuation of each sampled prompt (and its stop), the positions a
   generated answer is made of (the prompt's own rows, e.g. a question being read, are not counted);
   below the type's minimum the export fails with a diagnosis. The agreement is a sample estimate:
   its one-sided 95% lower bound (edgeft.parity_stats; the prompt is the sampling unit) is recorded
   beside it. The gate decides on the estimate, not the bound: a bar on the bound would move with the
   sample size and fail a model that meets the bar on a small sample; the bound says how far to trust
   a pass, and parity_samples is the key that tightens it.

Memory does not depend on the vocabulary: torch's logits are recomputed per prompt for each type and
folded into running sums (edgeft.parity_stats.Agreement) with the ONNX logits at once; a Reference
keeps only ids and torch's top-2 logits per continuation row (for the near-tie test).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgeft.errors import StageFailure
from edgeft.parity_stats import Agreement

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
    top2_ids: np.ndarray  # [len(tokens) + 1, 2] torch's best and runner-up id on each continuation row
    top2_logits: np.ndarray  # [len(tokens) + 1, 2] their logits (float32)

    @classmethod
    def from_logits(cls, label: str, prompt: list[int], tokens: list[int], logits: np.ndarray) -> Reference:
        """The reference of torch `logits` over prompt + tokens (only the continuation rows' top-2 are kept)."""
        return cls(label, list(prompt), list(tokens), *_top2(logits[len(prompt) - 1:len(prompt) + len(tokens)]))


def build_prompts(hf_dir: Path, eval_records: list[dict] | None) -> list[Prompt]:
    """Fixed texts plus every eval prompt (chat template applied), tokenized by the HF tokenizer."""
    from jinja2.exceptions import TemplateError
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    out = [Prompt(f"text:{i}", list(tok(t).input_ids), t) for i, t in enumerate(PARITY_TEXTS)]
    convs = [(f"eval:{i + 1}", tuple(r["messages"][:-1])) for i, r in enumerate(eval_records or [])
             if r.get("messages") and r["messages"][-1].get("role") == "assistant"]
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


def sample_prompts(prompts: list[Prompt], n_eval: int) -> list[Prompt]:
    """The fixed texts plus `n_eval` eval prompts spread evenly over the eval file (all when 0 or fewer)."""
    evals = [p for p in prompts if p.label.startswith("eval:")]
    keep = {id(evals[i]) for i in _spread(len(evals), n_eval)}
    return [p for p in prompts if not p.label.startswith("eval:") or id(p) in keep]


def calibration_prompts(prompts: list[Prompt], sample: list[Prompt], n: int) -> tuple[list[Prompt], bool]:
    """Up to `n` eval prompts the parity sample did not take, spread (so a quantizer is not fitted to what the
    gate scores), and whether they are disjoint from the sample: without spare eval prompts, the sample."""
    taken = {id(p) for p in sample}
    rest = [p for p in prompts if p.label.startswith("eval:") and id(p) not in taken]
    if rest:
        return [rest[i] for i in _spread(len(rest), n)], True
    return list(sample), False


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


class TorchModel:
    """The HF model in torch fp32: teacher-forced logits of one sequence at a time (the gates' reference)."""

    def __init__(self, hf_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self._threads = torch.get_num_threads()
        # small models: one thread is faster per short pass, and it does not spin against a busy machine
        if sum(p.numel() for p in self.model.parameters()) < 50_000_000:
            torch.set_num_threads(1)

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32 logits."""
        with self._torch.no_grad():
            return self.model(self._torch.tensor([list(ids)])).logits[0].float().numpy()

    def close(self) -> None:
        """Free the weights and restore torch's thread count."""
        self.model = None
        self._torch.set_num_threads(self._threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def torch_references(torch_model, prompts: list[Prompt], fp32_rt, n_new: int) -> list[Reference]:
    """torch fp32 greedy continuation of every prompt, with torch's top-2 logits on its rows.

    Greedy decoding is a chain of argmaxes, so torch's greedy tokens are found with ONE torch pass
    per prompt: the fp32 ONNX model proposes its greedy continuation, torch teacher-forces it, and
    every proposed token (and the stop at EOS) must be torch's argmax at its position. The first
    position where it is not is torch's own choice: the reference ends there and the gate (fp32)
    then fails unless that position is a near-tie. 1 forward per prompt instead of 1 per token.
    `torch_model` has `logits(ids)` (a TorchModel).
    """
    refs = []
    for p in prompts:
        res = fp32_rt.generate(p.ids, n_new)
        proposed = res.tokens
        logits = torch_model.logits(p.ids + proposed)
        rows = logits[len(p.ids) - 1:]  # the rows that pick each continuation token, and the stop
        choice = rows.argmax(-1)
        k = next((j for j, t in enumerate(proposed) if int(choice[j]) != t), len(proposed))
        tokens = proposed[:k]
        if (k < len(proposed) or res.stopped_at_eos) and int(choice[k]) not in fp32_rt.eos_ids:
            tokens = tokens + [int(choice[k])]  # torch's own token where ONNX chose another or stopped
            logits = torch_model.logits(p.ids + tokens)
        refs.append(Reference.from_logits(p.label, p.ids, tokens, logits))
        del logits, rows
    return refs


def _top2(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the ids of the best and runner-up logits, and those logits."""
    part = np.argpartition(rows, -2, axis=-1)[:, -2:]
    vals = np.take_along_axis(rows, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    return np.take_along_axis(part, order, -1).astype(np.int64), np.take_along_axis(vals, order, -1).astype(np.float32)


def gate(rt, refs: list[Reference], torch_logits: Callable[[list[int]], np.ndarray], type_name: str,
         n_new: int, min_top1: float, where: Path, fix: str = "") -> dict:
    """Greedy and teacher-forced comparison with torch through runtime `rt`; raises on a failed check.

    `torch_logits(ids)` gives torch's logits for one sequence (TorchModel.logits); each prompt's two
    logits matrices are reduced at once and dropped."""
    greedy_ok, ties, stats = 0, 0, Agreement()
    for ref in refs:
        seq = ref.prompt + ref.tokens
        # rows from the last prompt position on pick the continuation (and its stop): what generation uses
        stats.add(torch_logits(seq), rt.logits(seq), start=len(ref.prompt) - 1, label=ref.label)
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
    metrics = {"greedy_match": round(greedy_ok / len(refs), 4), **stats.summary(), "min_top1": min_top1}
    if type_name == "fp32":
        metrics["greedy_near_tie_flips"] = ties
    if stats.positions and stats.top1 < min_top1:
        raise StageFailure(
            f"{where}: {type_name} teacher-forced top-1 agreement with PyTorch is {stats.top1:.4f} < "
            f"{min_top1} over {stats.positions} positions of {stats.prompts} prompts (95% lower bound "
            f"{metrics['top1_lower95']:.4f}; mean KL {stats.kld:.3g} nats, worst prompt {stats.worst[1]} "
            f"at {stats.worst[0]:.3f}, max|logit diff| {stats.max_abs_diff:.3g}); the quantization loses "
            f"too much for this model{fix}. A sample estimate: raise export_onnx.parity_samples "
            "(0 = every eval prompt) to measure more prompts")
    return metrics


def _near_tie(rt, ref: Reference, got: list[int]) -> bool:
    """True when the first differing greedy token was torch's runner-up at a near-tie."""
    k = _first_diff(got, ref.tokens)
    if k >= len(ref.top2_ids):
        return False
    top, second = (float(v) for v in ref.top2_logits[k])
    runner_up = int(ref.top2_ids[k][1])
    ours = got[k] if k < len(got) else None  # None: the ONNX model stopped at EOS
    took_runner_up = ours == runner_up if ours is not None else runner_up in rt.eos_ids
    return took_runner_up and top - second <= _TIE_REL * max(1.0, abs(top))


def _first_diff(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _at(tokens: list[int], k: int):
    return tokens[k] if k < len(tokens) else "EOS"


def _spread(n: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(n) (all when count is 0 or >= n)."""
    if not count or count >= n:
        return list(range(n))
    return [int(i * n / count) for i in range(count)]
