"""Distillation: the KL forms against a hand computation, learning on a tiny teacher/student, the cache, refusals."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from edgeft import artifact, records
from edgeft.errors import UserError
from edgeft.records import IGNORE_INDEX
from edgeft.stages import data, distill, prune


def _softmax(xs, t):
    e = [math.exp(x / t) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kl_forms_match_a_hand_computation():
    t_row, s_row = [2.0, 0.5, -1.0, 0.0], [1.0, 1.0, -0.5, 0.2]
    teacher, student = torch.tensor([[t_row]]), torch.tensor([[s_row]])
    for temp in (1.0, 2.0):
        p, q = _softmax(t_row, temp), _softmax(s_row, temp)
        fwd, rev = distill.kl_terms(student, teacher, temp)
        assert fwd.item() == pytest.approx(_kl(p, q), rel=1e-5)
        assert rev.item() == pytest.approx(_kl(q, p), rel=1e-5)
    # top-2: the teacher's two most likely ids (0 and 1), both distributions renormalised over them
    vals, ids = teacher.topk(2, dim=-1)
    fwd, rev = distill.kl_terms(student, (vals, ids), 1.0)
    p, q = _softmax([2.0, 0.5], 1.0), _softmax([1.0, 1.0], 1.0)
    assert ids.tolist() == [[[0, 1]]]
    assert fwd.item() == pytest.approx(_kl(p, q), rel=1e-5) and rev.item() == pytest.approx(_kl(q, p), rel=1e-5)


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 1], [IGNORE_INDEX, 2, 5, IGNORE_INDEX, IGNORE_INDEX]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, torch.randn(2, 5, 6, generator=g), \
        torch.randn(2, 5, 6, generator=g)


def test_distill_loss_scales_by_t_squared_and_blends_with_cross_entropy():
    batch, s, t = _batch()
    fwd, rev = distill.kl_terms(s[:, :-1], t[:, :-1], 2.0)
    keep_all = batch["attention_mask"][:, 1:].float()  # 4 + 2 next tokens are real
    keep_ans = (batch["labels"][:, 1:] != IGNORE_INDEX).float()  # 3 + 2 next tokens are answer tokens
    cfg = distill.Config(alpha=1.0, temperature=2.0, loss="forward")
    assert distill.distill_loss(s, t, batch, cfg).item() == pytest.approx(
        4 * ((fwd * keep_all).sum() / 6).item(), rel=1e-5)
    cfg = distill.Config(alpha=1.0, temperature=2.0, loss="mixed", mix=0.25, positions="answer")
    assert distill.distill_loss(s, t, batch, cfg).item() == pytest.approx(
        4 * (((0.25 * fwd + 0.75 * rev) * keep_ans).sum() / 5).item(), rel=1e-5)
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 6), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    cfg = distill.Config(alpha=0.0)
    assert distill.distill_loss(s, t, batch, cfg).item() == pytest.approx(ce.item(), rel=1e-5)
    cfg = distill.Config(alpha=0.3, temperature=1.0, loss="reverse")
    want = 0.3 * ((distill.kl_terms(s[:, :-1], t[:, :-1], 1.0)[1] * keep_all).sum() / 6) + 0.7 * ce
    assert distill.distill_loss(s, t, batch, cfg).item() == pytest.approx(want.item(), rel=1e-5)


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_llama_dir, tiny_qa_jsonl):
    """A data artifact, the tiny Llama as teacher and a 1-block pruned copy of it as student."""
    import shutil

    root = tmp_path_factory.mktemp("distill")
    d = data.run(None, data.Config(train=str(tiny_qa_jsonl), eval=""), root / "data")

    def payload(tmp: Path) -> dict:
        for f in tiny_llama_dir.iterdir():
            shutil.copy2(f, tmp / f.name)
        return {}

    teacher = artifact.build(root / "merge", kind="hf", stage="merge", params={}, parent=None, payload=payload)
    student = prune.run(teacher, prune.Config(layers=1, intermediate_size=256, calib_samples=8, max_length=64,
                                              dtype="float32"), root / "prune", data=d)
    return d, teacher, student


_FAST = dict(max_steps=30, batch_size=8, lr=3e-3, max_length=64, eval_samples=8, log_every=4, dtype="float32")


def test_distill_lowers_kl_to_the_teacher(arts, tmp_path):
    d, teacher, student = arts
    out = distill.run(student, distill.Config(alpha=1.0, temperature=1.0, **_FAST), tmp_path / "distill",
                      data=d, teacher=teacher)
    m = out.metrics
    assert m["eval_kl_after"] < 0.8 * m["eval_kl_before"]
    assert m["student_params"] < m["teacher_params"] and out.manifest["parent"]["stage"] == "prune"
    assert (out.path / "model.safetensors").is_file() and (out.path / "tokenizer.json").is_file()


def test_cached_top_k_teacher_matches_live_and_trains(arts, tmp_path):
    from transformers import AutoModelForCausalLM

    from edgeft.runtime.prompt import PromptFormatter
    from edgeft.training import loop
    from edgeft.training.examples import encode as _examples

    d, teacher, student = arts
    model = AutoModelForCausalLM.from_pretrained(teacher.path, dtype=torch.float32).eval()
    exs = _examples(PromptFormatter(teacher.path), records.read_jsonl(d.path / "train.jsonl"), 64)[:6]
    cfg = distill.Config(top_k=8, cache=True, batch_size=4)
    cached = distill.CachedTeacher.build(model, exs, cfg, 0, torch.device("cpu"), tmp_path)
    batch = loop.collate(exs[3:6], 0, torch.device("cpu"))  # rows in another order and padding than cached
    (cv, ci), (lv, li) = cached(batch), distill.LiveTeacher(model, 8)(batch)
    mask = batch["attention_mask"].bool()
    assert torch.equal(ci[mask].long(), li[mask])
    torch.testing.assert_close(cv[mask].float(), lv[mask], rtol=2e-3, atol=2e-3)  # stored as float16
    out = distill.run(student, distill.Config(top_k=8, cache=True, alpha=1.0, temperature=1.0, **_FAST),
                      tmp_path / "distill", data=d, teacher=teacher)
    assert out.metrics["cached_teacher"] and out.metrics["eval_kl_after"] < out.metrics["eval_kl_before"]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())  # the cache is gone


def test_a_student_with_another_tokenizer_is_refused(arts, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from edgeft.demo.tokenizer import train_tokenizer

    from conftest import tiny_corpus

    d, teacher, _ = arts
    tok_dir = train_tokenizer(tiny_corpus(seed=1), 320, tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tok_dir)
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(UserError, match="another tokenizer than the teacher"):
        distill.run(None, distill.Config(student=str(other), **_FAST), tmp_path / "distill", data=d, teacher=teacher)
    assert not (tmp_path / "distill").exists()


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="distill.cache needs distill.top_k"):
        distill.validate(distill.Config(cache=True))
    with pytest.raises(UserError, match="distill.loss"):
        distill.validate(distill.Config(loss="js"))
    with pytest.raises(UserError, match="no student"):
        distill.run(None, distill.Config(max_steps=1), Path("/nonexistent/x"), data=None, teacher=None)


@pytest.mark.integration
def test_pipeline_prunes_distills_exports_and_benches_the_shrunk_model_quickly(tmp_path, monkeypatch, tiny_llama_dir):
    """Fast half of the test below, the same chain on the random tiny Llama as base instead of the embedded
    pretrain + QLoRA + merge: train (1 full step) -> prune -> distill (1 step) -> GGUF of both -> one bench
    table (one prompt) naming the shrunk variants."""
    import json

    from edgeft import pipeline, profile

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    repo = Path(__file__).resolve().parents[2]
    recipe = pipeline.load_recipe(repo / "recipes" / "tiny.yaml", {
        "base.model": str(tiny_llama_dir), "train.method": "full", "train.max_steps": "1", "train.batch_size": "4",
        "train.max_length": "64", "train.eval_samples": "0",
        "prune.ratio": "0.5", "prune.candidates": "1", "prune.calib_samples": "8", "prune.max_length": "64",
        "distill.max_steps": "1", "distill.batch_size": "4", "distill.max_length": "64",
        "distill.eval_samples": "0", "distill.top_k": "16",
        "bench.max_new_tokens": "4", "bench.warmup": "0", "bench.repeats": "1", "bench.decode_tokens": "4",
        "bench.prompt_lengths": "8", "bench.ppl_tokens": "0", "export_gguf.parity_samples": "4"})
    prof = profile.load("tiny", {"gguf": "f16", "onnx": "", "ladder": "gguf:f16", "bench_samples": "1", "threads": "1"})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: a second thread only spins on a busy 2-core box (14 s -> 0.5 s export)
    try:
        arts = pipeline.run(recipe, prof, tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    assert arts["prune"].metrics["params_after"] < 0.55 * arts["prune"].metrics["params_before"]
    assert arts["prune"].manifest["parent"]["stage"] == "train"
    assert arts["distill"].manifest["parent"]["stage"] == "prune"
    assert (tmp_path / "run" / "gguf-distill" / "model-f16.gguf").is_file()
    assert arts["export_gguf_distill"].manifest["parent"]["id"] == arts["distill"].id
    names = [r["name"] for r in json.loads((tmp_path / "run" / "bench" / "report.json").read_text())]
    assert names == ["base", "tuned", "prune", "distill", "gguf-f16", "distill-gguf-f16"]


@pytest.mark.integration
@pytest.mark.slow  # a whole tiny chain (base, QLoRA, merge) before the shrink: minutes on 2 cores
def test_tiny_pipeline_prunes_distills_exports_and_benches_the_shrunk_model(tmp_path, monkeypatch):
    """merge -> prune -> distill -> GGUF + ONNX of both models -> one bench table naming the shrunk variants."""
    import json

    from edgeft import pipeline, profile

    monkeypatch.setenv("EDGEFT_HOME", str(tmp_path / "home"))
    repo = Path(__file__).resolve().parents[2]
    recipe = pipeline.load_recipe(repo / "recipes" / "tiny.yaml", {
        "prune.ratio": "0.5", "prune.candidates": "1", "prune.calib_samples": "16", "prune.max_length": "64",
        "distill.max_steps": "4", "distill.batch_size": "8", "distill.max_length": "64",
        "distill.eval_samples": "8", "distill.top_k": "16"})
    prof = profile.load("tiny", {"gguf": "q4_k_m", "onnx": "fp32", "ladder": "onnx:fp32,gguf:q4_k_m",
                                 "bench_samples": "4"})
    arts = pipeline.run(recipe, prof, tmp_path / "run")
    assert arts["prune"].metrics["params_after"] < 0.55 * arts["prune"].metrics["params_before"]
    assert arts["distill"].manifest["parent"]["stage"] == "prune"
    assert (tmp_path / "run" / "gguf-distill" / "model-q4_k_m.gguf").is_file()
    assert (tmp_path / "run" / "onnx-distill" / "fp32" / "model.onnx").is_file()
    names = [r["name"] for r in json.loads((tmp_path / "run" / "bench" / "report.json").read_text())]
    assert {"tuned", "prune", "distill", "gguf-q4_k_m", "distill-gguf-q4_k_m", "distill-onnx-fp32"} <= set(names)


def test_sharded_launch_is_refused_rather_than_saving_a_shard(arts, tmp_path, monkeypatch):
    d, teacher, student = arts
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"under DDP \(configs/accelerate/ddp.yaml\), not under FSDP"):
        distill.run(student, distill.Config(**_FAST), tmp_path / "distill", data=d, teacher=teacher)
    assert not (tmp_path / "distill").exists()
