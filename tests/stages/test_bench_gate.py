"""The bench's accuracy gate on a trained model: a variant that loses accuracy is refused, a faithful one taken.

Everywhere else the gate runs with accuracy_budget=0: random weights answer nothing, so no budget means
anything there. Here the tiny Llama is fine-tuned for a few seconds on the embedded manual data until its
answers share words with the references (rouge_l 0.21 on 16 eval prompts), and benched with a real budget
beside two GGUF variants: the same weights in F32 (faithful), and a copy with noise added to every matrix,
written as F16 (half the bytes: the smallest-first rule would take it if the gate did not refuse it).
Measured: F32 keeps 100% of the tuned rouge_l (the same greedy answers), the noisy F16 37%; the budget is
the tiny profile's 90%.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeft import artifact
from edgeft.bench.harness import Config as BenchConfig
from edgeft.constants import KIND_GGUF, REPORT_JSON, REPORT_MD
from edgeft.errors import UserError

BUDGET = 0.9  # the tiny profile's accuracy_budget


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 4 s of training alone; 100 s with two spinning threads on a busy 2-core box
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama after 40 full fine-tuning steps on the embedded train split, and the data."""
    from edgeft.stages import data, train

    root = tmp_path_factory.mktemp("gate")
    d = data.run(None, data.Config(), root / "data")
    tuned = train.run(str(tiny_llama_dir), train.Config(method="full", max_steps=40, batch_size=16, lr=3e-3,
                                                        max_length=64, eval_samples=0, log_every=20),
                      root / "train", data=d)
    return tuned, d


def _gguf_artifact(out: Path, model_dir: Path, out_type: str, parent) -> artifact.Artifact:
    """An export_gguf-like artifact holding one file (no parity gate: the degraded one would fail it)."""
    from edgeft.gguf import writer as gguf_writer

    def payload(staging: Path) -> dict:
        name = f"model-{out_type}.gguf"
        gguf_writer.convert(model_dir, staging / name, out_type)
        return {"files": {out_type: {"file": name}}}

    return artifact.build(out, kind=KIND_GGUF, stage="export_gguf", params={"types": [out_type], "src": str(model_dir)},
                          parent=parent, payload=payload)


def _degraded_copy(model_dir: Path, out: Path, noise: float) -> Path:
    """`model_dir` with Gaussian noise of `noise` times each matrix's std added (fixed seed)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * noise * p.std())
    model.save_pretrained(out, safe_serialization=True)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def gated(trained, tmp_path_factory):
    """The bench stage on the trained model with a real accuracy budget: its records and artifact."""
    from edgeft.stages import bench

    tuned, d = trained
    root = tmp_path_factory.mktemp("gated")
    good = _gguf_artifact(root / "good", tuned.path, "f32", tuned)
    bad = _gguf_artifact(root / "bad", _degraded_copy(tuned.path, root / "noisy", 0.5), "f16", tuned)
    cfg = BenchConfig(max_samples=16, max_new_tokens=16, threads=1, n_ctx=128, warmup=0, repeats=1,
                      prompt_lengths=(8, 16), decode_tokens=4, ppl_tokens=0, kv_cache_type="f32",
                      accuracy_budget=BUDGET, memory_budget_gb=2.0)
    art = bench.run(tuned, cfg, root / "bench", data=d, exports=[good, bad])
    records = {r["name"]: r for r in json.loads((art.path / REPORT_JSON).read_text())}
    return art, records, cfg


def test_gate_refuses_the_degraded_variant_and_takes_the_faithful_one(gated):
    art, by, cfg = gated
    assert set(by) == {"tuned", "gguf-f32", "gguf-f16"}
    ref = by["tuned"]["rouge_l"]
    assert ref > 0.15, by["tuned"]  # the model learned something the gate can keep (measured 0.21)
    good, bad = by["gguf-f32"], by["gguf-f16"]
    # the measurements the gate acts on, checked against the budget by hand
    assert good["rouge_l"] >= BUDGET * ref, (good["rouge_l"], ref)  # same weights: same answers
    assert bad["rouge_l"] < BUDGET * ref, (bad["rouge_l"], ref)
    assert bad["size_bytes"] < good["size_bytes"]  # smallest first would have taken the degraded one
    assert art.metrics["selected"] == "gguf-f32"
    md = (art.path / REPORT_MD).read_text()
    assert f"**Selected:** gguf-f32 ({good['size_bytes']} bytes): keeps {good['rouge_l'] / ref:.1%}" in md


def test_without_the_budget_the_smaller_degraded_variant_wins(gated):
    """The refusal above is the accuracy budget's doing: with it at 0 the same records give the F16 file."""
    from edgeft.stages import bench

    _, by, cfg = gated
    name, _ = bench.selection(list(by.values()), dataclasses.replace(cfg, accuracy_budget=0.0))
    assert name == "gguf-f16"


def test_only_the_degraded_variant_is_a_closest_miss_naming_the_shortfall(gated):
    from edgeft.bench.select import select

    _, by, cfg = gated
    records = [by["tuned"], by["gguf-f16"]]
    need = BUDGET * by["tuned"]["rouge_l"]
    with pytest.raises(UserError, match=rf"closest miss gguf-f16: rouge_l {by['gguf-f16']['rouge_l']:.4f} < "
                                        rf"{need:.4f} needed \(90% of tuned"):
        select(records, cfg)
