"""The GGUF gate's teacher-forced reduction (edgeft.gguf.parity): logits written one array at a time by the
llama.cpp child and folded into the shared reducer with one torch pass per conversation give the figures a
direct computation over all logits gives."""

from __future__ import annotations

import numpy as np
import pytest

from edgeft.gguf import parity as gguf_parity


def test_savez_streaming_reads_back_as_np_savez(tmp_path):
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((1, 4), np.float32), np.zeros((0, 4), np.float32)]
    assert gguf_parity.savez_streaming(tmp_path / "a.npz", iter(arrays)) == 3
    with np.load(tmp_path / "a.npz") as got:
        assert sorted(got.files) == ["arr_0", "arr_1", "arr_2"]
        for i, a in enumerate(arrays):
            np.testing.assert_array_equal(got[f"arr_{i}"], a)


def test_teacher_forced_matches_a_direct_computation(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    vocab, evals, ref_logits = 40, [], {}
    for i in range(4):
        full = [int(x) for x in rng.integers(1, vocab, 6 + i)]
        evals.append({"full": full, "start": 3})
        ref_logits[tuple(full)] = rng.normal(0, 3, (len(full), vocab)).astype(np.float32)

    class Model:  # torch's interface: model(ids).logits[0]
        def __call__(self, ids):
            return type("Out", (), {"logits": torch.from_numpy(ref_logits[tuple(ids[0].tolist())])[None]})

    noisy = [ref_logits[tuple(e["full"])] + rng.normal(0, 1.5, (len(e["full"]), vocab)).astype(np.float32)
             for e in evals]
    # the child keeps only the rows that predict the answer tokens
    gguf_parity.savez_streaming(tmp_path / "tf-q8_0.npz",
                                (n[e["start"] - 1:len(e["full"]) - 1] for n, e in zip(noisy, evals)))
    got = gguf_parity._teacher_forced(Model(), evals, ["q8_0"], tmp_path)["q8_0"]

    hits = total = 0
    kl = 0.0
    for e, cand in zip(evals, noisy):
        s, end = e["start"] - 1, len(e["full"]) - 1  # the rows that predict the answer tokens
        r, c = ref_logits[tuple(e["full"])][s:end].astype(np.float64), cand[s:end].astype(np.float64)
        p = np.exp(r - r.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        q = np.exp(c - c.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        hits += int((r.argmax(-1) == c.argmax(-1)).sum())
        total += len(r)
        kl += float((p * np.log(p / q)).sum())
    assert got["tf_positions"] == total and got["tf_prompts"] == 4
    assert got["tf_top1_agreement"] == hits / total and got["tf_kld"] == pytest.approx(kl / total, rel=1e-9)
    assert 0.0 < got["tf_top1_lower95"] < got["tf_top1_agreement"]


def test_the_child_keeps_whole_gate_prompts_and_only_the_generated_rows_of_eval_prompts():
    n = len(gguf_parity.GATE_PROMPTS)
    prompts = [[1, 2, 3]] * n + [[5, 6, 7, 8], [9]]
    assert gguf_parity.keep_rows(prompts) == [0] * n + [3, 0]
