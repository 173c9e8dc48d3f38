"""Teacher-forced agreement of a candidate model with a reference, reduced one prompt at a time.

Both export gates (edgeft.onnx.parity, edgeft.gguf.parity) fold each prompt's two logits matrices
[rows, vocab] into an `Agreement` as soon as they exist and drop them: what is kept is a handful of
running sums and maxima, so memory does not grow with the vocabulary or the number of prompts (a
262k vocabulary needs no more than a 512 one, beyond the one prompt in flight).

Per position: top-1 agreement (argmax equal), KL(reference || candidate) in float64, |logit diff|.

Confidence (`lower_bound`): the gates check a sample of prompts, so the top-1 agreement comes with a
one-sided 95% lower bound. Positions of one prompt are not independent (a quantization error that
flips one token of an answer tends to flip its neighbours, and some prompts are harder than others),
so the prompt is the sampling unit: the variance of the agreement is the cluster (ratio-estimator)
variance over prompts, its ratio to the binomial variance is the design effect, and the bound is the
Wilson score bound at the effective number of positions (positions / design effect, never more
than the positions). Wilson rather than the normal interval because agreements sit near 1, where
the normal interval overshoots; with no miss at all it still gives n / (n + z^2). Torch-free.
"""

from __future__ import annotations

import math

import numpy as np

Z_ONE_SIDED_95 = 1.6448536269514722  # standard normal quantile at 0.95
CONFIDENCE = ("one-sided 95% Wilson lower bound on top-1 agreement; sampling unit the prompt (positions "
              "of one answer correlate): effective positions = positions / design effect of the per-prompt "
              "cluster variance")
_CHUNK_ELEMENTS = 1 << 20  # float64 temporaries per chunk of rows: 8 MiB each, whatever the vocabulary


class Agreement:
    """Running top-1 / KL / max|diff| of candidate logits against reference logits, prompt by prompt."""

    def __init__(self) -> None:
        self.prompts = self.positions = self.hits = 0
        self.kl_sum = 0.0  # nats, summed over positions
        self.max_abs_diff = 0.0
        self.worst = (1.0, "")  # (agreement, label) of the prompt that agrees least
        # per-prompt sums for the cluster variance: sum h^2, sum h*m, sum m^2 (h hits, m positions)
        self._hh = self._hm = self._mm = 0

    def add(self, ref: np.ndarray, got: np.ndarray, start: int = 0, label: str = "") -> float:
        """Fold in one prompt: top-1 and KL over rows[start:], max|diff| over every row; returns its agreement."""
        if ref.shape != got.shape:
            raise ValueError(f"logits shapes differ: reference {ref.shape} vs candidate {got.shape}")
        hits, kl, diff = 0, 0.0, 0.0
        step = max(1, _CHUNK_ELEMENTS // max(1, ref.shape[-1]))
        for i in range(0, ref.shape[0], step):
            r, g = ref[i:i + step], got[i:i + step]
            diff = max(diff, float(np.abs(r.astype(np.float32) - g.astype(np.float32)).max(initial=0.0)))
            lo = max(start - i, 0)
            if lo >= r.shape[0]:
                continue
            r, g = r[lo:], g[lo:]
            hits += int((r.argmax(-1) == g.argmax(-1)).sum())
            lp, lq = log_softmax64(r), log_softmax64(g)
            kl += float(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0).sum())  # >= 0 up to rounding
        return self.add_counts(hits, max(ref.shape[0] - start, 0), kl, diff, label)

    def add_counts(self, hits: int, positions: int, kl_sum: float = 0.0, max_abs_diff: float = 0.0,
                   label: str = "") -> float:
        """Fold in one prompt already reduced: its hits, positions, summed KL and max|diff|; returns its agreement."""
        self.prompts += 1
        self.positions += positions
        self.hits += hits
        self.kl_sum += kl_sum
        self.max_abs_diff = max(self.max_abs_diff, max_abs_diff)
        self._hh += hits * hits
        self._hm += hits * positions
        self._mm += positions * positions
        share = hits / positions if positions else 1.0
        self.worst = min(self.worst, (share, label))
        return share

    @property
    def top1(self) -> float | None:
        """Share of positions where the argmaxes agree (None before any position)."""
        return self.hits / self.positions if self.positions else None

    @property
    def kld(self) -> float | None:
        """Mean KL(reference || candidate) per position, nats."""
        return self.kl_sum / self.positions if self.positions else None

    def design_effect(self) -> float:
        """Cluster variance over prompts / binomial variance over positions (>= 1; 1 without evidence)."""
        n, total = self.prompts, self.positions
        if n < 2 or not total or self.hits in (0, total):
            return 1.0
        p = self.hits / total
        # sum over prompts of (h_i - p m_i)^2, from the running sums (exact in integers, then one float step)
        resid = self._hh - 2 * p * self._hm + p * p * self._mm
        var_cluster = n / (n - 1) * max(resid, 0.0) / total ** 2
        var_binom = p * (1 - p) / total
        return max(1.0, var_cluster / var_binom)

    def lower_bound(self, z: float = Z_ONE_SIDED_95) -> float | None:
        """One-sided lower confidence bound on the top-1 agreement (see the module docstring)."""
        if not self.positions:
            return None
        return wilson_lower(self.hits / self.positions, self.positions / self.design_effect(), z)

    def summary(self) -> dict:
        """The figures a manifest records (rounded for reading; positions and prompts exact)."""
        lb = self.lower_bound()
        return {"top1_agreement": _round(self.top1, 4), "top1_lower95": _round(lb, 4),
                "kld": float(f"{self.kld:.4g}") if self.kld is not None else None,
                "max_abs_logit_diff": float(f"{self.max_abs_diff:.4g}"), "positions": self.positions,
                "prompts": self.prompts, "design_effect": round(self.design_effect(), 3)}


def wilson_lower(p: float, n: float, z: float = Z_ONE_SIDED_95) -> float:
    """Wilson score lower bound for a proportion p observed over n (possibly effective, fractional) trials."""
    if n <= 0:
        return 0.0
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


def log_softmax64(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = x.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def _round(x: float | None, nd: int) -> float | None:
    return None if x is None else round(x, nd)
