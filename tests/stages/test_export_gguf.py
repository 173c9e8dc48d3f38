"""The export_gguf stage on a tiny hf artifact: files, manifest, metrics, the parity gate and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeft import artifact
from edgeft.constants import KIND_GGUF, MANIFEST_NAME, TMP_PREFIX
from edgeft.errors import StageFailure, UserError
from edgeft.gguf import parity as gguf_parity
from edgeft.gguf import writer as gguf_writer
from edgeft.stages import export_gguf


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: extra threads only spin on a busy 2-core box
    yield
    torch.set_num_threads(threads)


def _hf_artifact(model_dir: Path, out: Path) -> artifact.Artifact:
    return artifact.build(out, kind="hf", stage="train", params={"src": str(model_dir)}, parent=None,
                          payload=lambda d: shutil.copytree(model_dir, d, dirs_exist_ok=True) and {})


@pytest.fixture(scope="module")
def hf_art(tiny_llama_dir, tmp_path_factory) -> artifact.Artifact:
    return _hf_artifact(tiny_llama_dir, tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module")
def exported(hf_art, tmp_path_factory) -> artifact.Artifact:
    return export_gguf.run(hf_art, export_gguf.Config(), tmp_path_factory.mktemp("out") / "gguf")


def test_default_export_files_manifest_and_metrics(exported, hf_art):
    art = artifact.load(exported.path, kind=KIND_GGUF)  # every file hash verified
    assert art.stage == "export_gguf" and art.manifest["parent"]["id"] == hf_art.id
    assert art.manifest["params"] == {"types": ["f16", "q8_0", "q4_k_m"], "threads": 2, "imatrix": False,
                                     "imatrix_samples": 256, "adapter": False, "parity_samples": 64,
                                     "min_top1_q8_0": 0.99, "min_top1_quant": 0.95}
    names = {p.name for p in art.path.iterdir()}
    assert {"model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf", MANIFEST_NAME} <= names
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json", "config.json"} <= names
    assert not [n for n in names if n.startswith(TMP_PREFIX) or "base" in n]
    assert not list(art.path.parent.glob(TMP_PREFIX + "*"))
    files = art.metrics["files"]
    for t, (lo, hi) in {"f16": (15.5, 16.5), "q8_0": (8.0, 9.0), "q4_k_m": (4.0, 6.5)}.items():
        assert files[t]["size_bytes"] == (art.path / f"model-{t}.gguf").stat().st_size
        assert lo < files[t]["bits_per_weight"] < hi, t
    assert files["f16"]["fallbacks"] == {} and files["q8_0"]["tensor_types"] == {"Q8_0": 16, "F32": 5}
    # K-quant rows need multiples of 256: the 640-wide ffn_down falls back, and it is recorded
    assert "blk.0.ffn_down.weight" in files["q4_k_m"]["fallbacks"]
    parity = art.metrics["parity"]
    assert parity["gate_file"] == "model-f16.gguf" and parity["tokenization_match"]
    assert parity["files"]["f16"]["rel_logit_diff"] < 0.02 and not parity["files"]["f16"]["decisive_mismatches"]
    assert set(parity["files"]) == {"f16", "q8_0", "q4_k_m"}


def test_quantized_files_load_and_generate(exported):
    from edgeft.runtime.gguf import GGUFRuntime

    for t in ("q8_0", "q4_k_m"):
        with GGUFRuntime(export_gguf.gguf_file(exported, t), n_threads=1, n_ctx=64) as rt:
            res = rt.generate(rt.tokenize("Check the torque", add_bos=True), 8)
            assert len(res.tokens) == 8 or res.stopped_at_eos
    with pytest.raises(UserError, match="built: f16, q4_k_m, q8_0"):
        export_gguf.gguf_file(exported, "q6_k")


def test_k_quant_alone_uses_a_temporary_f16_base(hf_art, tmp_path):
    art = export_gguf.run(hf_art, export_gguf.Config(types=("q4_0",), threads=1), tmp_path / "q4")
    assert sorted(p.name for p in art.path.glob("*.gguf")) == ["model-q4_0.gguf"]
    assert art.metrics["parity"]["gate_file"] == "model-q4_0.gguf"
    assert art.metrics["files"]["q4_0"]["bits_per_weight"] < 6


def test_wrong_kind_and_unknown_type_are_user_errors(hf_art, tmp_path):
    data = artifact.build(tmp_path / "data", kind="data", stage="data", params={}, parent=None,
                          payload=lambda d: (d / "train.jsonl").write_text("{}\n") and {})
    with pytest.raises(UserError, match="needs hf"):
        export_gguf.run(data, export_gguf.Config(), tmp_path / "a")
    with pytest.raises(UserError, match="valid types: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_m"):
        export_gguf.run(hf_art, export_gguf.Config(types=("f16", "q3_xs")), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_pickle_only_model_is_refused(tiny_llama_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"never opened")
    src = _hf_artifact(pickled, tmp_path / "hf")
    with pytest.raises(UserError, match="safe_serialization=True"):
        export_gguf.run(src, export_gguf.Config(types=("f16",)), tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_gate_catches_a_tensor_layout_bug(hf_art, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_writer, "permute_qk", lambda w, n_heads: w)  # forget the rope permutation
    with pytest.raises(StageFailure, match="logits differ from torch fp32"):
        export_gguf.run(hf_art, export_gguf.Config(types=("f16",)), tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()


def test_a_file_llama_cpp_cannot_load_fails_the_stage_not_the_process(exported, tmp_path):
    good = export_gguf.gguf_file(exported, "f16")
    bad = tmp_path / "model-f16.gguf"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(StageFailure, match="could not load or run .*model-f16.gguf"):
        gguf_parity.run_child({"f16": bad}, [[1, 300]], tmp_path)


def test_adapter_export_ships_base_plus_lora_and_gates_it_against_the_merge(tiny_llama_dir, tmp_path):
    from gguf import GGUFReader

    from edgeft.constants import ADAPTER_DIR

    from conftest import make_adapter

    def payload(d: Path) -> dict:
        make_adapter(tiny_llama_dir, d / ADAPTER_DIR)
        for f in tiny_llama_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy2(f, d / f.name)
        return {}

    adapter = artifact.build(tmp_path / "train", kind="adapter", stage="train",
                             params={"config": {"method": "lora"}}, parent=None, payload=payload,
                             inputs={"base_model": str(tiny_llama_dir)})
    art = export_gguf.run(adapter, export_gguf.Config(types=("f32", "q8_0"), adapter=True), tmp_path / "gguf")
    names = {p.name for p in art.path.iterdir()}
    assert {"model-f32.gguf", "model-q8_0.gguf", export_gguf.ADAPTER_FILE, "model-f32.Modelfile"} <= names
    assert art.manifest["parent"]["id"] == adapter.id
    assert GGUFReader(art.path / export_gguf.ADAPTER_FILE).fields["general.type"].contents() == "adapter"
    assert "ADAPTER ./adapter-f32.gguf" in (art.path / "model-q8_0.Modelfile").read_text()
    info = art.metrics["adapter"]
    assert info["n_adapted"] == 14 and info["method"] == "lora" and info["merge_max_abs_diff"] < 1e-4
    # the gate compared base + adapter (through llama.cpp) with the merged model in torch
    f32 = art.metrics["parity"]["files"]["f32"]
    assert f32["rel_logit_diff"] < 0.01 and not f32["decisive_mismatches"]
    with pytest.raises(UserError, match="needs hf"):
        export_gguf.run(adapter, export_gguf.Config(types=("f16",)), tmp_path / "merged-only")
    # the bench measures base + adapter, not the untuned base: every variant carries the LoRA
    from edgeft.stages import bench

    variants = bench.export_variants(art)
    assert {v.name for v in variants} == {"gguf-f32", "gguf-q8_0"}
    assert all(v.lora == str(art.path / export_gguf.ADAPTER_FILE) for v in variants)
    from edgeft.runtime.gguf import GGUFRuntime
    from edgeft.runtime.prompt import PromptFormatter

    ids = PromptFormatter(tiny_llama_dir).encode("Check the belt tension first.")
    f32 = next(v for v in variants if v.quant == "f32")
    with GGUFRuntime(f32.path, n_threads=1, n_ctx=64, kv_type="f32") as plain, \
            GGUFRuntime(f32.path, n_threads=1, n_ctx=64, kv_type="f32", lora_path=f32.lora) as tuned:
        assert np.abs(plain.logits(ids) - tuned.logits(ids)).max() > 1e-3  # the adapter changes the answer


def test_adapter_export_refuses_a_model_without_an_adapter(hf_art, tmp_path):
    with pytest.raises(UserError, match="needs a LoRA adapter artifact"):
        export_gguf.run(hf_art, export_gguf.Config(types=("f16",), adapter=True), tmp_path / "g")
    with pytest.raises(UserError, match="imatrix=true but no type uses it"):
        export_gguf.run(hf_art, export_gguf.Config(types=("f16",), imatrix=True), tmp_path / "g")
    with pytest.raises(UserError, match="no data artifact found"):
        export_gguf.run(hf_art, export_gguf.Config(types=("q4_k_m",), imatrix=True), tmp_path / "g")
    assert not (tmp_path / "g").exists()


@pytest.fixture(scope="module")
def data_art(tmp_path_factory) -> artifact.Artifact:
    import json

    from conftest import tiny_qa

    recs = [{"messages": [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]}
            for r in tiny_qa(40)]

    def payload(d: Path) -> dict:
        (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:30]))
        (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[30:]))
        return {}

    return artifact.build(tmp_path_factory.mktemp("d") / "data", kind="data", stage="data", params={},
                          parent=None, payload=payload)


def test_imatrix_and_eval_conversations_reach_the_files_and_the_gate(hf_art, data_art, tmp_path):
    cfg = export_gguf.Config(types=("f16", "q4_k_m"), imatrix=True, imatrix_samples=20, min_top1_quant=0.0)
    art = export_gguf.run(hf_art, cfg, tmp_path / "gguf", data=data_art)
    assert (art.path / export_gguf.IMATRIX_FILE).is_file()
    im = art.metrics["imatrix"]
    assert im["sequences"] == 20 and im["tensors"] == 14 and im["data_id"] == data_art.id
    assert art.manifest["inputs"]["data_id"] == data_art.id  # the data is part of the artifact id
    from edgeft.stages import bench  # the imatrix is a GGUF file too, but not a variant

    assert [v.name for v in bench.export_variants(art)] == ["gguf-f16", "gguf-q4_k_m"]
    parity = art.metrics["parity"]
    assert parity["eval_prompts"] == 10 and parity["tokenization_match"]
    for t in ("f16", "q4_k_m"):
        f = parity["files"][t]
        assert 0.0 < f["tf_top1_agreement"] <= 1.0 and f["tf_kld"] >= 0.0 and f["tf_positions"] > 50
    assert parity["files"]["f16"]["tf_kld"] < parity["files"]["q4_k_m"]["tf_kld"]
    plain = export_gguf.run(hf_art, cfg.__class__(types=("q4_k_m",), min_top1_quant=0.0), tmp_path / "plain",
                            data=data_art)
    assert (plain.path / "model-q4_k_m.gguf").read_bytes() != (art.path / "model-q4_k_m.gguf").read_bytes()


def test_teacher_forced_agreement_below_the_bar_fails_the_export(hf_art, data_art, tmp_path):
    cfg = export_gguf.Config(types=("q4_k_m",), min_top1_quant=1.0)  # random weights never agree everywhere
    with pytest.raises(StageFailure, match="teacher-forced top-1 agreement .* < 1.0 on 10 eval conversations"):
        export_gguf.run(hf_art, cfg, tmp_path / "gguf", data=data_art)
    assert not (tmp_path / "gguf").exists()
