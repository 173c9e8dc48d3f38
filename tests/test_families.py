"""The small-model families users pick, through the chain: train (LoRA) -> merge -> prune -> distill ->
export_gguf (f16, q8_0) -> export_onnx (fp32), each stage's own gates on, on tiny random-weight configs with
each family's quirks (conftest.build_family): llama (SmolLM2, Llama 3.2), qwen2 (biases), qwen3 (q/k norms,
head_dim != hidden / heads), gemma3_text (Gemma 3 270M/1B: sliding-window + global layers, q/k norms,
pre/post norms, 1 + w norms, scaled tied embeddings, no chat template).

Stage outputs share one run dir per family (as the pipeline lays them out), so the export gates find the
eval split through the lineage. `make test` runs train, merge and both exports of every family; prune ->
distill -> export of the shrunk model is marked slow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FAMILIES, _hf_artifact

from edgeft.errors import UserError
from edgeft.stages import data, distill, export_gguf, export_onnx, merge, prune, train

TRAIN = train.Config(method="lora", max_steps=3, batch_size=4, lr=3e-3, max_length=64, lora_r=4, lora_alpha=8,
                     eval_samples=4, log_every=1)
# random weights give flat logits: q8_0 agrees on ~0.95 of the eval tokens, under its 0.99 bar (that bar is
# tested in tests/stages/test_export_gguf.py); the f16 gate (logits and decisive greedy tokens) stays on
GGUF = export_gguf.Config(types=("f16", "q8_0"), threads=2, parity_samples=4, min_top1_q8_0=0.0)
ONNX = export_onnx.Config(types=("fp32",), parity_new_tokens=8, parity_samples=2)
PRUNE = prune.Config(kv_groups=1, intermediate_size=256, calib_samples=8, max_length=64, dtype="float32")
DISTILL = distill.Config(max_steps=3, batch_size=4, lr=3e-3, max_length=64, eval_samples=4, log_every=1,
                         dtype="float32")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, family_dirs, tiny_qa_jsonl):
    """family -> its run dir with data/, train/ and merge/ built once (the fast tests' shared prefix)."""
    done: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in done:
            run = tmp_path_factory.mktemp(f"run-{family}")
            d = data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), run / "data")
            adapter = train.run(str(family_dirs(family)), TRAIN, run / "train", data=d)
            done[family] = {"run": run, "data": d, "train": adapter,
                            "merge": merge.run(adapter, merge.Config(dtype="float32"), run / "merge")}
        return done[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_and_merges_with_the_merge_check(runs, family):
    r = runs(family)
    curve = r["train"].metrics["loss_curve"]
    assert r["train"].kind == "adapter" and len(curve) == TRAIN.max_steps
    m = r["merge"]
    assert m.kind == "hf" and m.metrics["merge_max_abs_diff"] <= 1e-4
    cfg = json.loads((m.path / "config.json").read_text())
    assert cfg["model_type"] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_exports_to_gguf_f16_and_q8_0_through_the_gate(runs, family):
    r = runs(family)
    art = export_gguf.run(r["merge"], GGUF, r["run"] / "export_gguf")
    files = art.metrics["files"]
    assert set(files) == {"f16", "q8_0"}
    gate = art.metrics["parity"]
    assert gate["eval_prompts"] > 0  # the eval split, found through the lineage, was checked too
    f16 = gate["files"]["f16"]
    assert f16["rel_logit_diff"] < 0.02 and not f16["decisive_mismatches"], f16
    print(family, {t: (round(v["rel_logit_diff"], 5), round(v["top1_agreement"], 3))
                   for t, v in gate["files"].items()})


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_model_exports_to_onnx_fp32_through_the_gate(runs, family):
    r = runs(family)
    art = export_onnx.run(r["merge"], ONNX, r["run"] / "export_onnx")
    fp32 = art.metrics["types"]["fp32"]
    print(family, {k: fp32[k] for k in ("greedy_match", "top1_agreement", "max_abs_logit_diff")})
    assert fp32["greedy_match"] == 1.0 and fp32["max_abs_logit_diff"] < 1e-3, fp32
    assert art.metrics["parity_eval_prompts"] > 0
    assert art.manifest["inputs"]["model_type"] == family


@pytest.mark.slow  # calibration, a distillation run and two more exports per family: ~1 min for the four
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_and_distilled_model_exports_to_gguf_and_onnx(runs, family):
    r = runs(family)
    small = prune.run(r["merge"], PRUNE, r["run"] / "prune", data=r["data"])
    assert small.metrics["params_after"] < small.metrics["params_before"]
    student = distill.run(small, DISTILL, r["run"] / "distill", data=r["data"], teacher=r["merge"])
    assert student.metrics["student_params"] < student.metrics["teacher_params"]
    cfg = json.loads((student.path / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"], cfg["model_type"]) == (1, 256, family)
    gg = export_gguf.run(student, GGUF, r["run"] / "export_gguf-small")
    assert not gg.metrics["parity"]["files"]["f16"]["decisive_mismatches"]
    ox = export_onnx.run(student, ONNX, r["run"] / "export_onnx-small")
    assert ox.metrics["types"]["fp32"]["greedy_match"] == 1.0


def _made_up(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(model_type="tinymadeup", architectures=["TinyMadeUpForCausalLM"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("stage", ["export_gguf", "export_onnx", "prune"])
def test_an_unsupported_family_is_refused_by_each_converter_in_one_line_with_the_list(
        family_dirs, tiny_qa_jsonl, tmp_path, stage):
    src = _hf_artifact(tmp_path, _made_up(family_dirs("llama"), tmp_path / "model"))
    out = tmp_path / "out"
    if stage == "export_gguf":
        call, supported = lambda: export_gguf.run(src, GGUF, out), "LlamaForCausalLM, MistralForCausalLM"
    elif stage == "export_onnx":
        call, supported = lambda: export_onnx.run(src, ONNX, out), "llama, mistral, qwen2, qwen3"
    else:
        d = data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), tmp_path / "data")
        call, supported = lambda: prune.run(src, PRUNE, out, data=d), "llama, mistral, qwen2, qwen3, gemma3_text"
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and "TinyMadeUp".lower() in message.lower() and supported in message, message
    assert not out.exists() and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())
