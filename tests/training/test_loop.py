"""The shared loop: packing numerics, the labelled-only loss, eval curve, early stopping, seeds."""

import random
from types import SimpleNamespace

import pytest
import torch

from edgeft.records import IGNORE_INDEX
from edgeft.training import batching, loop


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return m.eval()


def _examples(n, seed=0, lo=5, hi=20, vocab=300):
    g = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [1] + [g.randrange(3, vocab) for _ in range(g.randrange(lo, hi))]
        cut = g.randrange(1, len(ids) - 1)
        out.append((ids, [IGNORE_INDEX] * cut + ids[cut:]))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen"])
def test_packed_row_logits_equal_each_sample_alone(model, attn):
    """4D block-diagonal mask (sdpa, eager) or per-sample attention (varlen): same logits as alone."""
    if attn == "varlen":
        assert batching.use_varlen(model) == "sdpa"
    else:
        model.set_attn_implementation(attn)
    ex = _examples(4, seed=1)
    batch = batching.collate_packed([ex[:3], ex[3:]], pad_id=0, device="cpu", mask=attn != "varlen")
    n = batch["input_ids"].shape[1]
    assert attn == "varlen" or batch["attention_mask"].shape == (2, 1, n, n)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, members in enumerate([ex[:3], ex[3:]]):
            at = 0
            for ids, _ in members:
                alone = model(input_ids=torch.tensor([ids])).logits[0]
                # relative to the logit scale: the ISA's summation order moves the last bits, not more
                diff = (packed[row, at:at + len(ids)] - alone).abs().max()
                assert diff <= 1e-5 * max(1.0, alone.abs().max().item()), diff
                at += len(ids)
    model.set_attn_implementation("sdpa")


def test_packed_loss_equals_unpacked_and_model_loss(model):
    ex = _examples(6, seed=2)
    with torch.no_grad():
        unpacked = batching.collate(ex, 0, "cpu")
        ref = model(**unpacked).loss
        fast = batching.causal_lm_loss(model, unpacked)
        packed = batching.causal_lm_loss(model, batching.collate_packed([ex[:4], ex[4:]], 0, "cpu"))
        batching.use_varlen(model)
        varlen = batching.causal_lm_loss(model, batching.collate_packed([ex[:4], ex[4:]], 0, "cpu", mask=False))
        varlen_unpacked = batching.causal_lm_loss(model, unpacked)  # right padding needs no mask either
        model.set_attn_implementation("sdpa")
    for loss in (fast, packed, varlen, varlen_unpacked):
        assert torch.allclose(loss, ref, atol=1e-5)


def test_packed_first_label_of_each_sample_is_dropped():
    ex = [([1, 5, 6], [1, 5, 6]), ([1, 7, 8, 9], [1, 7, 8, 9])]  # raw text: every token a label
    b = batching.collate_packed([ex], 0, "cpu")
    assert b["labels"][0].tolist() == [IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, 8, 9]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3]


def test_packing_fills_rows_within_max_length_and_keeps_every_example():
    ex = _examples(300, seed=3, lo=4, hi=60)
    batches = batching.packed(ex, 4, 128, random.Random(0))
    rows = [r for b in batches for r in b]
    assert sorted(i for r in rows for i in r) == list(range(300))
    fill = [sum(len(ex[i][0]) for i in r) for r in rows]
    assert max(fill) <= 128
    assert sum(fill) / (128 * len(rows)) > 0.9  # first-fit-decreasing leaves little padding
    assert all(len(b) == 4 for b in batches[:-1])


def _cfg(**kw):
    base = dict(epochs=1.0, max_steps=6, batch_size=4, grad_accum=1, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0,
                seed=0, optim="adamw", log_every=1)
    base.update(kw)
    return SimpleNamespace(**base)


def _fresh(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


def test_early_stopping_keeps_the_best_weights(tiny_llama_dir):
    train = _examples(16, seed=4)
    evals = [(ids, [IGNORE_INDEX] + [(t + 150) % 300 + 3 for t in ids[1:]]) for ids, _ in train[:8]]  # unlearnable
    m = _fresh(tiny_llama_dir)
    out = loop.fit(m, train, evals, _cfg(max_steps=20, eval_every=1, early_stop_patience=2), torch.device("cpu"), 0)
    assert out["stopped_early"] and out["steps_run"] < 20
    assert out["steps_run"] == out["best_step"] + 2 and out["restored_best"]
    best = min(v for _, v in out["eval_curve"])
    assert out["eval_loss"] == best == dict(map(tuple, out["eval_curve"]))[out["best_step"]]
    assert loop.eval_loss(m, evals, torch.device("cpu"), 0, 4) == pytest.approx(best, abs=1e-4)


def test_eval_curve_and_packing_through_fit(tiny_llama_dir):
    train, evals = _examples(24, seed=5), _examples(6, seed=6)
    m = _fresh(tiny_llama_dir)
    out = loop.fit(m, train, evals, _cfg(eval_every=2, packing=True, max_length=64), torch.device("cpu"), 0)
    assert [s for s, _ in out["eval_curve"]] == [2, 4, 6] and out["packing"]
    assert m.config._attn_implementation == "sdpa"  # varlen attention was for the loop only
    assert out["loss_curve"][-1][1] < out["loss_curve"][0][1]
    assert out["tokens"] >= sum(len(x) for x, _ in train)  # 6 steps of 4 packed rows: several epochs


def test_same_seed_same_run_other_seed_other_run(tiny_llama_dir):
    train = _examples(16, seed=7)

    def run(seed):
        m = _fresh(tiny_llama_dir)
        loop.fit(m, train, [], _cfg(seed=seed, max_steps=3), torch.device("cpu"), 0)
        return m.model.layers[0].mlp.up_proj.weight.detach().clone()

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
