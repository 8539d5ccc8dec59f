"""Site calibration as a learning curve: how good is a threshold set on N local labelled images?

    python stages/site_curve.py [MODEL]     # plots/<MODEL>/predictions.csv → metrics/site_curve.json

A draw takes whole patients, stratified by class, until each class has its share of N images;
the threshold is chosen on them by a site rule (`cxr.serving.site`'s `sensitivity:<t>` or
`youden`, through `cxr.evaluation.metrics.choose_threshold`) and scored on every image of the
patients not drawn, so no image is scored with a threshold it helped set, and no patient is on
both sides. Repeated over many draws, the spread is what one hospital might see.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import numpy as np

from cxr.core.params import parse_threshold_rule
from cxr.data.dataset import parse_name
from cxr.evaluation.metrics import check_inputs, choose_threshold

SITE_RULES = ("sensitivity:<target>", "youden")  # the rules a site may declare (no stress or Platt fit on a few images)
CURVE_METRICS = ("accuracy", "sensitivity", "specificity", "threshold", "n_calibration")
PERCENTILES = (5, 95)


def patient_ids(paths: list[str]) -> list[str]:
    """One patient id per image: from the file name where it follows the dataset's naming
    (`person12_bacteria_3` → `person12`, `IM-0001-0001` → `IM-0001`), else the path itself, so an
    unnamed file is its own patient (never merged with another file of the same stem)."""
    out = []
    for path in paths:
        parsed = parse_name(PurePath(path).name)
        out.append(parsed.patient_id if parsed.parsed else str(path))
    return out


def check_site_rule(rule: str) -> str:
    """`rule` if it is `youden` or `sensitivity:<target>` with target in (0, 1]; ValueError otherwise."""
    try:
        kind, _ = parse_threshold_rule(rule)
    except Exception:  # its CxrError names params.yaml, which is not where a site rule comes from
        kind = None
    if kind not in ("youden", "sensitivity"):
        raise ValueError(f"site rule must be youden or sensitivity:<target> with target in (0, 1], got {rule!r}")
    return rule


def choose_site_threshold(rule: str, y: Any, p: Any) -> float:
    """The site threshold on labelled local images (y 0/1, p P(pneumonia)) by `rule`, with the
    pipeline's own threshold functions, so `youden` here is the training stage's Youden."""
    return choose_threshold(check_site_rule(rule), y, p)


def quotas(y: np.ndarray, n: int) -> dict[int, int]:
    """Images wanted per class in a draw of `n`: the pool's class shares, at least one of each."""
    positives = int(round(n * float(np.mean(y == 1))))
    positives = min(max(positives, 1), n - 1)
    return {0: n - positives, 1: positives}


def drawable(y: Any, n: int) -> bool:
    """Whether a draw of `n` leaves images of both classes to score (`draw_calibration_set` refuses
    the others): a small test set cannot give the larger points of the curve."""
    y = np.asarray(y)
    return n >= 2 and all(int(np.sum(y == cls)) > quota for cls, quota in quotas(y, n).items())


def draw_calibration_set(y: Any, patients: Any, n: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of the images drawn for calibration: whole patients, stratified by class.

    Per class, patients (in the stratum of their majority label) are taken in random order until
    the class has at least its quota of images (`quotas`); the last patient comes whole, so a draw
    can exceed `n` by a few images (the count is reported with the curve) but never splits a patient.
    """
    y = np.asarray(y)
    patients = np.asarray(patients).astype(str)
    if len(patients) != len(y):
        raise ValueError(f"{len(patients)} patient ids for {len(y)} labels")
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"a calibration set needs at least 2 images (one per class), got {n!r}")
    ids, group = np.unique(patients, return_inverse=True)
    size = np.bincount(group, minlength=len(ids))
    stratum = (np.bincount(group, weights=(y == 1), minlength=len(ids)) * 2 > size).astype(int)
    mask = np.zeros(len(y), dtype=bool)
    for cls, quota in quotas(y, int(n)).items():
        members = np.flatnonzero(stratum == cls)
        if size[members].sum() <= quota:  # nothing of the class would be left to score
            raise ValueError(f"too few images of class {cls} ({size[members].sum()}) for a draw of {n}")
        order = rng.permutation(members)
        taken = np.cumsum(size[order])
        chosen = order[: int(np.searchsorted(taken, quota)) + 1]
        mask |= np.isin(group, chosen)
    return mask


def score(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity at `threshold` (pneumonia when p ≥ threshold, as
    `cxr.evaluation.metrics.binary_metrics` counts)."""
    pred = p >= threshold
    return {
        "accuracy": float(np.mean(pred == (y == 1))),
        "sensitivity": float(np.mean(pred[y == 1])),
        "specificity": float(np.mean(~pred[y == 0])),
    }


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation (over draws) and the 5th and 95th percentiles."""
    arr = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(arr, PERCENTILES)
    return {"mean": float(arr.mean()), "sd": float(arr.std()), "p5": float(lo), "p95": float(hi)}


def learning_curve(
    y: Any,
    p: Any,
    patients: Any,
    ns: list[int],
    draws: int,
    rules: list[str],
    seed: int,
    baseline: Any = None,
) -> dict[str, Any]:
    """Per rule and N: mean and 5–95% range over `draws` draws of accuracy, sensitivity and
    specificity on the images not drawn, the site threshold, and the images actually drawn.

    Every rule sees the same draws (paired). `baseline` (optional, 0/1 per image): the model's
    own decisions at its validation threshold, scored on the same held-out images of each draw
    under the name `validation`, so the comparison is on identical images.
    """
    y, p = check_inputs(y, p)
    rules = [check_site_rule(r) for r in rules]
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive integer, got {draws!r}")
    fixed = None if baseline is None else np.asarray(baseline).astype(bool)
    rng = np.random.default_rng(seed)
    names = rules + ([] if fixed is None else ["validation"])
    out: dict[str, Any] = {name: {} for name in names}
    for n in ns:
        runs: dict[str, dict[str, list[float]]] = {name: {m: [] for m in CURVE_METRICS} for name in names}
        for _ in range(draws):
            cal = draw_calibration_set(y, patients, n, rng)
            held_y, held_p = y[~cal], p[~cal]
            for rule in rules:
                t = choose_site_threshold(rule, y[cal], p[cal])
                for key, value in {**score(held_y, held_p, t), "threshold": t, "n_calibration": cal.sum()}.items():
                    runs[rule][key].append(value)
            if fixed is not None:
                # the validation threshold's own calls: p ≥ t is `fixed`, so score it at 0.5 on 0/1
                for key, value in score(held_y, fixed[~cal].astype(float), 0.5).items():
                    runs["validation"][key].append(value)
        for name in names:
            out[name][str(n)] = {m: summarise(v) for m, v in runs[name].items() if v}
    return out
