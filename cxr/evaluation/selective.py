"""Selective prediction: the refer band around the threshold and what answering fewer cases buys.

An answer whose probability lies strictly inside the refer band (`refer_low`, `refer_high`)
around the threshold is UNCERTAIN (refer to a radiologist); the band is the narrowest one, in
logit distance from the threshold, that leaves `predict.refer_coverage` of the validation
predictions answered. `risk_coverage` and `at_coverage` measure accuracy on the answered cases.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_EPS = 1e-12  # probabilities are clipped to [eps, 1 − eps] before the logit


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def margin(p: np.ndarray, threshold: float) -> np.ndarray:
    """How far each probability is from the threshold, in logits (0 = on it)."""
    return np.abs(logit(p) - logit(threshold))


def refer_band(p: np.ndarray, threshold: float, coverage: float) -> tuple[float, float]:
    """(low, high): the narrowest band around `threshold`, symmetric in logits, that leaves at
    least `coverage` of the probabilities `p` answered (outside it: p ≤ low or p ≥ high)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    p = np.asarray(p, np.float64)
    if len(p) == 0:
        raise ValueError("need at least one probability to set the refer band")
    if coverage == 1:
        return float(threshold), float(threshold)
    # the k-th smallest margin with k = n - ceil(coverage n): the ceil(coverage n) larger ones stay answered
    m = np.sort(margin(p, threshold))
    # a hair narrower than that margin: the logit → probability round trip must not put the
    # boundary case itself inside the band (it did for ~15% of random draws)
    width = float(m[len(m) - math.ceil(coverage * len(m) - 1e-9)]) * (1 - 1e-9)
    centre = float(logit(threshold))
    return 1 / (1 + math.exp(-(centre - width))), 1 / (1 + math.exp(-(centre + width)))


def answered(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """True where a probability is outside the refer band (an answer is given)."""
    p = np.asarray(p, np.float64)
    return (p <= low) | (p >= high)


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    pos, neg = y == 1, y == 0
    return {
        "accuracy": float(np.mean(pred == y)) if len(y) else None,
        "sensitivity": float(np.mean(pred[pos] == 1)) if pos.any() else None,
        "specificity": float(np.mean(pred[neg] == 0)) if neg.any() else None,
    }


def answered_metrics(y: np.ndarray, p: np.ndarray, threshold: float, keep: np.ndarray) -> dict[str, Any]:
    """Coverage and accuracy / sensitivity / specificity of the answered cases (`keep`)."""
    y, p, keep = np.asarray(y), np.asarray(p, np.float64), np.asarray(keep, bool)
    pred = (p >= threshold).astype(int)
    return {
        "coverage": float(keep.mean()) if len(keep) else None,
        "n_answered": int(keep.sum()),
        **_rates(y[keep], pred[keep]),
    }


def risk_coverage(y: np.ndarray, p: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """The risk–coverage curve: answering the k most confident cases (largest margin first),
    for k = 1..n, the coverage k/n and the answered cases' accuracy, sensitivity, specificity."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    order = np.argsort(-margin(p, threshold), kind="stable")
    ys, pred = y[order], (p[order] >= threshold).astype(int)
    n = len(y)
    k = np.arange(1, n + 1)
    correct, tp, tn = np.cumsum(pred == ys), np.cumsum((pred == 1) & (ys == 1)), np.cumsum((pred == 0) & (ys == 0))
    pos, neg = np.cumsum(ys == 1), np.cumsum(ys == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / pos, tn / neg
    return [
        {
            "coverage": float(k[i] / n),
            "accuracy": float(correct[i] / k[i]),
            "sensitivity": None if pos[i] == 0 else float(sens[i]),
            "specificity": None if neg[i] == 0 else float(spec[i]),
        }
        for i in range(n)
    ]


def at_coverage(y: np.ndarray, p: np.ndarray, threshold: float, coverage: float) -> dict[str, Any]:
    """The answered cases' figures when the ceil(coverage·n) most confident are answered."""
    n = len(y)
    k = max(1, math.ceil(coverage * n - 1e-9))
    keep = np.zeros(n, bool)
    keep[np.argsort(-margin(p, threshold), kind="stable")[:k]] = True
    return answered_metrics(y, p, threshold, keep)
