"""The embedded default base model: a tokenizer and a small Llama pretrained on the bundled manual.

Built once per config and cached (an `hf` artifact under EDGEFT_HOME), so `make demo` pays for it
on the first run only. Pretraining sees the manual prose alone: mixing the QA pairs in halves the
passes over the prose and was measured to hurt recall after fine-tuning.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgeft import artifact
from edgeft.config import opt
from edgeft.constants import KIND_DATA, KIND_HF, MANUAL_FILE, TRAIN_FILE
from edgeft.records import read_jsonl


@dataclass(frozen=True)
class Config:
    vocab_size: int = opt(1024, "SentencePiece BPE pieces")
    hidden_size: int = opt(256, "multiple of 256: K-quant rows stay whole")
    intermediate_size: int = opt(768, "multiple of 256, distinct from vocab_size")
    num_layers: int = opt(4, "decoder blocks")
    num_heads: int = opt(4, "attention (query) heads per block")
    num_kv_heads: int = opt(2, "GQA, as real small models use")
    max_position: int = opt(512, "context length, tokens")
    seq_len: int = opt(128, "pretraining window, tokens")
    batch_size: int = opt(16, "pretraining windows per optimizer step")
    steps: int = opt(450, "pretraining optimizer steps (~3 minutes on 2 cores)")
    lr: float = opt(3e-3, "peak learning rate; cosine decay to 10%")
    seed: int = opt(0, "seed for the tokenizer, weight init and window sampling")


def cache_dir() -> Path:
    """Where built base models live (EDGEFT_HOME, default ~/.cache/edgeft)."""
    return Path(os.environ.get("EDGEFT_HOME", Path.home() / ".cache" / "edgeft"))


def ensure(data: artifact.Artifact, cfg: Config = Config()) -> artifact.Artifact:
    """The cached base for this data and config, built (a few minutes) if missing."""
    key = artifact.artifact_id(data.id, "pretrain", cfg)
    return run(data, cfg, cache_dir() / f"base-{key}")


def run(src: artifact.Artifact, cfg: Config, out: Path) -> artifact.Artifact:
    """Train the tokenizer on the manual + questions, then pretrain a small Llama on the manual."""
    src = artifact.load(src.path, kind=KIND_DATA)

    def payload(tmp: Path) -> dict:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from edgeft.demo.tokenizer import train_tokenizer
        from edgeft.runtime.prompt import PromptFormatter

        manual = (src.path / MANUAL_FILE).read_text()
        questions = [m["content"] for r in read_jsonl(src.path / TRAIN_FILE) for m in r["messages"]]
        train_tokenizer(manual.splitlines() + questions, cfg.vocab_size, tmp, cfg.seed)
        fmt = PromptFormatter(tmp)
        ids = torch.tensor(fmt.tokenizer.encode(manual, add_special_tokens=False).ids)
        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=fmt.tokenizer.get_vocab_size(), hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
            max_position_embeddings=cfg.max_position, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=fmt.bos_id, eos_token_id=fmt.eos_id, pad_token_id=0, tie_word_embeddings=False))
        loss = _pretrain(model, ids, fmt.bos_id, cfg)
        model.save_pretrained(tmp, safe_serialization=True)
        model.generation_config.save_pretrained(tmp)
        return {"params": sum(p.numel() for p in model.parameters()), "manual_tokens": len(ids),
                "pretrain_loss": loss, "steps": cfg.steps}

    return artifact.build(out, kind=KIND_HF, stage="pretrain", params=cfg, parent=src, payload=payload,
                          inputs={"manual_sha256": artifact.sha256_file(src.path / MANUAL_FILE)})


def _pretrain(model, ids, bos_id: int, cfg: Config) -> float:
    import torch
    from tqdm import tqdm

    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else
                                              0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / (cfg.steps - warm))))
    n = cfg.seq_len - 1
    model.train()
    t0, ema = time.time(), None
    bar = tqdm(range(cfg.steps), desc="pretrain", unit="step", mininterval=1.0, dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, len(ids) - n, (cfg.batch_size,), generator=g)
        x = torch.stack([torch.cat([torch.tensor([bos_id]), ids[s:s + n]]) for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{(bar.n + 1) * x.numel() / (time.time() - t0):.0f}")
    return round(ema, 4)
