"""export_onnx on the tiny Llama: all four types exported once, compared with PyTorch."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from edgeft import artifact
from edgeft.artifact import Artifact
from edgeft.errors import StageFailure, UserError
from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

PROMPTS = ("Question: What is the torque for the wheel bolts?\nAnswer:", "The pump",
           "Error code E12 means", "Replace the filter every")
N_NEW = 24


def _hf_artifact(root, model_dir) -> Artifact:
    return artifact.build(root / "hf", kind="hf", stage="train", params={}, parent=None,
                          payload=lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True) and {})


@pytest.fixture(scope="module")
def hf(tmp_path_factory, tiny_llama_dir) -> Artifact:
    return _hf_artifact(tmp_path_factory.mktemp("exp"), tiny_llama_dir)


@pytest.fixture(scope="module")
def exported(hf) -> Artifact:
    return ex.run(hf, ex.Config(types=ex.VALID_TYPES), hf.path.parent / "onnx")


@pytest.fixture(scope="module")
def torch_ref(tiny_llama_dir):
    """Prompt ids, torch greedy continuations (HF generate) and teacher-forced logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in PROMPTS:
            ids = tok(text).input_ids
            gen = model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            new = gen[0, len(ids):].tolist()
            if new and new[-1] == tok.eos_token_id:
                new = new[:-1]
            logits = model(torch.tensor([ids + new])).logits[0].numpy()
            out.append((ids, new, logits))
    return out


def test_layout_manifest_and_metrics(exported):
    art = artifact.load(exported.path, kind="onnx")  # verifies every file's sha256
    assert art.stage == ex.STAGE
    assert set(art.metrics["types"]) == set(ex.VALID_TYPES)
    for t in ex.VALID_TYPES:
        d = art.path / t
        for name in (MODEL_FILE, "config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "tokenizer.model", "generation_config.json",
                     "chat_template.jinja"):
            assert (d / name).is_file(), f"{t}/{name} missing"
        m = art.metrics["types"][t]
        assert m["size_bytes"] == (d / MODEL_FILE).stat().st_size
        assert m["export_s"] >= 0 and 0 <= m["top1_agreement"] <= 1
    fp32 = art.metrics["types"]["fp32"]
    assert fp32["greedy_match"] == 1.0 and fp32["greedy_near_tie_flips"] == 0
    assert fp32["max_abs_logit_diff"] < 1e-4
    assert not any(p.name.startswith(".") for p in art.path.iterdir())  # temp base removed
    sizes = {t: art.metrics["types"][t]["size_bytes"] for t in ex.VALID_TYPES}
    assert sizes["int4"] < sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_fp32_greedy_and_logits_match_torch(exported, torch_ref):
    rt = OnnxRuntime(exported.path / "fp32")
    worst = 0.0
    for ids, new, ref_logits in torch_ref:
        assert rt.generate(ids, N_NEW).tokens == new
        worst = max(worst, float(np.abs(rt.logits(ids + new) - ref_logits).max()))
    assert worst < 1e-4, worst  # observed about 1e-5 (logits of magnitude ~5)
    rt.close()


def _top1_agreement(model_dir, torch_ref) -> float:
    rt = OnnxRuntime(model_dir)
    hits = [rt.logits(ids + new).argmax(-1) == ref.argmax(-1) for ids, new, ref in torch_ref]
    rt.close()
    return float(np.concatenate(hits).mean())


def test_int8_top1_agreement(exported, torch_ref):
    agree = _top1_agreement(exported.path / "int8", torch_ref)
    # random weights give flat logits, the worst case for agreement: observed 0.83-0.86
    assert agree >= 0.7, agree


def test_fp16_and_int4_load_and_generate(exported, torch_ref):
    import onnx

    ops = {t: {n.op_type for n in onnx.load(str(exported.path / t / MODEL_FILE)).graph.node}
           for t in ("int8", "int4")}
    assert "MatMulNBits" in ops["int4"] and "MatMulInteger" in ops["int8"]
    ids = torch_ref[0][0]
    for t in ("fp16", "int4"):
        rt = OnnxRuntime(exported.path / t)
        res = rt.generate(ids, 8)
        assert len(res.tokens) == 8 or res.stopped_at_eos
        assert res.ttft_s > 0 and res.prompt_tokens == len(ids)
        assert rt.logits(ids).dtype == np.float32
        rt.close()
    assert _top1_agreement(exported.path / "fp16", torch_ref) >= 0.95  # observed 0.99
    assert _top1_agreement(exported.path / "int4", torch_ref) >= 0.3  # observed ~0.5, = torch RTN


def test_wrong_kind_is_user_error(tmp_path):
    not_hf = Artifact(tmp_path, {"id": "0", "kind": "gguf", "stage": "export_gguf"})
    with pytest.raises(UserError, match="needs an 'hf' artifact"):
        ex.run(not_hf, ex.Config(), tmp_path / "out")


def test_unsupported_architecture_is_user_error(tmp_path, tiny_llama_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    src = _hf_artifact(tmp_path, model)
    with pytest.raises(UserError, match="'gpt2' is not supported.*llama"):
        ex.run(src, ex.Config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("types", [("fp32", "int3"), (), "int8"])
def test_bad_types_are_user_errors(hf, tmp_path, types):
    with pytest.raises(UserError, match="export_onnx.types"):
        ex.run(hf, ex.Config(types=types), tmp_path / "out")


def test_bad_int4_block_is_user_error(hf, tmp_path):
    with pytest.raises(UserError, match="int4_block_size"):
        ex.run(hf, ex.Config(types=("int4",), int4_block_size=24), tmp_path / "out")


def test_rerun_with_same_params_is_skipped(hf, exported, tmp_path):
    again = ex.run(hf, ex.Config(types=ex.VALID_TYPES), exported.path)
    assert again.id == exported.id and again.manifest["created"] == exported.manifest["created"]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an edgeft artifact"):
        ex.run(hf, ex.Config(), stray)


def test_parity_gate_fails_on_real_mismatch_and_tolerates_near_tie(exported, torch_ref):
    """The gate itself, fed doctored torch references: a decisive flip fails, a near-tie is counted."""
    ids, new, logits = torch_ref[1]
    row = len(ids) - 1  # chooses the first new token
    logits = logits[: len(ids) + 1]  # the doctored references continue by one token
    other = (new[0] + 1) % logits.shape[1]

    decisive = logits.copy()
    decisive[row, other] = decisive[row].max() + 5.0
    ref = ex._Reference(ids, [other], decisive)
    with pytest.raises(StageFailure, match="not a near-tie"):
        ex._parity(exported.path / "fp32", [ref], "fp32", 1)

    tie = logits.copy()
    tie[row, other] = tie[row].max() + 1e-6  # inside the export's ~1e-5 error
    ref = ex._Reference(ids, [other], tie)
    metrics = ex._parity(exported.path / "fp32", [ref], "fp32", 1)
    assert metrics["greedy_near_tie_flips"] == 1 and metrics["greedy_match"] == 0.0

    assert ex._parity(exported.path / "int8", [ex._Reference(ids, [other], decisive)], "int8",
                      1)["greedy_match"] == 0.0  # quantized types record, never fail


def test_config_is_frozen_and_documented():
    cfg = ex.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.types = ("fp32",)  # type: ignore[misc]
    assert cfg.types == ("fp32", "int8") and set(cfg.types) <= set(ex.VALID_TYPES)


def test_derived_types_only_with_external_data(hf, monkeypatch):
    """Without fp32 in types the gate still runs on a temporary base; large graphs use external data."""
    monkeypatch.setattr(ex, "_PROTOBUF_LIMIT", 16)  # every derived graph counts as large
    types = ("fp16", "int8", "int4")
    art = ex.run(hf, ex.Config(types=types), hf.path.parent / "derived")
    assert sorted(p.name for p in art.path.iterdir() if p.is_dir()) == sorted(types)
    assert art.metrics["fp32_gate"]["greedy_match"] == 1.0 and set(art.metrics["types"]) == set(types)
    artifact.load(art.path, kind="onnx")  # external data files are hashed like the rest
    for t in types:
        data = list((art.path / t).glob(MODEL_FILE + "?*"))  # model.onnx_data / model.onnx.data
        assert data, f"{t}: no external data file"
        rt = OnnxRuntime(art.path / t)
        assert rt.size_bytes == art.metrics["types"][t]["size_bytes"] > sum(p.stat().st_size for p in data)
        res = rt.generate([1, 40, 41], 4)
        assert len(res.tokens) == 4 or res.stopped_at_eos
        rt.close()
