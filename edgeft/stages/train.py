"""Fine-tune a causal LM: QLoRA (NF4 base via bitsandbytes), LoRA, full, or freeze (last N blocks).

Output: an `adapter` artifact (qlora, lora) or an `hf` artifact (full, freeze). Loss is on assistant
tokens only; batches group similar lengths to waste little on padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeft import artifact
from edgeft.constants import ADAPTER_DIR, EVAL_FILE, KIND_ADAPTER, KIND_DATA, KIND_HF, TRAIN_FILE
from edgeft.data import IGNORE_INDEX, chunk_text, encode_example, read_jsonl
from edgeft.errors import UserError
from edgeft.runtime.prompt import PromptFormatter
from edgeft.stages import hf_io, loop

METHODS = ("qlora", "lora", "full", "freeze")
OPTIMS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Config:
    method: str = "qlora"  # qlora | lora | full | freeze
    epochs: float = 3.0  # passes over the train split; ignored when max_steps > 0
    max_steps: int = 0  # optimizer steps; 0 = derive from epochs
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03  # share of steps spent warming up
    max_length: int = 256  # tokens per example; longer ones are truncated
    seed: int = 0
    lora_r: int = 16  # adapter rank
    lora_alpha: int = 32  # adapter scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)
    lora_dropout: float = 0.0
    target_modules: str = "all-linear"  # 'all-linear' or comma-separated module names (q_proj,v_proj)
    use_dora: bool = False  # weight-decomposed LoRA
    use_rslora: bool = False  # rank-stabilised scaling
    freeze_last_n: int = 2  # freeze method: train only the last N decoder blocks (+ final norm, head)
    freeze_pattern: str = ""  # freeze method: regex of parameter names to train (overrides last_n)
    quant_type: str = "nf4"  # qlora: nf4 | fp4
    double_quant: bool = True  # qlora: quantize the quantization constants too (~0.4 bit/param saved)
    compute_dtype: str = "float32"  # qlora compute dtype: float32 | bfloat16 | float16 (float16 needs CUDA)
    optim: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (the last three need CUDA)
    gradient_checkpointing: bool = False  # recompute activations: less memory, ~20% slower
    device: str = "auto"  # auto | cpu | cuda
    eval_samples: int = 64  # eval-loss examples from the eval split (0 = skip)
    log_every: int = 10  # steps between loss-curve points


def run(src, cfg: Config, out: Path, *, data: artifact.Artifact) -> artifact.Artifact:
    """Train `src` (an hf artifact, a local model dir or a hub id) on the `data` artifact."""
    validate(cfg)
    data = artifact.load(data.path, kind=KIND_DATA)
    model_dir = hf_io.resolve_model(src)
    device = _device(cfg)
    parent = src if isinstance(src, artifact.Artifact) else None
    inputs = {"base_model": str(src.path if parent else src), "data_id": data.id,
              "data_sha256": artifact.hash_files([data.path / TRAIN_FILE, data.path / EVAL_FILE]),
              "tokenizer_sha256": hf_io.tokenizer_hash(model_dir)}

    def payload(tmp: Path) -> dict:
        fmt = PromptFormatter(model_dir)
        train = _examples(fmt, read_jsonl(data.path / TRAIN_FILE), cfg.max_length)
        evals = _examples(fmt, read_jsonl(data.path / EVAL_FILE), cfg.max_length)[: cfg.eval_samples]
        torch.manual_seed(cfg.seed)
        model = _load_model(model_dir, cfg, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        metrics = loop.fit(model, train, evals, cfg, device, fmt.tokenizer.token_to_id("<unk>") or 0,
                           desc=f"train[{cfg.method}]")
        metrics.update(trainable_params=trainable, total_params=total, method=cfg.method,
                       device=str(device), train_examples=len(train))
        if cfg.method in ("qlora", "lora"):
            model.save_pretrained(tmp / ADAPTER_DIR)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        hf_io.copy_tokenizer(model_dir, tmp)
        loop.plot_loss(metrics["loss_curve"], tmp / "loss.png")
        return metrics

    kind = KIND_ADAPTER if cfg.method in ("qlora", "lora") else KIND_HF
    params = {"config": cfg, "base": inputs["base_model"] if not parent else None}
    return artifact.build(out, kind=kind, stage="train", params=params, parent=parent, payload=payload,
                          inputs=inputs)


def validate(cfg: Config) -> None:
    """Refuse values this stage (or this machine) cannot honour, before anything runs."""
    if cfg.method not in METHODS:
        raise UserError(f"train.method: '{cfg.method}' is not one of {', '.join(METHODS)}")
    if cfg.optim not in OPTIMS:
        raise UserError(f"train.optim: '{cfg.optim}' is not one of {', '.join(OPTIMS)}")
    if cfg.compute_dtype not in DTYPES:
        raise UserError(f"train.compute_dtype: '{cfg.compute_dtype}' is not one of {', '.join(DTYPES)}")
    if cfg.quant_type not in ("nf4", "fp4"):
        raise UserError(f"train.quant_type: '{cfg.quant_type}' is not nf4 or fp4")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_length < 8:
        raise UserError("train.batch_size and train.grad_accum must be >= 1, train.max_length >= 8")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.optim != "adamw" and not cuda:
        raise UserError(f"train.optim={cfg.optim} needs CUDA (bitsandbytes paged/8-bit optimizers); "
                        "use train.optim=adamw on CPU")
    if cfg.compute_dtype == "float16" and not cuda:
        raise UserError("train.compute_dtype=float16 needs CUDA; use float32 or bfloat16 on CPU")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")


def _device(cfg: Config) -> torch.device:
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def _examples(fmt: PromptFormatter, records: list[dict], max_length: int) -> list[tuple[list, list]]:
    out = []
    for rec in records:
        if "text" in rec:
            out += chunk_text(fmt, rec["text"], max_length)
        else:
            ids, labels = encode_example(fmt, rec, max_length)
            if any(x != IGNORE_INDEX for x in labels[1:]):
                out.append((ids, labels))
    return out


def _load_model(model_dir: Path, cfg: Config, device: torch.device):
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.compute_dtype]
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=hf_io.bnb_config(cfg.quant_type, cfg.double_quant, dtype),
            dtype=dtype, device_map={"": str(device)})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
    if cfg.method in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model

        targets = cfg.target_modules if cfg.target_modules == "all-linear" else \
            [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
        lcfg = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=targets, use_dora=cfg.use_dora,
                          use_rslora=cfg.use_rslora)
        try:
            return get_peft_model(model, lcfg)
        except ValueError as e:
            raise UserError(f"train.target_modules: {e}") from None
    if cfg.method == "freeze":
        _freeze(model, cfg)
    return model


def _freeze(model, cfg: Config) -> None:
    """Train only the last N blocks (+ final norm and head), or the parameters matching a regex."""
    if cfg.freeze_pattern:
        pat = re.compile(cfg.freeze_pattern)
        keep = lambda n: bool(pat.search(n))  # noqa: E731
    else:
        n_layers = model.config.num_hidden_layers
        if not 1 <= cfg.freeze_last_n <= n_layers:
            raise UserError(f"train.freeze_last_n: {cfg.freeze_last_n} not in 1..{n_layers} (model layers)")
        first = n_layers - cfg.freeze_last_n
        layer_re = re.compile(r"\.layers\.(\d+)\.")

        def keep(n):
            m = layer_re.search(n)
            return (int(m.group(1)) >= first) if m else ("norm" in n.split(".")[-2] or "lm_head" in n)
    for n, p in model.named_parameters():
        p.requires_grad = keep(n)
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"train.freeze_pattern: '{cfg.freeze_pattern}' matches no parameter name")
