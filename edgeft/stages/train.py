"""Fine-tune a causal LM: QLoRA (NF4 base via bitsandbytes), LoRA, full, or freeze (last N blocks).

Output: an `adapter` artifact (qlora, lora) or an `hf` artifact (full, freeze). Loss is on assistant
tokens only; batches group similar lengths, or pack examples into full rows. Checkpoints (`save_every`)
live in `<out>.ckpt` until the artifact is finished: rerunning a killed run resumes from them. Under
`accelerate launch` every rank trains and rank 0 alone writes the artifact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeft import artifact, host
from edgeft.config import opt
from edgeft.constants import ADAPTER_DIR, EVAL_FILE, KIND_ADAPTER, KIND_DATA, KIND_HF, TRAIN_FILE
from edgeft.errors import UserError
from edgeft.records import read_jsonl
from edgeft.runtime.prompt import PromptFormatter
from edgeft.training import checkpoint, dist, examples, hf_io, loop, nf4

METHODS = ("qlora", "lora", "full", "freeze")
OPTIMS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Config:
    method: str = opt("qlora", "qlora | lora | full | freeze")
    epochs: float = opt(3.0, "passes over the train split; ignored when max_steps > 0")
    max_steps: int = opt(0, "optimizer steps; 0 = derive from epochs")
    batch_size: int = opt(8, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(2e-4, "peak learning rate (linear warm-up, cosine decay)")
    weight_decay: float = opt(0.0, "AdamW weight decay (decoupled, on the trained parameters)")
    warmup_ratio: float = opt(0.03, "share of steps spent warming up")
    max_length: int = opt(256, "tokens per example; longer ones are truncated")
    seed: int = opt(0, "seed for adapter init, dropout and the batch order")
    lora_r: int = opt(16, "adapter rank")
    lora_alpha: int = opt(32, "adapter scale numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    lora_dropout: float = opt(0.0, "dropout on the input of the LoRA branch (lora, qlora)")
    target_modules: str = opt("all-linear", "'all-linear' or comma-separated module names (q_proj,v_proj)")
    use_dora: bool = opt(False, "weight-decomposed LoRA")
    use_rslora: bool = opt(False, "rank-stabilised scaling")
    freeze_last_n: int = opt(2, "freeze method: train only the last N decoder blocks (+ final norm, head)")
    freeze_pattern: str = opt("", "freeze method: regex of parameter names to train (overrides last_n)")
    quant_type: str = opt("nf4", "qlora: nf4 | fp4")
    double_quant: bool = opt(True, "qlora: quantize the quantization constants too (~0.4 bit/param saved)")
    compute_dtype: str = opt("float32", "qlora compute dtype: float32 | bfloat16 | float16 (float16 needs CUDA)")
    optim: str = opt("adamw", "adamw | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (the last three need CUDA)")
    gradient_checkpointing: bool = opt(False, "recompute activations: less memory, ~20% slower")
    device: str = opt("auto", "auto | cpu | cuda")
    eval_samples: int = opt(64, "eval-loss examples from the eval split (0 = skip)")
    eval_every: int = opt(0, "steps between eval-loss points (0 = once, at the end)")
    early_stop_patience: int = opt(0, "stop after this many evals without a new best (0 = never; needs eval_every)")
    early_stop_min_delta: float = opt(0.0, "eval-loss gain (nats) below which an eval is no improvement")
    restore_best: bool = opt(True, "with eval_every: end with the weights of the best eval loss")
    packing: bool = opt(False, "pack examples into rows of max_length tokens (no attention across them)")
    save_every: int = opt(0, "steps between checkpoints beside the output (0 = none); a rerun resumes")
    log_every: int = opt(10, "steps between loss-curve points")


def run(src, cfg: Config, out: Path, *, data: artifact.Artifact, trust_remote_code: bool = False) -> artifact.Artifact:
    """Train `src` (an hf artifact, a local model dir or a hub id) on the `data` artifact."""
    validate(cfg)
    data = artifact.load(data.path, kind=KIND_DATA)
    model_dir = hf_io.resolve_model(src, trust_remote_code)
    device = examples.pick_device(cfg.device)
    dist.accelerator(cpu=device.type == "cpu")  # joins the process group when launched by accelerate
    parent = src if isinstance(src, artifact.Artifact) else None
    inputs = {"base_model": str(src.path if parent else src), "data_id": data.id,
              "data_sha256": artifact.hash_files([data.path / TRAIN_FILE, data.path / EVAL_FILE]),
              "tokenizer_sha256": hf_io.tokenizer_hash(model_dir)}
    if not parent:  # a dir or hub snapshot: merge checks the adapter goes back onto these very weights
        inputs["base_weights_sha256"] = hf_io.weights_hash(model_dir)
    if trust_remote_code:  # recorded: the base model ran its own code
        inputs["trust_remote_code"] = True

    kind = KIND_ADAPTER if cfg.method in ("qlora", "lora") else KIND_HF
    params = {"config": cfg, "base": inputs["base_model"] if not parent else None}
    aid = artifact.artifact_id(parent.id if parent else None, "train", params, inputs)
    ckpt_dir = checkpoint.root_for(Path(out)) if cfg.save_every else None

    def payload(tmp: Path) -> dict:
        fmt = PromptFormatter(model_dir)
        train = examples.encode(fmt, read_jsonl(data.path / TRAIN_FILE), cfg.max_length, "train.max_length")
        evals = examples.encode(fmt, read_jsonl(data.path / EVAL_FILE), cfg.max_length,
                                "train.max_length")[: cfg.eval_samples]
        loop.seed_everything(cfg.seed)  # adapter init and anything else drawn before the loop
        model, numerics = _load_model(model_dir, cfg, device, trust_remote_code)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if ckpt_dir is not None:
            checkpoint.prepare(ckpt_dir, aid)
        gathered: dict = {}  # FSDP / DeepSpeed: the full weights, gathered on rank 0
        metrics = loop.fit(model, train, evals, cfg, device, fmt.tokenizer.token_to_id("<unk>") or 0,
                           desc=f"train[{cfg.method}]", ckpt_dir=ckpt_dir, full_state=gathered)
        metrics.update(trainable_params=trainable, total_params=total, method=cfg.method,
                       device=str(device), train_examples=len(train), host=host.describe(), numerics=numerics)
        if not dist.is_main():
            return metrics
        if cfg.method in ("qlora", "lora"):
            model.save_pretrained(tmp / ADAPTER_DIR, state_dict=gathered.get("model"))
            _stable_adapter_config(tmp / ADAPTER_DIR / "adapter_config.json")
        else:
            model.save_pretrained(tmp, safe_serialization=True, state_dict=gathered.get("model"))
        hf_io.copy_tokenizer(model_dir, tmp)
        loop.plot_loss(metrics["loss_curve"], tmp / "loss.png", metrics["eval_curve"])
        return metrics

    art = dist.build_on_every_rank(out, payload, kind=kind, stage="train", params=params, parent=parent,
                                   inputs=inputs)
    if ckpt_dir is not None:
        checkpoint.remove(ckpt_dir)
    return art


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
    if min(cfg.eval_every, cfg.early_stop_patience, cfg.save_every, cfg.max_steps) < 0 or cfg.log_every < 1:
        raise UserError("train.eval_every, early_stop_patience, save_every and max_steps must be >= 0, "
                        "train.log_every >= 1")
    if cfg.early_stop_patience and not cfg.eval_every:
        raise UserError("train.early_stop_patience needs train.eval_every > 0 (steps between evals)")
    if cfg.early_stop_patience and not cfg.eval_samples:
        raise UserError("train.early_stop_patience needs eval examples: set train.eval_samples > 0")
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.optim != "adamw" and not cuda:
        raise UserError(f"train.optim={cfg.optim} needs CUDA (bitsandbytes paged/8-bit optimizers); "
                        "use train.optim=adamw on CPU")
    if cfg.compute_dtype == "float16" and not cuda:
        raise UserError("train.compute_dtype=float16 needs CUDA; use float32 or bfloat16 on CPU")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")


def _load_model(model_dir: Path, cfg: Config, device: torch.device, trust_remote_code: bool = False):
    """(model ready to train, the numerics it really computes with: kernel and activation dtype)."""
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[cfg.compute_dtype]
    if cfg.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=hf_io.bnb_config(cfg.quant_type, cfg.double_quant, dtype),
            dtype=dtype, device_map={"": str(device)}, trust_remote_code=trust_remote_code)
        # eval passes too compute in compute_dtype on the weights training sees (never the fused bf16 kernel)
        numerics = nf4.pin_dequantize(model, dtype, device)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code).to(device)
        numerics = {"activation_dtype": "float32"}
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
            return get_peft_model(model, lcfg), numerics
        except ValueError as e:
            raise UserError(f"train.target_modules: {e}") from None
    if cfg.method == "freeze":
        _freeze(model, cfg)
    return model, numerics


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


def _stable_adapter_config(path: Path) -> None:
    """peft writes target_modules from a set (order varies with the hash seed): sort it for identical bytes."""
    cfg = json.loads(path.read_text())
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
