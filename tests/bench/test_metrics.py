"""Answer metrics against hand-computed values."""

import numpy as np
import pytest

from edgeft.bench import metrics as M


def test_exact_match_normalises():
    assert M.exact_match("Tighten the bolts to 42 Nm.", "tighten the bolts to 42 nm") == 1.0
    assert M.exact_match("42 Nm", "43 Nm") == 0.0


def test_token_f1_and_rouge_l_by_hand():
    # pred tokens: a b c d ; ref: a c e -> common 2: P=2/4 R=2/3 F1=4/7; LCS(a c)=2 -> same F
    assert M.token_f1("a b c d", "a c e") == pytest.approx(4 / 7)
    assert M.rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert M.rouge_l("c a", "a c") == pytest.approx(0.5)  # order matters for LCS, not for F1
    assert M.token_f1("c a", "a c") == 1.0
    assert M.rouge_l("", "a") == 0.0


def test_key_fact():
    assert M.key_fact("Tighten the fan hub screws to 12 Nm.", "12 Nm") == 1.0
    assert M.key_fact("Tighten to 120 Nm.", "12 Nm") == 0.0


def test_kl_is_zero_for_equal_and_positive_otherwise():
    lg = np.random.default_rng(0).normal(size=(5, 11)).astype(np.float32)
    ref = M.log_softmax(lg)
    assert M.kl_divergence(ref, lg) == pytest.approx(0.0, abs=1e-9)
    assert M.kl_divergence(ref, lg[::-1]) > 0
