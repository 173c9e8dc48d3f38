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
from edgeft.onnx import parity as onnx_parity
from edgeft.runtime.onnx import MODEL_FILE, OnnxRuntime
from edgeft.stages import export_onnx as ex

from conftest import N_NEW, NO_MIN, _hf_artifact  # the ONNX export fixtures (hf, exported, torch_ref) live there


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
        assert m["export_s"] >= 0 and 0 <= m["top1_agreement"] <= 1 and m["kld"] >= 0
        for name in ("tokenizer.json", "tokenizer_config.json"):  # the hf artifact's own, byte for byte
            assert (d / name).read_bytes() == (art.path.parent / "hf" / name).read_bytes()
    fp32 = art.metrics["types"]["fp32"]
    assert _greedy_ok(fp32) and fp32["kld"] < 1e-6 and fp32["greedy_match"] >= 0.75
    assert art.metrics["route"]["route"] == "optimum" and art.metrics["tokenizer_prompts_checked"] == 4
    tok = art.metrics["tokenizer"]
    assert tok["prompts_checked"] == 4 and tok["chat_template"] and tok["eos_ids"] == [2]  # the tiny tokenizer's </s>
    assert art.metrics["types"]["int4"]["quant"] == {"algo": "rtn", "block_size": 32, "symmetric": True,
                                                     "accuracy_level": 4, "matmulnbits_nodes": 15,
                                                     "embeddings": "int4 rtn (1 GatherBlockQuantized)"}
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


def _greedy_ok(gate: dict) -> bool:
    """The fp32 gate fails on a decisive greedy flip; one at a near-tie (ISA summation order) is counted."""
    return gate["greedy_match"] == 1.0 or gate["greedy_near_tie_flips"] > 0


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
    assert "MatMulNBits" in ops["int4"] and "MatMulNBits" in ops["int8"] and "MatMulInteger" not in ops["int8"]
    assert "GatherBlockQuantized" in ops["int4"]  # the token embedding too (int4_embeddings)
    assert exported.metrics["types"]["int4"]["quant"]["embeddings"].startswith("int4 rtn")
    ids = torch_ref[0][0]
    for t in ("fp16", "int4"):
        rt = OnnxRuntime(exported.path / t)
        res = rt.generate(ids, 8)
        assert len(res.tokens) == 8 or res.stopped_at_eos
        assert res.ttft_s > 0 and res.prompt_tokens == len(ids)
        assert rt.logits(ids).dtype == np.float32
        rt.close()
    assert _top1_agreement(exported.path / "fp16", torch_ref) >= 0.95  # observed 0.99


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
    with pytest.raises(UserError, match="'gpt2' is not supported.*route=optimum; supported: llama, mistral"):
        ex.run(src, ex.Config(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("types", [("fp32", "int3"), (), "int8"])
def test_bad_types_are_user_errors(hf, tmp_path, types):
    with pytest.raises(UserError, match="export_onnx.types"):
        ex.run(hf, ex.Config(types=types), tmp_path / "out")


@pytest.mark.parametrize("bad, key", [
    ({"types": ("int4",), "int4_block_size": 24}, "int4_block_size"),
    ({"int8_block_size": 8}, "int8_block_size"),
    ({"int8_accuracy_level": 2}, "int8_accuracy_level"),
    ({"route": "olive"}, "route"),
    ({"int4_algo": "gptq"}, "int4_algo"),
    ({"route": "genai", "int4_algo": "hqq", "types": ("int4",)}, "int4_algo"),
    ({"route": "genai", "types": ("fp32", "int8")}, "route=genai"),
    ({"min_top1_int4": 95}, "min_top1_int4"),
    ({"parity_samples": -1}, "parity_samples"),
])
def test_bad_config_values_are_user_errors(hf, tmp_path, bad, key):
    with pytest.raises(UserError, match=key):
        ex.run(hf, ex.Config(**bad), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rerun_with_same_params_is_skipped(hf, exported, tmp_path):
    again = ex.run(hf, ex.Config(types=ex.VALID_TYPES, **NO_MIN), exported.path)
    assert again.id == exported.id and again.manifest["created"] == exported.manifest["created"]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an edgeft artifact"):
        ex.run(hf, ex.Config(), stray)


def _gate(model_dir, refs, torch_logits, type_name, min_top1=0.0):
    rt = OnnxRuntime(model_dir)
    try:
        return onnx_parity.gate(rt, refs, torch_logits, type_name, len(refs[0].tokens), min_top1, model_dir)
    finally:
        rt.close()


def _doctored(logits):
    """A stand-in for torch that returns `logits` (rows of the one sequence the doctored reference holds)."""
    return lambda seq: logits[:len(seq)]


def test_parity_gate_fails_on_real_mismatch_and_tolerates_near_tie(exported, torch_ref):
    """The gate itself, fed doctored torch references: a decisive flip fails, a near-tie is counted."""
    ids, new, logits = torch_ref[1]
    row = len(ids) - 1  # chooses the first new token
    logits = logits[: len(ids) + 1]  # the doctored references continue by one token
    other = (new[0] + 1) % logits.shape[1]

    decisive = logits.copy()
    decisive[row, other] = decisive[row].max() + 5.0
    ref = onnx_parity.Reference.from_logits("t", ids, [other], decisive)
    with pytest.raises(StageFailure, match="differ from PyTorch on parity prompt t at new token 0.*not a near-tie"):
        _gate(exported.path / "fp32", [ref], _doctored(decisive), "fp32")

    tie = logits.copy()
    tie[row, other] = tie[row].max() + 1e-6  # inside the export's ~1e-5 error
    metrics = _gate(exported.path / "fp32", [onnx_parity.Reference.from_logits("t", ids, [other], tie)],
                    _doctored(tie), "fp32")
    assert metrics["greedy_near_tie_flips"] == 1 and metrics["greedy_match"] == 0.0

    assert _gate(exported.path / "int8", [ref], _doctored(decisive), "int8")["greedy_match"] == 0.0  # recorded


def test_quantized_gate_fails_below_its_minimum_with_diagnosis(exported, torch_ref):
    refs = [onnx_parity.Reference.from_logits(f"p{i}", ids, new, logits) for i, (ids, new, logits) in enumerate(torch_ref)]
    by_seq = {tuple(ids + new): logits for ids, new, logits in torch_ref}
    got = _gate(exported.path / "int4", refs, lambda seq: by_seq[tuple(seq)], "int4")
    assert 0 < got["top1_agreement"] < 0.9 and got["kld"] > 0  # random weights: observed ~0.5
    assert got["top1_lower95"] < got["top1_agreement"] and got["prompts"] == 4
    assert got["positions"] == sum(len(new) + 1 for _, new, _ in torch_ref)
    with pytest.raises(StageFailure, match=r"int4 teacher-forced top-1 agreement with PyTorch is 0\.\d+ < 0\.95 "
                                           r"over \d+ positions of 4 prompts \(95% lower bound 0\.\d+; mean KL .* "
                                           r"worst prompt p\d.*raise export_onnx\.parity_samples"):
        _gate(exported.path / "int4", refs, lambda seq: by_seq[tuple(seq)], "int4", min_top1=0.95)
    # the same minimum the export applies: a failing type fails the whole export, nothing left behind
    hf_dir = exported.path.parent / "hf"
    src = artifact.load(hf_dir, kind="hf")
    out = exported.path.parent / "gated"
    with pytest.raises(StageFailure, match="int8 teacher-forced top-1 agreement"):
        ex.run(src, ex.Config(types=("int8",), min_top1_int8=0.99), out)
    assert not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(".tmp")]


def test_tokenizer_check_names_prompt_and_position():
    p = onnx_parity.Prompt("eval:7", [1, 5, 6, 7], "Question: x")
    assert onnx_parity.check_tokenizer([p], lambda q: list(q.ids), "dev") == 1
    with pytest.raises(StageFailure, match=r"dev tokenizer differs .* prompt eval:7 .* at id 2: HF \[1, 5, 6, 7\] vs dev \[1, 5, 9, 7\]"):
        onnx_parity.check_tokenizer([p], lambda q: [1, 5, 9, 7], "dev")


def test_tokenizer_check_refuses_a_runtime_that_would_not_stop_at_the_tokenizers_eos(exported):
    class StopsElsewhere:
        eos_ids = frozenset({7})

    with pytest.raises(StageFailure, match=r"EOS '</s>' \(id 2\) is not among the ids the runtime stops on \[7\]"):
        ex._check_tokenizers(exported.path / "fp32", [], StopsElsewhere())


def test_eval_prompts_from_lineage_are_all_checked(tmp_path, tiny_llama_dir):
    """An hf artifact whose lineage names a data artifact: every eval prompt is tokenizer- and greedy-checked."""
    from edgeft.constants import EVAL_FILE

    recs = [{"messages": [{"role": "user", "content": f"What is the torque for bolt {i}?"},
                          {"role": "assistant", "content": f"{10 + i} Nm."}]} for i in range(5)]
    data = artifact.build(tmp_path / "data", kind="data", stage="data", params={}, parent=None,
                          payload=lambda d: (d / EVAL_FILE).write_text(
                              "".join(json.dumps(r) + "\n" for r in recs)) and {})
    hf = artifact.build(tmp_path / "hf", kind="hf", stage="train", params={}, parent=None,
                        inputs={"data_id": data.id},
                        payload=lambda d: shutil.copytree(tiny_llama_dir, d, dirs_exist_ok=True) and {})
    assert ex._find_data(hf).id == data.id
    art = ex.run(hf, ex.Config(types=("fp32",), parity_samples=3, parity_new_tokens=4), tmp_path / "onnx")
    m = art.metrics
    # every prompt's tokenization; a sample of 3 eval prompts (plus the 3 fixed texts) through the model
    assert m["tokenizer_prompts_checked"] == 8 and m["parity_eval_available"] == 5
    assert m["parity_samples"] == 3 and m["parity_eval_prompts"] == 3 and m["parity_prompts"] == 6
    fp32 = m["types"]["fp32"]
    assert _greedy_ok(fp32) and fp32["prompts"] == 6 and fp32["positions"] == m["parity_positions"] >= 6
    assert fp32["top1_lower95"] <= fp32["top1_agreement"] and "Wilson" in m["parity_confidence"]
    assert art.manifest["inputs"]["parity_data"] == data.id


def test_config_is_frozen_and_documented():
    cfg = ex.Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.types = ("fp32",)  # type: ignore[misc]
    assert cfg.types == ("fp32", "int8") and set(cfg.types) <= set(ex.VALID_TYPES)


def test_derived_types_only_with_external_data(hf, monkeypatch):
    """Without fp32 in types the gate still runs on a temporary base; large graphs use external data."""
    monkeypatch.setattr(ex, "_PROTOBUF_LIMIT", 16)  # every derived graph counts as large
    types = ("fp16", "int8", "int4")
    art = ex.run(hf, ex.Config(types=types, **NO_MIN), hf.path.parent / "derived")
    assert sorted(p.name for p in art.path.iterdir() if p.is_dir()) == sorted(types)
    assert _greedy_ok(art.metrics["fp32_gate"]) and set(art.metrics["types"]) == set(types)
    artifact.load(art.path, kind="onnx")  # external data files are hashed like the rest
    for t in types:
        data = list((art.path / t).glob(MODEL_FILE + "?*"))  # model.onnx_data / model.onnx.data
        assert data, f"{t}: no external data file"
        rt = OnnxRuntime(art.path / t)
        assert rt.size_bytes == art.metrics["types"][t]["size_bytes"] > sum(p.stat().st_size for p in data)
        res = rt.generate([1, 40, 41], 4)
        assert len(res.tokens) == 4 or res.stopped_at_eos
        rt.close()


def test_check_graph_rejects_corrupt_and_unopenable_models(exported, tmp_path):
    from edgeft.onnx import quant as onnx_quant

    onnx_quant.check_graph(exported.path / "int4")  # checker by path + an onnxruntime session
    bad = tmp_path / "bad"
    shutil.copytree(exported.path / "int8", bad)
    data = (bad / MODEL_FILE).read_bytes()
    (bad / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(StageFailure, match=f"{MODEL_FILE}: (fails onnx.checker|onnxruntime cannot open it)"):
        onnx_quant.check_graph(bad)


def test_torch_references_catch_a_runtime_that_strays_from_torch_greedy(exported, torch_ref, tiny_llama_dir):
    """One torch pass verifies the fp32 runtime's greedy proposal; a token torch would not pick fails the gate."""
    ids, new, _ = torch_ref[0]
    prompt = onnx_parity.Prompt("text:x", ids, "")

    class Strays:  # the fp32 runtime, except that its 2nd greedy token is replaced
        def __init__(self):
            self.rt = OnnxRuntime(exported.path / "fp32")
            self.eos_ids = self.rt.eos_ids

        def generate(self, prompt_ids, n):
            res = self.rt.generate(prompt_ids, n)
            toks = list(res.tokens)
            toks[1] = (toks[1] + 7) % 384
            return dataclasses.replace(res, tokens=toks)

        def logits(self, seq):
            return self.rt.logits(seq)

    liar = Strays()
    with onnx_parity.TorchModel(tiny_llama_dir) as torch_model:
        honest = onnx_parity.torch_references(torch_model, [prompt], liar.rt, N_NEW)[0]
        assert honest.tokens == new and honest.top2_ids.shape == (len(new) + 1, 2)
        assert [int(r[0]) for r in honest.top2_ids[:-1]] == new  # torch's best on each row is its greedy token
        ref = onnx_parity.torch_references(torch_model, [prompt], liar, 16)[0]
        assert ref.tokens == new[:2]  # torch's own 2nd token ends the reference
        with pytest.raises(StageFailure, match="parity prompt text:x at new token 1: torch .* not a near-tie"):
            onnx_parity.gate(liar, [ref], torch_model.logits, "fp32", 16, 0.0, exported.path / "fp32")


def test_fp16_keeps_norms_fp32_when_the_residual_stream_overflows_fp16_squares(tmp_path, tiny_llama_dir):
    """|x| of a few hundred in the residual stream: x**2 past 65504 must not pass through fp16 (it did: inf)."""
    import onnx
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(400.0 / emb.abs().max())  # every token enters the residual stream with |x| up to 400
    big = tmp_path / "big"
    model.save_pretrained(big)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, big / f.name)
    src = _hf_artifact(tmp_path, big)
    art = ex.run(src, ex.Config(types=("fp32", "fp16"), **NO_MIN), tmp_path / "onnx")
    graph = onnx.load(str(art.path / "fp16" / MODEL_FILE)).graph
    producers = {o: n for n in graph.node for o in n.output}
    for n in graph.node:
        if n.op_type == "ReduceMean" and "norm" in n.name:  # the mean of squares reads the Pow directly
            assert producers[n.input[0]].op_type == "Pow", n.name
    ids = list(range(3, 40))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert float(np.abs(ref).max()) > 1.0
    half = OnnxRuntime(art.path / "fp16").logits(ids)
    assert np.isfinite(half).all()
    assert float((half.argmax(-1) == ref.argmax(-1)).mean()) >= 0.95  # 0.16 before norms stayed fp32
    assert art.metrics["types"]["fp16"]["top1_agreement"] >= 0.95
