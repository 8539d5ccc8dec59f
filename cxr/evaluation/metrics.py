"""Test-set metrics: point estimates, calibration, patient-level bootstrap intervals, curves.

    python -m cxr.evaluation.metrics PREDICTIONS_CSV [THRESHOLD]   # metrics of a predictions.csv (label,probability)

Positive class = pneumonia = 1; an image is called pneumonia when p >= threshold (the rule
`sklearn.metrics.roc_curve` uses, so a Youden threshold means the same thing everywhere).
Undefined values (e.g. AUC with one class present) are None, never NaN, so results are JSON-safe.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from cxr.core.constants import NEGATIVE, POSITIVE
from cxr.core.errors import CxrError, run_main
from cxr.core.params import parse_threshold_rule
from cxr.data.dataset import image_series

SUBTYPES = ("bacteria", "virus")
CI_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
# Threshold-dependent metrics: what changes between the validation threshold and 0.5.
THRESHOLD_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "threshold")


def check_inputs(y: Any, p: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (0/1) and probabilities ([0, 1], finite) of equal, non-zero length."""
    y = np.asarray(y)
    p = np.asarray(p, dtype=np.float64)
    if y.ndim != 1 or p.ndim != 1 or len(y) != len(p):
        raise ValueError(f"labels and probabilities must be 1-D of equal length, got shapes {y.shape} and {p.shape}")
    if len(y) == 0:
        raise ValueError("no predictions to evaluate (empty labels)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(
            f"labels must be 0 (normal) or 1 (pneumonia), got values {sorted(set(np.unique(y).tolist()))[:5]}"
        )
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("probabilities must be finite and within [0, 1]")
    return y.astype(np.int32), p


def _check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    return float(threshold)


def _clean(value: float) -> float | None:
    """A float for JSON: NaN (undefined) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def both_classes(y: np.ndarray) -> bool:
    return bool(np.any(y == 1) and np.any(y == 0))


def reliability_table(y: Any, p: Any, n_bins: int = 10) -> pd.DataFrame:
    """Reliability-diagram data over equal-width bins: mean_predicted, fraction_positive, count.

    Only non-empty bins appear (as in `sklearn.calibration.calibration_curve`).
    """
    y, p = check_inputs(y, p)
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    fraction, mean_pred = calibration_curve(y, p, n_bins=n_bins, strategy="uniform", pos_label=1)
    # The same binning as calibration_curve (a value on an edge joins the lower bin), for counts.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=n_bins)
    return pd.DataFrame({"mean_predicted": mean_pred, "fraction_positive": fraction, "count": counts[counts > 0]})


def expected_calibration_error(y: Any, p: Any, n_bins: int = 10) -> float:
    """ECE: |fraction positive − mean predicted| per equal-width bin, weighted by bin size."""
    table = reliability_table(y, p, n_bins)
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["fraction_positive"] - table["mean_predicted"]).abs()).sum())


def binary_metrics(y: Any, p: Any, threshold: float, n_bins: int = 10) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, precision, F1 at `threshold`; ROC/PR AUC, Brier, ECE."""
    y, p = check_inputs(y, p)
    threshold = _check_threshold(threshold)
    pred = (p >= threshold).astype(np.int32)
    with warnings.catch_warnings():
        # Undefined ratios (no positives, nothing predicted positive) come back as NaN → None.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out = {
            "accuracy": float(accuracy_score(y, pred)),
            "sensitivity": _clean(recall_score(y, pred, pos_label=1, zero_division=np.nan)),
            "specificity": _clean(recall_score(y, pred, pos_label=0, zero_division=np.nan)),
            "precision": _clean(precision_score(y, pred, pos_label=1, zero_division=np.nan)),
            "f1": _clean(f1_score(y, pred, pos_label=1, zero_division=np.nan)),
            "roc_auc": float(roc_auc_score(y, p)) if both_classes(y) else None,
            "pr_auc": float(average_precision_score(y, p)) if np.any(y == 1) else None,
            "brier": float(brier_score_loss(y, p, pos_label=1)),
            "ece": expected_calibration_error(y, p, n_bins),
            "threshold": threshold,
            "n": int(len(y)),
        }
    return out


def confusion_counts(y: Any, p: Any, threshold: float) -> dict[str, int]:
    """tn, fp, fn, tp at `threshold`."""
    y, p = check_inputs(y, p)
    tn, fp, fn, tp = confusion_matrix(y, (p >= _check_threshold(threshold)).astype(np.int32), labels=[0, 1]).ravel()
    return {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)}


def youden_threshold(y: Any, p: Any) -> float:
    """The threshold maximising TPR − FPR; among ties, the one closest to 0.5 (then the higher)."""
    y, p = check_inputs(y, p)
    if not both_classes(y):
        raise ValueError("the Youden threshold needs both normal and pneumonia images (validation has one class only)")
    # drop_intermediate=False keeps every candidate, so ties are resolved the same way always.
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # roc_curve's first threshold is +inf (nothing positive)
    j = (tpr - fpr)[finite]
    candidates = thresholds[finite][np.isclose(j, j.max(), rtol=0, atol=1e-12)]
    # thresholds are decreasing, so argmin picks the higher one of two equally close to 0.5
    return float(candidates[np.argmin(np.abs(candidates - 0.5))])


def sensitivity_threshold(y: Any, p: Any, target: float) -> float:
    """The highest threshold whose sensitivity on (y, p) is at least `target` (the screening rule:
    as many normals as possible called normal while missing at most 1 − target of pneumonias)."""
    y, p = check_inputs(y, p)
    if not np.any(y == 1):
        raise ValueError("the sensitivity rule needs pneumonia images (validation has none)")
    fpr, tpr, thresholds = roc_curve(y, p, drop_intermediate=False)
    reached = np.flatnonzero(np.isfinite(thresholds) & (tpr >= target - 1e-12))
    return float(thresholds[reached[0]])  # thresholds decrease: the first reaching it is the highest


def platt_scaling(y: Any, p: Any) -> tuple[float, float]:
    """(a, b) of Platt scaling, P(pneumonia) ≈ sigmoid(a · logit(p) + b), fitted by scikit-learn's
    (L2-regularised) logistic regression on (y, p)."""
    from sklearn.linear_model import LogisticRegression

    y, p = check_inputs(y, p)
    if not both_classes(y):
        raise ValueError("Platt scaling needs both normal and pneumonia images")
    z = np.log(np.clip(p, 1e-7, 1 - 1e-7) / np.clip(1 - p, 1e-7, 1 - 1e-7)).reshape(-1, 1)
    fit = LogisticRegression().fit(z, y)
    return float(fit.coef_[0, 0]), float(fit.intercept_[0])


def platt_apply(p: Any, a: float, b: float) -> np.ndarray:
    """The Platt-calibrated probability sigmoid(a · logit(p) + b)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return 1 / (1 + np.exp(-(a * np.log(p / (1 - p)) + b)))


def calibration_report(val_y: Any, val_p: Any, test_y: Any, test_p: Any, n_bins: int = 10) -> dict[str, Any]:
    """Platt scaling fitted on validation (or out-of-fold) predictions, and what it does to the
    ECE and Brier score on validation and test. A report: the model's output and threshold are
    not changed by it (train.threshold_rule calibrated_0.5 is the rule that uses it)."""
    a, b = platt_scaling(val_y, val_p)
    out: dict[str, Any] = {"method": "platt", "fitted_on": "validation", "a": a, "b": b}
    for name, y, p in (("val", val_y, val_p), ("test", test_y, test_p)):
        y, p = check_inputs(y, p)
        q = platt_apply(p, a, b)
        out[name] = {
            "ece": expected_calibration_error(y, p, n_bins),
            "ece_calibrated": expected_calibration_error(y, q, n_bins),
            "brier": float(np.mean((p - y) ** 2)),
            "brier_calibrated": float(np.mean((q - y) ** 2)),
        }
    return out


def calibrated_threshold(y: Any, p: Any, level: float = 0.5) -> float:
    """The raw probability at which the Platt-calibrated probability equals `level`."""
    a, b = platt_scaling(y, p)
    if a <= 0:
        raise CxrError(
            "Platt scaling found no increasing relation between the model's "
            "output and the labels; use train.threshold_rule: youden"
        )
    logit = (math.log(level / (1 - level)) - b) / a
    return float(1 / (1 + math.exp(-logit)))


def choose_threshold(rule: str, y: Any, p: Any, stressed: dict[str, Any] | None = None) -> float:
    """The decision threshold by `train.threshold_rule` on (y, p): youden, stress_youden,
    sensitivity:<target> or calibrated_0.5 (see cxr.core.params.parse_threshold_rule).

    stress_youden is Youden's J on the same images pooled over clean and every stress shift
    (`stressed`: shift → probabilities, cxr.evaluation.stress): on a nearly separable validation set plain
    Youden can land anywhere in a wide flat band, while the pooled one must also hold when
    exposure, contrast or resolution move the scores."""
    kind, value = parse_threshold_rule(rule)
    if kind == "youden":
        return youden_threshold(y, p)
    if kind == "stress_youden":
        if not stressed:
            raise ValueError("the stress_youden rule needs the stress probabilities")
        y = np.asarray(y)
        return youden_threshold(
            np.tile(y, 1 + len(stressed)), np.concatenate([np.asarray(p), *map(np.asarray, stressed.values())])
        )
    if kind == "sensitivity":
        return sensitivity_threshold(y, p, value)
    return calibrated_threshold(y, p, value)


def sensitivity_by_subtype(y: Any, p: Any, subtypes: Any, threshold: float) -> dict[str, float | None]:
    """Sensitivity within each pneumonia subtype (bacteria, virus); None where a subtype is absent."""
    y, p = check_inputs(y, p)
    subtypes = np.asarray(subtypes).astype(str)
    if len(subtypes) != len(y):
        raise ValueError(f"{len(subtypes)} subtypes for {len(y)} predictions")
    threshold = _check_threshold(threshold)
    out: dict[str, float | None] = {}
    for subtype in SUBTYPES:
        mask = (subtypes == subtype) & (y == 1)
        out[subtype] = float(np.mean(p[mask] >= threshold)) if mask.any() else None
    return out


def specificity_by_series(y: Any, p: Any, paths: Any, threshold: float) -> dict[str, dict[str, Any]]:
    """Specificity within each file-name series of the normal images: {series: {"n", "specificity"}}.

    The normal images come in series (IM-… and NORMAL2-IM-… in the test set) that may differ in
    difficulty; this shows whether the false positives gather in one. Series in name order.
    """
    y, p = check_inputs(y, p)
    paths = np.asarray(paths).astype(str)
    if len(paths) != len(y):
        raise ValueError(f"{len(paths)} paths for {len(y)} predictions")
    threshold = _check_threshold(threshold)
    series = np.array([image_series(path) for path in paths])
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(set(series[y == 0])):
        mask = (series == name) & (y == 0)
        out[str(name)] = {"n": int(mask.sum()), "specificity": float(np.mean(p[mask] < threshold))}
    return out


def _group_index(patient_ids: Any, n: int) -> np.ndarray:
    """Patient index per image; an image with a blank id counts as its own patient."""
    ids = np.asarray(patient_ids).astype(str)
    if len(ids) != n:
        raise ValueError(f"{len(ids)} patient ids for {n} predictions")
    blank = np.char.strip(ids) == ""
    ids = np.where(blank, np.char.add("\0image-", np.char.zfill(np.arange(n).astype(str), 12)), ids)
    return np.unique(ids, return_inverse=True)[1]


def _percentile_ci(values: np.ndarray) -> list[float] | None:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def patient_draws(patient_ids: Any, n_samples: int, seed: int) -> np.ndarray:
    """Per-image weights (n_samples, n_images): how often each image's patient was drawn.

    Each bootstrap sample draws as many patients as there are, with replacement; all images
    of a drawn patient come along, so a patient's images never split across a resample.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"bootstrap samples must be a positive integer, got {n_samples!r}")
    ids = np.asarray(patient_ids)
    group = _group_index(ids, len(ids))
    n_patients = int(group.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_samples, n_patients))
    offsets = (np.arange(n_samples) * n_patients)[:, None]
    times_drawn = np.bincount((draws + offsets).ravel(), minlength=n_samples * n_patients).reshape(
        n_samples, n_patients
    )
    return times_drawn[:, group]


def patient_bootstrap(
    y: Any, p: Any, patient_ids: Any, threshold: float, n_samples: int = 1000, seed: int = 0
) -> dict[str, list[float] | None]:
    """95% percentile intervals of accuracy, sensitivity, specificity and ROC AUC, resampling patients."""
    y, p = check_inputs(y, p)
    threshold = _check_threshold(threshold)
    if len(np.asarray(patient_ids)) != len(y):
        raise ValueError(f"{len(np.asarray(patient_ids))} patient ids for {len(y)} predictions")
    w = patient_draws(patient_ids, n_samples, seed).astype(np.float64)
    correct = ((p >= threshold).astype(np.int32) == y).astype(np.float64)
    pos, neg = (y == 1).astype(np.float64), (y == 0).astype(np.float64)
    w_pos, w_neg = w @ pos, w @ neg
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a class → NaN, dropped
        stats = {
            "accuracy": (w @ correct) / w.sum(axis=1),
            "sensitivity": (w @ (correct * pos)) / w_pos,
            "specificity": (w @ (correct * neg)) / w_neg,
        }
    auc = np.full(n_samples, np.nan)
    for i in np.flatnonzero((w_pos > 0) & (w_neg > 0)):
        auc[i] = roc_auc_score(y, p, sample_weight=w[i])
    stats["roc_auc"] = auc
    return {name: _percentile_ci(stats[name]) for name in CI_METRICS}


def roc_table(y: Any, p: Any) -> pd.DataFrame:
    """ROC curve points (fpr, tpr, threshold); empty when a class is missing."""
    y, p = check_inputs(y, p)
    if not both_classes(y):
        return pd.DataFrame(columns=["fpr", "tpr", "threshold"])
    fpr, tpr, thresholds = roc_curve(y, p)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def pr_table(y: Any, p: Any) -> pd.DataFrame:
    """Precision-recall curve points (recall, precision); empty without positives."""
    y, p = check_inputs(y, p)
    if not np.any(y == 1):
        return pd.DataFrame(columns=["recall", "precision"])
    precision, recall, _ = precision_recall_curve(y, p, pos_label=1)
    return pd.DataFrame({"recall": recall, "precision": precision})


def outcome_names(labels: Any) -> np.ndarray:
    """0/1 labels as NORMAL/PNEUMONIA (DVC's confusion template shows these)."""
    return np.where(np.asarray(labels) == 1, POSITIVE, NEGATIVE)


@dataclass
class Evaluation:
    """Everything evaluate writes: the metrics JSON and the plot tables."""

    metrics: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def evaluate_probabilities(
    y: Any,
    p: Any,
    rows: pd.DataFrame,
    threshold: float,
    *,
    val_roc_auc: float | None,
    bootstrap_samples: int,
    calibration_bins: int,
    seed: int,
) -> Evaluation:
    """Test metrics at the validation threshold (+ CIs, at 0.5, per subtype) and plot tables.

    `rows` are the cache rows of the same images (path, subtype, patient_id columns).
    """
    y, p = check_inputs(y, p)
    missing = {"path", "subtype", "patient_id"} - set(rows.columns)
    if missing or len(rows) != len(y):
        raise ValueError(
            f"rows must have path, subtype, patient_id for {len(y)} "
            f"images; got {len(rows)} rows missing {sorted(missing)}"
        )
    point = binary_metrics(y, p, threshold, calibration_bins)
    at_half = binary_metrics(y, p, 0.5, calibration_bins)
    metrics: dict[str, Any] = {k: point[k] for k in point if k != "n"}
    metrics["n_test"] = point["n"]
    metrics["n_patients_test"] = int(rows["patient_id"].nunique())
    metrics["confusion"] = confusion_counts(y, p, threshold)
    metrics["ci95"] = patient_bootstrap(y, p, rows["patient_id"], threshold, bootstrap_samples, seed)
    metrics["bootstrap"] = {"unit": "patient", "samples": bootstrap_samples, "seed": seed}
    metrics["at_0_5"] = {k: at_half[k] for k in THRESHOLD_METRICS}
    metrics["sensitivity_by_subtype"] = sensitivity_by_subtype(y, p, rows["subtype"], threshold)
    metrics["val_roc_auc"] = None if val_roc_auc is None else float(val_roc_auc)
    predictions = pd.DataFrame(
        {
            "path": rows["path"].to_numpy(),
            "label": y,
            "probability": p,
            "actual": outcome_names(y),
            "predicted": outcome_names((p >= threshold).astype(np.int32)),
        }
    )
    tables = {
        "roc": roc_table(y, p),
        "pr": pr_table(y, p),
        "calibration": reliability_table(y, p, calibration_bins),
        "predictions": predictions,
    }
    return Evaluation(metrics, tables)


def main() -> int:
    import json

    if len(sys.argv) < 2:
        raise ValueError("usage: python -m cxr.evaluation.metrics PREDICTIONS_CSV [THRESHOLD]")
    df = pd.read_csv(sys.argv[1])
    if not {"label", "probability"} <= set(df.columns):
        raise ValueError(f"{sys.argv[1]} needs label and probability columns")
    threshold = float(sys.argv[2]) if len(sys.argv) > 2 else 0.5
    print(json.dumps(binary_metrics(df["label"].to_numpy(), df["probability"].to_numpy(), threshold), indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
