"""The latency protocol against a scripted runtime: what is run, how often, and how it is summarised."""

from __future__ import annotations

import pytest

from edgeft.bench import latency as L
from edgeft.runtime.base import GenResult


class FakeRuntime:
    """Prefill costs 1 ms per prompt token, decode 2 ms per token; llama.cpp's counters say 10% less."""

    def __init__(self):
        self.calls = []
        self._perf = {"t_p_eval_ms": 0.0, "t_eval_ms": 0.0, "n_p_eval": 0, "n_eval": 0}

    def generate(self, ids, max_new_tokens, ignore_eos=False):
        self.calls.append((len(ids), max_new_tokens, ignore_eos))
        n = max_new_tokens
        self._perf = {"t_p_eval_ms": 0.9 * len(ids), "t_eval_ms": 0.9 * 2 * (n - 1), "n_p_eval": len(ids),
                      "n_eval": n - 1}
        return GenResult(tokens=list(range(n)), ttft_s=len(ids) / 1000, decode_s=2 * (n - 1) / 1000,
                         prompt_tokens=len(ids), stopped_at_eos=False)

    def perf(self, reset=False):
        out = dict(self._perf)
        if reset:
            self._perf = {"t_p_eval_ms": 0.0, "t_eval_ms": 0.0, "n_p_eval": 0, "n_eval": 0}
        return out


def test_fill_prompt_is_exact_length_with_one_bos():
    src = [[1, 5, 6], [1, 7]]
    ids = L.fill_prompt(src, 9, bos_id=1)
    assert ids == [1, 5, 6, 7, 5, 6, 7, 5, 6]
    assert L.fill_prompt(src, 4, bos_id=None) == [1, 5, 6, 1]


def test_spread_quartiles():
    s = L.spread([4.0, 1.0, 3.0, 2.0, 100.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 100.0, 5)


def test_prompt_lengths_default_and_capped():
    assert L.prompt_lengths((), 512, 64) == [64, 256]
    assert L.prompt_lengths((32, 1000, 32), 256, 64) == [32, 192]  # deduplicated, capped to fit decode
    with pytest.raises(ValueError):
        L.prompt_lengths((), 64, 64)


def test_measure_protocol_and_llama_counters():
    rt = FakeRuntime()
    out = L.measure(rt, [[1, 5, 6, 7]], [16, 64], decode_tokens=11, warmup=2, repeats=3, bos_id=1)
    # 2 warm-ups, 3 prefill runs per length, 3 decode runs; EOS ignored everywhere
    assert len(rt.calls) == 2 + 3 * 2 + 3 and all(c[2] for c in rt.calls)
    assert [c[:2] for c in rt.calls[2:5]] == [(16, 1)] * 3 and [c[:2] for c in rt.calls[-3:]] == [(16, 11)] * 3
    row = out["lengths"]["64"]
    assert row["ttft_ms"]["median"] == pytest.approx(64.0)
    assert row["prefill_tok_s"]["median"] == pytest.approx(1000.0)
    assert row["prefill_tok_s_llama"]["median"] == pytest.approx(1000 / 0.9)
    assert out["decode_tok_s"]["median"] == pytest.approx(500.0)  # 10 tokens in 20 ms
    assert out["decode_tok_s_llama"]["median"] == pytest.approx(500 / 0.9)
    assert out["decode_context"] == 16 + 11 / 2


def test_measure_without_llama_counters():
    class NoPerf:
        generate = FakeRuntime.generate

        def __init__(self):
            self.calls = []

    out = L.measure(NoPerf(), [[3, 4]], [8], decode_tokens=5, warmup=0, repeats=1, bos_id=None)
    assert "decode_tok_s_llama" not in out and out["decode_tok_s"]["n"] == 1
