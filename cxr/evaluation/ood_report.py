"""What metrics/<v>_ood.json holds: the out-of-distribution gate and the refer band measured on
the official test X-rays and on the families of things that are not chest X-rays.

    python stages/ood.py VARIANT   # (dvc repro ood@VARIANT) → metrics/VARIANT_ood.json, among others

It reads `cxr predict`'s own results (cxr.serving.inference.Prediction), so every figure is what
a user would get from the files. Apart from cxr.evaluation.gate, which `cxr predict` loads: the
serving side carries none of this, and a change to the report reruns only the ood stages.
docs/design.md lists the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr.core.constants import UNCERTAIN
from cxr.evaluation import selective
from cxr.evaluation.gate import Gate

COVERAGE = 0.9  # docs/ood.md's "at 90% coverage" figures (besides the band's own)
METHOD = (
    "image checks + max(Mahalanobis on penultimate features, Mahalanobis on 16x16 thumbnails, view check: "
    "logistic regression on 16x16 thumbnails vs rotated/flipped/inverted/corner-cropped training copies), "
    "each scaled by its held-out quantile, fitted on train; thresholded by threshold_rule"
)


class Answer(Protocol):
    """What the report reads of one gated prediction (a cxr.serving.inference.Prediction)."""

    probability: float | None
    label: str | None
    ood_score: float | None
    ood: bool | None
    ood_reason: str | None


def probabilities(answers: Sequence[Answer]) -> np.ndarray:
    return np.array([a.probability for a in answers])


def family_result(scores: np.ndarray, flagged: np.ndarray, test_scores: np.ndarray) -> dict[str, Any]:
    """Flag rate of one family, and the AUROC of the OOD score separating it from the test X-rays."""
    y = np.r_[np.ones(len(scores)), np.zeros(len(test_scores))]
    auroc = float(roc_auc_score(y, np.r_[scores, test_scores])) if len(scores) and len(test_scores) else None
    return {"n": int(len(scores)), "flag_rate": float(np.mean(flagged)) if len(flagged) else None, "auroc": auroc}


def family_results(families: dict[str, Sequence[Answer]], test: Sequence[Answer]) -> dict[str, dict[str, Any]]:
    """{family: {n, flag_rate, auroc}}, each family against the test X-rays, in `families`' order."""
    test_scores = np.array([a.ood_score for a in test])
    return {
        family: family_result(np.array([a.ood_score for a in answers]), np.array([a.ood for a in answers]), test_scores)
        for family, answers in families.items()
    }


def ood_metrics(
    gate: Gate,
    threshold: float,
    y: np.ndarray,
    test: Sequence[Answer],
    families: dict[str, dict[str, Any]],
    *,
    n_train: int,
    n_val: int,
    keep_val: float,
    refer_coverage: float,
) -> dict[str, Any]:
    """metrics/<v>_ood.json: the gate on the test X-rays (`test`, labels `y`) and on the
    families (`family_results`), the refer band's answered cases, and two coverage references."""
    flagged = np.array([a.ood for a in test])
    p = probabilities(test)
    band = selective.answered(p, gate.refer_low, gate.refer_high)
    return {
        "method": METHOD,
        "threshold": gate.threshold,
        "keep_val": keep_val,
        "val_in_distribution": gate.meta["val_in_distribution"],
        "threshold_rule": gate.meta.get("threshold_rule", "validation"),
        **({"held_out": gate.meta["held_out"]} if "held_out" in gate.meta else {}),
        "n_train": n_train,
        "n_val": n_val,
        "test_false_flag_rate": float(flagged.mean()),
        "test_flagged_by": {
            why: int(n) for why, n in pd.Series([a.ood_reason for a in test if a.ood]).value_counts().items()
        },
        "families": families,
        "families_flag_rate": float(np.mean([r["flag_rate"] for r in families.values()])),
        "refer_band": {
            "low": gate.refer_low,
            "high": gate.refer_high,
            "target_coverage": refer_coverage,
            "val_coverage": gate.meta["val_coverage"],
            "test": selective.answered_metrics(y, p, threshold, band),
            "test_uncertain": int(sum(a.label == UNCERTAIN for a in test)),
        },
        "at_coverage_0.9": selective.at_coverage(y, p, threshold, COVERAGE),
        "full_coverage": selective.answered_metrics(y, p, threshold, np.ones(len(y), bool)),
    }
