"""A GGUF file as the base model: imported once (weights, tokenizer from the GGUF's metadata), and the
byte-level BPE Llama it becomes exported back to GGUF with the same tokenization in llama.cpp."""

import json
import subprocess
import sys

import pytest
import torch

from edgeft import artifact
from edgeft.errors import UserError
from edgeft.gguf import writer as gguf_writer
from edgeft.stages import base_import

TEXTS = ["Torque for bolt M8 is 25 Nm since 2024-01-05.", "  two spaces,\n\nnewlines\tand a tab",
         "Fault E4: überhitzt 3.14159 don't", "<|im_start|>user\nhi<|im_end|>", "1234567890"]


@pytest.fixture(scope="module")
def gguf_file(tiny_bpe_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("g") / "tiny-bpe.f32.gguf"
    info = gguf_writer.convert(tiny_bpe_llama_dir, out, "f32")
    assert info["tokenizer"] == "gpt2"
    return out


@pytest.fixture(scope="module")
def imported(gguf_file, tmp_path_factory):
    return base_import.ensure(str(gguf_file), tmp_path_factory.mktemp("cache"))


def _llama_tokens(path, texts):
    code = ("import json, sys\nfrom edgeft.runtime.gguf import GGUFRuntime\n"
            "with GGUFRuntime(sys.argv[1], n_threads=1, n_ctx=128) as rt:\n"
            "    print(json.dumps([rt.tokenize(t) for t in json.loads(sys.argv[2])]))")
    proc = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(texts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-1000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bpe_llama_exports_with_the_smollm_pre_tokenizer(gguf_file, tiny_bpe_llama_dir):
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_file)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    from edgeft.runtime.prompt import PromptFormatter

    hf = PromptFormatter(tiny_bpe_llama_dir).tokenizer
    assert _llama_tokens(gguf_file, TEXTS) == [hf.encode(t, add_special_tokens=False).ids for t in TEXTS]


def test_import_takes_the_tokenizer_from_the_gguf(imported, gguf_file, tiny_bpe_llama_dir):
    from edgeft.runtime.prompt import PromptFormatter

    assert imported.kind == "hf" and imported.stage == "base_import"
    assert imported.manifest["inputs"]["source_sha256"] == artifact.sha256_file(gguf_file)
    assert imported.metrics["source_quant_types"] == {"F32": 2 * 9 + 2}  # 9 per block, embeddings, final norm
    assert not (imported.path / "tokenizer.model").exists()  # no GGUF copy under a SentencePiece name
    fmt, ref = PromptFormatter(imported.path), PromptFormatter(tiny_bpe_llama_dir)
    assert (fmt.eos_token, fmt.bos_token, fmt.add_bos) == ("<|im_end|>", "<|im_start|>", False)
    assert fmt.template_source == ref.template_source
    for t in TEXTS:  # digits split one by one, as llama.cpp's "smollm" pre-tokenizer does
        assert fmt.tokenizer.encode(t, add_special_tokens=False).ids == ref.tokenizer.encode(
            t, add_special_tokens=False).ids, t
    msgs = [{"role": "user", "content": "What is the torque for bolt 12?"}]
    assert fmt.prompt_ids(msgs) == ref.prompt_ids(msgs)
    cfg = json.loads((imported.path / "config.json").read_text())
    assert cfg["eos_token_id"] == fmt.eos_id and cfg["architectures"] == ["LlamaForCausalLM"]


def test_imported_weights_equal_the_original(imported, tiny_bpe_llama_dir):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_bpe_llama_dir, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(imported.path, dtype=torch.float32)(ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_same_file_imports_once(imported, gguf_file, tmp_path):
    again = base_import.ensure(str(gguf_file.parent), imported.path.parent)  # a dir holding one .gguf
    assert again.path == imported.path and again.id == imported.id


def test_unsupported_gguf_is_refused_with_the_list(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match=r"'gemma3' is not supported.*supported: llama, mistral, qwen2, qwen3 "
                                        r"\(gemma3: .*Unigram.*sliding-window"):
        base_import.ensure(str(path), tmp_path / "cache")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(UserError, match="not a readable GGUF"):
        base_import.ensure(str(tmp_path / "bad.gguf"), tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_run_from_a_gguf_base_keeps_the_lineage(cli, gguf_file, tiny_qa_jsonl, tmp_path):
    from tests.reliability._common import TINY_RECIPE

    out = tmp_path / "run"
    code, stdout, err = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", out,
                            f"base.model={gguf_file}", f"data.train={tiny_qa_jsonl}", "data.eval=",
                            "train.method=lora", "train.max_steps=4", "profile.gguf=f16", "profile.onnx=",
                            "profile.bench_samples=2", "profile.accuracy_budget=0")
    assert code == 0, err[-2000:]
    chain = [a.stage for a in artifact.lineage(out / "gguf")]
    assert chain == ["export_gguf", "merge", "train", "base_import"], chain
    parity = json.loads((out / "gguf" / "manifest.json").read_text())["metrics"]["parity"]
    assert parity["tokenization_match"] and not parity["files"]["f16"]["decisive_mismatches"]


def test_a_gguf_whose_template_does_not_parse_ends_in_one_line(cli, tiny_bpe_llama_dir, tiny_qa_jsonl, tmp_path):
    import shutil

    from tests.reliability._common import TINY_RECIPE, assert_error

    src = tmp_path / "src"
    shutil.copytree(tiny_bpe_llama_dir, src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")  # unclosed
    gguf_writer.convert(src, tmp_path / "broken.gguf", "f32")
    res = cli("run", "--recipe", TINY_RECIPE, "--profile", "tiny", "--out", tmp_path / "run",
              f"base.model={tmp_path / 'broken.gguf'}", f"data.train={tiny_qa_jsonl}", "data.eval=",
              "train.method=lora", "train.max_steps=2", "profile.gguf=f16", "profile.onnx=")
    assert_error(res, 2, "chat template does not parse")
    assert not (tmp_path / "run" / "train").exists()


def test_a_qwen3_gguf_imports_to_the_same_model_and_tokenizer_and_exports_again(family_dirs, tmp_path):
    """Qwen3 (q/k norms, head_dim 128 != hidden / heads, tied, Qwen2 regex BPE) through GGUF and back."""
    from transformers import AutoModelForCausalLM

    from edgeft.runtime.prompt import PromptFormatter

    src = family_dirs("qwen3")
    gguf_path = tmp_path / "q3.f32.gguf"
    gguf_writer.convert(src, gguf_path, "f32")
    art = base_import.ensure(str(gguf_path), tmp_path / "cache")
    cfg = json.loads((art.path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] == 128
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(art.path, dtype=torch.float32)(ids).logits
    assert (a - b).abs().max() <= 1e-5 * a.abs().max()
    fmt, ref = PromptFormatter(art.path), PromptFormatter(src)
    for t in TEXTS:
        assert fmt.tokenizer.encode(t, add_special_tokens=False).ids == ref.tokenizer.encode(
            t, add_special_tokens=False).ids, t
    again = gguf_writer.convert(art.path, tmp_path / "again.gguf", "f16")
    assert again["arch"] == "qwen3" and again["tokenizer"] == "gpt2"


def test_a_base_imported_from_q4_1_re_quantizes_to_q4_1_unchanged(tiny_bpe_llama_dir, tmp_path):
    """Q4_1 of weights that are already on a Q4_1 grid finds that grid again: the export can ship the base as the
    registry's file had it (with export_gguf.adapter=true the tune rides beside it, unrounded)."""
    import numpy as np
    from gguf import GGUFReader

    from edgeft.stages import export_gguf

    gguf_writer.convert(tiny_bpe_llama_dir, tmp_path / "src.f16.gguf", "f16")
    export_gguf._llama_quantize(tmp_path / "src.f16.gguf", tmp_path / "src.q4_1.gguf", "q4_1", 1)
    imported = base_import.ensure(str(tmp_path / "src.q4_1.gguf"), tmp_path / "cache")
    assert imported.metrics["source_quant_types"]["Q4_1"] == 2 * 7  # every block projection
    gguf_writer.convert(imported.path, tmp_path / "again.f16.gguf", "f16")
    export_gguf._llama_quantize(tmp_path / "again.f16.gguf", tmp_path / "again.q4_1.gguf", "q4_1", 1)
    src, again = ({t.name: t for t in GGUFReader(tmp_path / f"{n}.q4_1.gguf").tensors} for n in ("src", "again"))
    q4_1 = [n for n, t in src.items() if t.tensor_type.name == "Q4_1"]
    assert len(q4_1) == 2 * 7 and all(again[n].tensor_type.name == "Q4_1" for n in q4_1)
    for n in q4_1:  # a block whose fp16 scale rounds one step the other way may differ; nothing else
        assert np.mean(np.asarray(src[n].data).view(np.uint8) == np.asarray(again[n].data).view(np.uint8)) >= 0.9999
