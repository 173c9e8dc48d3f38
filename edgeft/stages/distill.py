"""Knowledge distillation: a student (a pruned model, or a given smaller model with the teacher's tokenizer)
learns the teacher's next-token distributions on the fine-tune data, through the shared loop (loop.fit).

Loss per predicted position, both distributions softened by the temperature T:
  forward KL(p_teacher || q_student) (mode covering), reverse KL(q || p) (mode seeking), or a mix of both,
  scaled by T^2 so gradients keep their size (Hinton et al. 2015); blended with cross-entropy on the labels:
  loss = alpha * KL + (1 - alpha) * CE.
With top_k > 0 both distributions are renormalised over the teacher's k most likely tokens: k values and
ids per token instead of a vocabulary row. Teacher logits come from the teacher running beside the student,
or (cache: true) from a safetensors file written first, so teacher and student never share memory.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import EVAL_FILE, KIND_DATA, KIND_HF, TEACHER_CACHE_FILE, TRAIN_FILE
from edgeft.errors import UserError
from edgeft.records import IGNORE_INDEX, read_jsonl
from edgeft.runtime.prompt import PromptFormatter
from edgeft.training import dist, examples, hf_io, loop, sparsity

LOSSES = ("forward", "reverse", "mixed")
POSITIONS = ("all", "answer")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Config:
    epochs: float = opt(0.0, "passes over the train split; 0 (with max_steps 0) = stage off")
    max_steps: int = opt(0, "optimizer steps; 0 = derive from epochs")
    batch_size: int = opt(16, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate (linear warm-up, cosine decay); the student trains in full")
    weight_decay: float = opt(0.0, "AdamW weight decay (decoupled, on the student's parameters)")
    warmup_ratio: float = opt(0.03, "share of steps spent warming up")
    max_length: int = opt(256, "tokens per example; longer ones are truncated")
    seed: int = opt(0, "seed for dropout and the batch order")
    optim: str = opt("adamw", "adamw (the loop's bitsandbytes optimizers need CUDA)")
    log_every: int = opt(10, "steps between loss-curve points")
    loss: str = opt("forward", "forward | reverse | mixed KL between teacher and student")
    mix: float = opt(0.5, "loss=mixed: weight of forward KL, 1 - mix on reverse KL")
    temperature: float = opt(2.0, "softens both distributions; the KL is multiplied by T^2")
    alpha: float = opt(0.7, "weight of the KL term; 1 - alpha on cross-entropy with the labels")
    top_k: int = opt(0, "0 = full vocabulary; k = KL over the teacher's k most likely tokens, renormalised")
    positions: str = opt("all", "all = every real token of the example; answer = labelled (assistant) tokens only")
    cache: bool = opt(False, "precompute teacher top-k logits to disk, then train without the teacher loaded")
    student: str = opt("", "a smaller model dir or hub id with the teacher's tokenizer; '' = the pruned model")
    device: str = opt("auto", "auto | cpu | cuda")
    eval_samples: int = opt(64, "eval examples for eval loss and KL (0 = skip)")
    dtype: str = opt("float16", "saved weights: float16 | bfloat16 | float32")


def enabled(cfg: Config) -> bool:
    """Whether the recipe asks for distillation."""
    return cfg.epochs > 0 or cfg.max_steps > 0


def validate(cfg: Config) -> None:
    """Refuse values this stage cannot honour, before anything runs."""
    if cfg.loss not in LOSSES:
        raise UserError(f"distill.loss: '{cfg.loss}' is not one of {', '.join(LOSSES)}")
    if cfg.positions not in POSITIONS:
        raise UserError(f"distill.positions: '{cfg.positions}' is not one of {', '.join(POSITIONS)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"distill.dtype: '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    if not (0 <= cfg.alpha <= 1 and 0 <= cfg.mix <= 1 and cfg.temperature > 0):
        raise UserError("distill.alpha and distill.mix must be in 0..1 and distill.temperature > 0")
    if cfg.top_k < 0 or cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_length < 8:
        raise UserError("distill.top_k must be >= 0, batch_size and grad_accum >= 1, max_length >= 8")
    if cfg.cache and cfg.top_k == 0:
        raise UserError("distill.cache needs distill.top_k > 0 (a full-vocabulary row per token is too big "
                        "to keep on disk); set distill.top_k=64, say")
    if cfg.optim != "adamw":
        raise UserError(f"distill.optim: '{cfg.optim}' unsupported here; use adamw")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("distill.device=cuda but no CUDA device is visible; use distill.device=auto or cpu")


def run(src: artifact.Artifact | None, cfg: Config, out: Path, *, data: artifact.Artifact,
        teacher: artifact.Artifact) -> artifact.Artifact:
    """Distill `teacher` into the student (`src`, or `cfg.student` when given) on the `data` train split."""
    validate(cfg)
    if dist.sharded():  # the student is saved from rank 0's module: with sharded parameters that is a shard
        raise UserError(f"distill: runs on one process or under DDP (configs/accelerate/ddp.yaml), not under "
                        f"{dist.sharded()}; launch with the DDP config, or set distill.epochs=0 for this run")
    if src is None and not cfg.student:
        raise UserError("distill: no student; set prune.ratio (distill the pruned model) or distill.student=DIR")
    teacher = artifact.load(teacher.path, kind=KIND_HF)
    data = artifact.load(data.path, kind=KIND_DATA)
    if cfg.student:
        student_dir = hf_io.resolve_model(cfg.student)
    else:
        src = artifact.load(src.path, kind=KIND_HF)
        student_dir = src.path
    check_tokenizers(teacher.path, student_dir)
    sparse = bool(src is not None and not cfg.student and src.metrics.get("sparsity"))
    parent = src if (src is not None and not cfg.student) else teacher
    inputs = {"teacher_id": teacher.id, "student": None if parent is src else str(student_dir),
              "data_id": data.id, "data_sha256": artifact.hash_files([data.path / TRAIN_FILE])}

    def payload(tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        device = examples.pick_device(cfg.device)
        dist.accelerator(cpu=device.type == "cpu")  # joins the process group when launched by accelerate
        fmt = PromptFormatter(teacher.path)
        train = examples.encode(fmt, read_jsonl(data.path / TRAIN_FILE), cfg.max_length, "distill.max_length")
        evals = examples.encode(fmt, read_jsonl(data.path / EVAL_FILE), cfg.max_length,
                                "distill.max_length")[: cfg.eval_samples]
        pad = fmt.tokenizer.token_to_id("<unk>") or 0
        torch.manual_seed(cfg.seed)
        load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)  # noqa: E731
        t_model = load(teacher.path).eval().requires_grad_(False)
        with tempfile.TemporaryDirectory(prefix=artifact.scratch_prefix(out), dir=out.parent) as cache_dir:
            if cfg.cache:
                teach = CachedTeacher.build(t_model, train + evals, cfg, pad, device, Path(cache_dir))
                del t_model  # teacher and student never share memory
            else:
                teach = LiveTeacher(t_model, cfg.top_k)
            student = load(student_dir)
            if sparse:  # an unstructured-pruned student keeps its zeros: their gradients are masked
                sparsity.keep_zeros(student)
            kl_before = eval_kl(student, teach, evals, cfg, pad, device)
            metrics = loop.fit(student, train, evals, cfg, device, pad, desc="distill",
                               loss_fn=lambda m, b: distill_loss(m(**_inputs(b)).logits, teach(b), b, cfg))
            metrics.update(eval_kl_before=kl_before, eval_kl_after=eval_kl(student, teach, evals, cfg, pad, device),
                           student_params=sum(p.numel() for p in student.parameters()),
                           teacher_params=teach.params, cached_teacher=cfg.cache, train_examples=len(train),
                           device=str(device))
        if not dist.is_main():  # rank 0 alone writes
            return metrics
        student.to(DTYPES[cfg.dtype]).save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer(student_dir, tmp)
        loop.plot_loss(metrics["loss_curve"], tmp / "loss.png")
        return metrics

    # under `accelerate launch` every rank distills its share of each step; rank 0 publishes
    return dist.build_on_every_rank(out, payload, kind=KIND_HF, stage="distill", params=cfg, parent=parent,
                                    inputs=inputs)


def check_tokenizers(teacher_dir: Path, student_dir: Path) -> None:
    """Refuse a student whose vocabulary (token -> id) or logit width differs from the teacher's."""
    import json

    from tokenizers import Tokenizer

    def vocab(d: Path):
        if not (d / "tokenizer.json").is_file():
            raise UserError(f"{d}: no tokenizer.json; distillation compares tokenizers (save a fast tokenizer)")
        cfg = json.loads((d / "config.json").read_text())
        return Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab(with_added_tokens=True), cfg.get("vocab_size")

    (tv, tn), (sv, sn) = vocab(teacher_dir), vocab(student_dir)
    if tv != sv or tn != sn:
        diff = len(set(tv.items()) ^ set(sv.items()))
        raise UserError(f"distill.student: {student_dir} has another tokenizer than the teacher {teacher_dir} "
                        f"({diff} token/id pairs differ, vocab_size {sn} vs {tn}); logit distillation needs "
                        "the same vocabulary: pick a student with the teacher's tokenizer")


def kl_terms(s_logits: torch.Tensor, teacher, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(forward KL(p||q), reverse KL(q||p)) per position at temperature T, unscaled.

    `teacher` is a logits tensor like `s_logits` (full vocabulary) or a (values, ids) pair of the
    teacher's top-k: then both distributions are renormalised over those k ids.
    """
    if isinstance(teacher, tuple):
        values, ids = teacher
        s_logits, t_logits = s_logits.gather(-1, ids.long()), values.float()
    else:
        t_logits = teacher.float()
    log_q = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(t_logits / temperature, dim=-1)
    fwd = (log_p.exp() * (log_p - log_q)).sum(-1)
    rev = (log_q.exp() * (log_q - log_p)).sum(-1)
    return fwd, rev


def distill_loss(s_logits: torch.Tensor, teacher, batch: dict, cfg: Config) -> torch.Tensor:
    """alpha * T^2 * KL + (1 - alpha) * CE, over the positions `cfg.positions` selects."""
    s, t = s_logits[:, :-1], _shift(teacher)  # position i predicts token i + 1
    keep = _positions(batch, cfg.positions)
    fwd, rev = kl_terms(s, t, cfg.temperature)
    kl = {"forward": fwd, "reverse": rev, "mixed": cfg.mix * fwd + (1 - cfg.mix) * rev}[cfg.loss]
    kd = (kl * keep).sum() / keep.sum().clamp(min=1) * cfg.temperature ** 2
    if cfg.alpha == 1:
        return kd
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                         ignore_index=IGNORE_INDEX)
    return cfg.alpha * kd + (1 - cfg.alpha) * ce


@torch.no_grad()
def eval_kl(student, teacher, examples: list, cfg: Config, pad_id: int, device) -> float | None:
    """Mean forward KL(teacher || student) at T=1 over the selected positions of `examples`."""
    if not examples:
        return None
    student.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), cfg.batch_size):
        batch = loop.collate(examples[i:i + cfg.batch_size], pad_id, device)
        s = student(**_inputs(batch)).logits[:, :-1]
        keep = _positions(batch, cfg.positions)
        fwd, _ = kl_terms(s, _shift(teacher(batch)), 1.0)
        total += float((fwd * keep).sum())
        n += int(keep.sum())
    student.train()
    return round(total / max(n, 1), 5)


class LiveTeacher:
    """Teacher logits computed beside the student, per batch (top-k when asked)."""

    def __init__(self, model, top_k: int):
        self.model, self.top_k = model, top_k
        self.params = sum(p.numel() for p in model.parameters())

    @torch.no_grad()
    def __call__(self, batch: dict):
        logits = self.model(**_inputs(batch)).logits
        if not self.top_k:
            return logits
        top = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1)
        return top.values, top.indices


class CachedTeacher:
    """Teacher top-k logits precomputed once into a safetensors file, read back per batch by example ids."""

    def __init__(self, path: Path, index: dict, params: int, device):
        from safetensors import safe_open

        self._file = safe_open(str(path), framework="pt")
        self.index, self.params, self.device = index, params, device
        self.values, self.ids = self._file.get_slice("values"), self._file.get_slice("ids")

    @classmethod
    @torch.no_grad()
    def build(cls, model, examples: list, cfg: Config, pad_id: int, device, cache_dir: Path) -> "CachedTeacher":
        """Run the teacher over every distinct example once and write its top-k to disk."""
        from safetensors.torch import save_file

        live = LiveTeacher(model, cfg.top_k)
        uniq = list(dict.fromkeys(tuple(e[0]) for e in examples))
        values, ids, index, offset = [], [], {}, 0
        for i in range(0, len(uniq), cfg.batch_size):
            chunk = uniq[i:i + cfg.batch_size]
            batch = loop.collate([(list(x), list(x)) for x in chunk], pad_id, device)
            v, k = live(batch)
            for row, x in enumerate(chunk):
                values.append(v[row, : len(x)].to(torch.float16).cpu())
                ids.append(k[row, : len(x)].to(torch.int32).cpu())
                index[x] = offset
                offset += len(x)
        path = cache_dir / TEACHER_CACHE_FILE
        save_file({"values": torch.cat(values), "ids": torch.cat(ids)}, str(path))
        return cls(path, index, live.params, device)

    def __call__(self, batch: dict):
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch["input_ids"].cpu(), batch["attention_mask"].cpu())]
        b, t = batch["input_ids"].shape
        k = self.values.get_shape()[1]
        values = torch.zeros(b, t, k, dtype=torch.float16)
        ids = torch.zeros(b, t, k, dtype=torch.int32)
        for r, x in enumerate(rows):
            start = self.index[tuple(x)]
            values[r, : len(x)] = self.values[start:start + len(x)]
            ids[r, : len(x)] = self.ids[start:start + len(x)]
        return values.to(self.device), ids.to(self.device)


def _inputs(batch: dict) -> dict:
    """The model inputs of a loop batch (position_ids when the loop provides them)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def _shift(teacher):
    return tuple(x[:, :-1] for x in teacher) if isinstance(teacher, tuple) else teacher[:, :-1]


def _positions(batch: dict, which: str) -> torch.Tensor:
    """1.0 where position i's next token is a real token (all) or a labelled answer token (answer)."""
    if which == "answer":
        return (batch["labels"][:, 1:] != IGNORE_INDEX).float()
    return batch["attention_mask"][:, 1:].float()
