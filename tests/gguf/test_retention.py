"""How much of a tune a GGUF file keeps (edgeft.gguf.retention), and what the GGUF gate says of a file that lost it."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from edgeft import artifact
from edgeft.gguf import retention
from edgeft.gguf import writer as gguf_writer
from edgeft.stages import base_import, export_gguf

CHANGED = ("q_proj", "k_proj", "up_proj")  # q/k: their rows are permuted in the GGUF, and must be put back


def _tune(base_dir, out, scale, dtype=torch.float32, seed=0):
    """`base_dir` plus a seeded change of `scale` x the mean |weight| on the CHANGED projections, saved in `dtype`."""
    shutil.copytree(base_dir, out)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for k, v in weights.items():
        if any(c in k for c in CHANGED):
            weights[k] = v + scale * v.abs().mean() * torch.randn(v.shape, generator=g)
    save_file({k: v.to(dtype) for k, v in weights.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


def test_a_float_file_keeps_the_whole_tune_and_the_base_keeps_none(tiny_llama_dir, tmp_path):
    tuned = _tune(tiny_llama_dir, tmp_path / "tuned", 0.05)
    gguf_writer.convert(tuned, tmp_path / "tuned.gguf", "f32")
    gguf_writer.convert(tiny_llama_dir, tmp_path / "base.gguf", "f32")
    kept = retention.tune_retained(tuned, tiny_llama_dir, tmp_path / "tuned.gguf")
    assert kept["tensors"] == 2 * len(CHANGED)  # 2 layers; nothing else changed
    assert kept["share"] == pytest.approx(1, abs=1e-4) and kept["min_share"] == pytest.approx(1, abs=1e-4)
    lost = retention.tune_retained(tuned, tiny_llama_dir, tmp_path / "base.gguf")
    assert lost["share"] == pytest.approx(0, abs=1e-4)


def test_a_file_with_the_change_doubled_keeps_twice_it(tiny_llama_dir, tmp_path):
    tuned = _tune(tiny_llama_dir, tmp_path / "tuned", 0.05)
    twice = _tune(tiny_llama_dir, tmp_path / "twice", 0.10)  # same seed: the same direction, twice as far
    gguf_writer.convert(twice, tmp_path / "twice.gguf", "f32")
    kept = retention.tune_retained(tuned, tiny_llama_dir, tmp_path / "twice.gguf")
    assert kept["share"] == pytest.approx(2, abs=1e-3) and kept["min_share"] == pytest.approx(2, abs=1e-3)


def test_16_bit_storage_rounding_is_not_counted_as_tune(tiny_llama_dir, tmp_path):
    tuned = _tune(tiny_llama_dir, tmp_path / "tuned", 0.05, dtype=torch.float16)  # every tensor rounded
    gguf_writer.convert(tuned, tmp_path / "tuned.gguf", "f16")
    kept = retention.tune_retained(tuned, tiny_llama_dir, tmp_path / "tuned.gguf")
    assert kept["tensors"] == 2 * len(CHANGED) and kept["share"] == pytest.approx(1, abs=1e-3)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    assert (retention.stored(x.numpy(), "BF16") == x.to(torch.bfloat16).float().numpy()).all()


def test_a_tune_of_an_imported_q8_0_base_rounded_back_by_q8_0_is_explained_by_the_gate(tiny_bpe_llama_dir, tmp_path):
    """The base already lies on the Q8_0 grid; a tune smaller than half a Q8_0 step is rounded away by Q8_0."""
    source = tmp_path / "source.q8_0.gguf"
    gguf_writer.convert(tiny_bpe_llama_dir, source, "q8_0")
    base = base_import.ensure(str(source), tmp_path / "cache")
    assert "Q8_0" in base.metrics["source_quant_types"]

    def tuned(d):
        _tune(base.path, tmp_path / "tuned", 1e-3)
        shutil.copytree(tmp_path / "tuned", d, dirs_exist_ok=True)
        (d / "manifest.json").unlink()

    art = artifact.build(tmp_path / "merged", kind="hf", stage="merge", params={"dtype": "float32"}, parent=None,
                         inputs={"base_model": str(base.path)}, payload=tuned)
    files = {"q8_0": tmp_path / "tuned.q8_0.gguf", "f32": tmp_path / "tuned.f32.gguf"}
    for t, f in files.items():
        gguf_writer.convert(art.path, f, t)
    assert retention.tune_retained(art.path, base.path, files["q8_0"])["share"] < 0.1
    explain = export_gguf._tune_explainer(art, art.path, files)
    said = explain("q8_0")
    print(said)
    assert "of what the tune changed in the weights" in said and "imported from a Q8_0 GGUF" in said
    assert "export_gguf.adapter=true" in said
    assert "imported" not in explain("f32")  # the float file keeps it all: nothing to explain
    pruned = artifact.build(tmp_path / "pruned", kind="hf", stage="prune", params={}, parent=None,
                            inputs={"base_model": str(base.path)}, payload=lambda d: None)
    assert export_gguf._tune_explainer(pruned, art.path, files) is None
