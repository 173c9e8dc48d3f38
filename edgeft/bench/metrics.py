"""Answer quality against references: exact match, token F1, ROUGE-L, key fact; logit agreement."""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, punctuation dropped, whitespace collapsed (SQuAD style, articles kept)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """Harmonic mean of token precision and recall over normalised tokens."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def rouge_l(pred: str, ref: str) -> float:
    """ROUGE-L F1: longest common subsequence of normalised tokens."""
    p, r = normalize(pred).split(), normalize(ref).split()
    if not p or not r:
        return float(p == r)
    prev = [0] * (len(r) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(r):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def key_fact(pred: str, key: str) -> float:
    """1.0 when the answer contains the fact's key value (a torque, a part number, a cause)."""
    return float(normalize(key) in normalize(pred))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 for stable KL."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logp: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(ref || variant) over positions, nats."""
    q = log_softmax(logits)
    return float((np.exp(ref_logp) * (ref_logp - q)).sum(axis=-1).mean())


def token_nll(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    """Negative log-likelihood (nats) of ids[1:] under teacher-forced logits [len(ids), vocab]."""
    logp = log_softmax(logits[:-1])
    return -logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
