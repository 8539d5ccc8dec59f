"""cxr.evaluation.metrics against scikit-learn and hand-checked cases; the patient bootstrap's guarantees."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from cxr.core.errors import CxrError
from cxr.data import dataset
from cxr.evaluation import metrics


@pytest.fixture
def scored() -> tuple[np.ndarray, np.ndarray]:
    """200 labelled scores where pneumonia scores higher on average, with overlap."""
    rng = np.random.default_rng(7)
    y = (rng.random(200) < 0.6).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(200), 0, 1)
    return y, p


def test_binary_metrics_match_sklearn(scored):
    y, p = scored
    m = metrics.binary_metrics(y, p, 0.45, n_bins=10)
    pred = (p >= 0.45).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(precision_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert m["ece"] == pytest.approx(metrics.expected_calibration_error(y, p, 10))
    assert (m["threshold"], m["n"]) == (0.45, 200)
    assert metrics.confusion_counts(y, p, 0.45) == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}


def test_threshold_is_inclusive():
    # p == threshold counts as pneumonia, as roc_curve and cxr.serving.inference.label_of count it
    m = metrics.binary_metrics([0, 1], [0.3, 0.5], 0.5)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 1.0


def test_single_class_gives_json_safe_nones():
    m = metrics.binary_metrics([1, 1, 1], [0.2, 0.9, 1.0], 0.5)
    assert m["roc_auc"] is None and m["specificity"] is None
    assert m["sensitivity"] == pytest.approx(2 / 3)
    neg = metrics.binary_metrics([0, 0], [0.1, 0.2], 0.5)
    assert neg["sensitivity"] is None and neg["precision"] is None and neg["pr_auc"] is None
    json.dumps([m, neg], allow_nan=False)  # raises on NaN/inf


@pytest.mark.parametrize(
    "y, p, threshold",
    [
        ([0, 1], [0.1], 0.5),
        ([], [], 0.5),
        ([0, 2], [0.1, 0.2], 0.5),
        ([0, 1], [0.1, 1.2], 0.5),
        ([0, 1], [0.1, float("nan")], 0.5),
        ([0, 1], [0.1, 0.9], 1.5),
    ],
)
def test_bad_inputs_raise_value_error(y, p, threshold):
    with pytest.raises(ValueError):
        metrics.binary_metrics(y, p, threshold)


def test_ece_and_reliability_hand_checked():
    # 2 bins: [0, .5] holds p=.1,.3 (mean .2, none positive); (.5, 1] holds .6,.9 (mean .75, all positive)
    y, p = [0, 0, 1, 1], [0.1, 0.3, 0.6, 0.9]
    table = metrics.reliability_table(y, p, 2)
    assert table["count"].tolist() == [2, 2]
    assert table["mean_predicted"].tolist() == pytest.approx([0.2, 0.75])
    assert table["fraction_positive"].tolist() == [0.0, 1.0]
    assert metrics.expected_calibration_error(y, p, 2) == pytest.approx(0.5 * 0.2 + 0.5 * 0.25)
    # perfectly calibrated: a quarter positive at p = .25
    assert metrics.expected_calibration_error([1, 0, 0, 0], [0.25] * 4, 10) == pytest.approx(0.0)


def test_reliability_counts_follow_sklearn_bins():
    # values on bin edges join the lower bin, as in sklearn.calibration.calibration_curve
    table = metrics.reliability_table([0, 1, 1, 0, 1], [0.0, 0.2, 0.2000001, 0.6, 1.0], 5)
    assert table["count"].tolist() == [2, 1, 1, 1]
    assert table["count"].sum() == 5


def test_youden_threshold_hand_checked():
    # J = .5 at both 0.8 and 0.35; 0.35 is closer to 0.5
    assert metrics.youden_threshold([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.35
    # perfect separation: only 0.7 gives TPR 1, FPR 0
    assert metrics.youden_threshold([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9]) == 0.7
    # J ties at 0.25 and 0.75, exactly equally close to 0.5: the higher is chosen
    assert metrics.youden_threshold([0, 1, 0, 1], [0.125, 0.25, 0.5, 0.75]) == 0.75
    with pytest.raises(ValueError, match="both"):
        metrics.youden_threshold([1, 1], [0.2, 0.9])


def test_sensitivity_by_subtype():
    y = [1, 1, 1, 1, 0]
    p = [0.9, 0.2, 0.8, 0.7, 0.9]
    sub = ["bacteria", "bacteria", "virus", "virus", "normal"]
    assert metrics.sensitivity_by_subtype(y, p, sub, 0.5) == {"bacteria": 0.5, "virus": 1.0}
    assert metrics.sensitivity_by_subtype([1, 0], [0.9, 0.1], ["bacteria", "normal"], 0.5)["virus"] is None


def test_image_series():
    names = {
        "data/raw/chest_xray/test/NORMAL/IM-0001-0001.jpeg": "IM",
        "NORMAL2-IM-0006-0001.jpeg": "NORMAL2-IM",
        "normal2-im-1427-0001-0002.jpeg": "NORMAL2-IM",
        "NORMAL-28501-0001.jpeg": "NORMAL",
        "person1_bacteria_1.jpeg": "other",
    }
    assert {path: dataset.image_series(path) for path in names} == names


def test_specificity_by_series():
    paths = [
        "t/IM-0001-0001.jpeg",
        "t/IM-0003-0001.jpeg",
        "t/NORMAL2-IM-0006-0001.jpeg",
        "t/NORMAL2-IM-0007-0001.jpeg",
        "t/NORMAL2-IM-0008-0001.jpeg",
        "t/person1_virus_2.jpeg",
        "t/person3_bacteria_4.jpeg",
    ]
    y = [0, 0, 0, 0, 0, 1, 1]
    p = [0.1, 0.5, 0.2, 0.9, 0.49, 0.1, 0.9]  # 0.5 counts as pneumonia (inclusive threshold)
    out = metrics.specificity_by_series(y, p, paths, 0.5)
    assert list(out) == ["IM", "NORMAL2-IM"]  # pneumonia images belong to no series here
    json.dumps(out, allow_nan=False)  # plain str keys and numbers
    assert all(type(k) is str for k in out)
    assert out["IM"] == {"n": 2, "specificity": 0.5}
    assert out["NORMAL2-IM"] == {"n": 3, "specificity": pytest.approx(2 / 3)}
    assert metrics.specificity_by_series([1], [0.3], ["IM-0001-0001.jpeg"], 0.5) == {}
    with pytest.raises(ValueError, match="paths"):
        metrics.specificity_by_series([0, 1], [0.2, 0.9], ["IM-0001-0001.jpeg"], 0.5)
    with pytest.raises(ValueError, match="threshold"):
        metrics.specificity_by_series([0], [0.2], ["IM-0001-0001.jpeg"], 1.5)


@pytest.fixture(scope="module")
def real_test_names(require_shared) -> list[str]:
    """File names of the real test set's normal images (../shared)."""
    import zipfile
    from pathlib import Path

    archive = require_shared(Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_224.zip")
    with zipfile.ZipFile(archive) as zf:
        return [
            n for n in zf.namelist() if "chest_xray/test/NORMAL/" in n and n.lower().endswith((".jpeg", ".jpg", ".png"))
        ]


def test_specificity_by_series_on_the_real_test_names(real_test_names):
    # every normal is called normal: each series' n is its share of the 234 test normals
    out = metrics.specificity_by_series(
        np.zeros(len(real_test_names), int), np.zeros(len(real_test_names)), real_test_names, 0.5
    )
    assert list(out) == ["IM", "NORMAL2-IM"]  # the two Kaggle/v2 series, nothing unparsed
    assert out["IM"]["n"] > 50 and out["NORMAL2-IM"]["n"] > 100
    assert sum(v["n"] for v in out.values()) == len(real_test_names)
    assert all(v["specificity"] == 1.0 for v in out.values())


def _patients(n_images: int, per_patient: int = 3) -> np.ndarray:
    return np.array([f"p{i // per_patient}" for i in range(n_images)])


def test_bootstrap_is_deterministic_and_contains_the_estimate(scored):
    y, p = scored
    ids = _patients(len(y))
    a = metrics.patient_bootstrap(y, p, ids, 0.45, 200, seed=1)
    assert a == metrics.patient_bootstrap(y, p, ids, 0.45, 200, seed=1)
    assert a != metrics.patient_bootstrap(y, p, ids, 0.45, 200, seed=2)
    point = metrics.binary_metrics(y, p, 0.45)
    for name in metrics.CI_METRICS:
        lo, hi = a[name]
        assert lo < point[name] < hi, name
        assert hi - lo < 0.5, name  # informative, not [0, 1]


def test_bootstrap_draws_whole_patients():
    ids = np.array(["a"] * 6 + ["b", "c", "d", "e"] + ["a"] * 2)  # patient a: 8 images, not contiguous
    w = metrics.patient_draws(ids, 200, seed=0)
    assert w.shape == (200, 12)
    a = ids == "a"
    assert (w[:, a] == w[:, a][:, :1]).all()  # a's images always drawn together, equally often
    # each sample draws as many patients as there are (5)
    per_patient = w[:, a][:, 0] + w[:, ~a].sum(axis=1)
    assert (per_patient == 5).all()


def test_bootstrap_by_patient_by_construction():
    # patient A: 10 images all right; patient B: 10 images all wrong. Resampling patients gives
    # accuracy 0, .5 or 1 only, so the interval spans [0, 1]; image resampling would give ~[.3, .7].
    y = np.array([1, 0] * 10)
    p = np.where(np.arange(20) < 10, y * 0.8 + 0.1, 0.9 - y * 0.8)
    ids = np.array(["A"] * 10 + ["B"] * 10)
    ci = metrics.patient_bootstrap(y, p, ids, 0.5, 200, seed=3)
    assert ci["accuracy"] == [0.0, 1.0]
    image_level = metrics.patient_bootstrap(y, p, [str(i) for i in range(20)], 0.5, 200, seed=3)
    assert 0.1 < image_level["accuracy"][0] and image_level["accuracy"][1] < 0.9


def test_blank_patient_ids_count_as_one_image_each():
    y, p = np.array([0, 1] * 15), np.linspace(0.05, 0.95, 30)
    blank = metrics.patient_bootstrap(y, p, [""] * 30, 0.5, 100, seed=0)
    unique = metrics.patient_bootstrap(y, p, [f"x{i:02d}" for i in range(30)], 0.5, 100, seed=0)
    assert blank == unique


def _rows(n: int) -> pd.DataFrame:
    sub = np.array(["normal", "bacteria", "virus", "bacteria"] * (n // 4))
    return pd.DataFrame(
        {"path": [f"data/raw/img{i}.jpeg" for i in range(n)], "subtype": sub, "patient_id": _patients(n, 2)}
    )


def test_evaluate_probabilities_outputs():
    n = 80
    rows = _rows(n)
    y = (rows["subtype"] != "normal").astype(int).to_numpy()
    p = np.clip(0.3 * y + 0.7 * np.random.default_rng(0).random(n), 0, 1)
    ev = metrics.evaluate_probabilities(
        y, p, rows, 0.3, val_roc_auc=0.91, bootstrap_samples=50, calibration_bins=10, seed=42
    )
    m = ev.metrics
    json.dumps(m, allow_nan=False)
    assert m["n_test"] == n and m["n_patients_test"] == n // 2 and m["val_roc_auc"] == 0.91
    assert m["threshold"] == 0.3 and m["at_0_5"]["threshold"] == 0.5
    assert m["accuracy"] == pytest.approx(metrics.binary_metrics(y, p, 0.3)["accuracy"])
    assert m["at_0_5"]["sensitivity"] == pytest.approx(metrics.binary_metrics(y, p, 0.5)["sensitivity"])
    assert m["at_0_5"]["sensitivity"] < m["sensitivity"]  # lower threshold, more positives
    assert sum(m["confusion"].values()) == n
    assert set(m["ci95"]) == {"accuracy", "sensitivity", "specificity", "roc_auc"}
    assert set(m["sensitivity_by_subtype"]) == {"bacteria", "virus"}
    pred = ev.tables["predictions"]
    assert list(pred.columns) == ["path", "label", "probability", "actual", "predicted"]
    assert set(pred["actual"]) == {"NORMAL", "PNEUMONIA"}
    assert ((pred["predicted"] == "PNEUMONIA") == (p >= 0.3)).all()
    assert list(ev.tables["roc"].columns) == ["fpr", "tpr", "threshold"]
    assert list(ev.tables["pr"].columns) == ["recall", "precision"]
    assert ev.tables["calibration"]["count"].sum() == n


def test_evaluate_probabilities_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="rows"):
        metrics.evaluate_probabilities(
            [0, 1], [0.1, 0.9], _rows(4), 0.5, val_roc_auc=None, bootstrap_samples=10, calibration_bins=5, seed=0
        )


# --- threshold rules (train.threshold_rule) ---------------------------------------------------


def _scores(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(0.3 * y + rng.normal(0.35, 0.18, n), 0, 1)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.97, 1.0])
def test_sensitivity_rule_keeps_the_target_with_the_highest_threshold(target):
    y, p = _scores()
    t = metrics.choose_threshold(f"sensitivity:{target}", y, p)
    sens = lambda thr: np.mean(p[y == 1] >= thr)  # noqa: E731
    assert sens(t) >= target
    higher = np.unique(p[p > t])
    assert len(higher) == 0 or sens(higher[0]) < target, "a higher threshold would still reach the target"


def test_calibrated_rule_is_where_platt_probability_crosses_one_half():
    y, p = _scores(seed=3)
    t = metrics.choose_threshold("calibrated_0.5", y, p)
    a, b = metrics.platt_scaling(y, p)
    calibrated = lambda q: 1 / (1 + np.exp(-(a * np.log(q / (1 - q)) + b)))  # noqa: E731
    assert calibrated(t) == pytest.approx(0.5, abs=1e-9)
    assert 0 < t < 1 and a > 0


def test_calibrated_rule_refuses_an_inverted_model():
    y, p = _scores(seed=4)
    with pytest.raises(CxrError, match="threshold_rule: youden"):
        metrics.choose_threshold("calibrated_0.5", y, 1 - p)


def test_youden_rule_is_the_youden_threshold():
    y, p = _scores(seed=5)
    assert metrics.choose_threshold("youden", y, p) == metrics.youden_threshold(y, p)


def test_platt_calibration_report_lowers_ece_of_a_miscalibrated_model():
    rng = np.random.default_rng(3)

    def draw(n):
        true_p = rng.uniform(0.02, 0.98, n)
        y = (rng.uniform(size=n) < true_p).astype(int)
        z = np.log(true_p / (1 - true_p))
        return y, 1 / (1 + np.exp(-(2.5 * z + 1.5)))  # overconfident and biased towards pneumonia

    (vy, vp), (ty, tp) = draw(3000), draw(3000)
    report = metrics.calibration_report(vy, vp, ty, tp, n_bins=10)
    assert report["a"] == pytest.approx(0.4, abs=0.05) and report["b"] == pytest.approx(-0.6, abs=0.1)
    for split in ("val", "test"):
        assert report[split]["ece_calibrated"] < 0.03 < report[split]["ece"]
        assert report[split]["brier_calibrated"] < report[split]["brier"]
    np.testing.assert_allclose(metrics.platt_apply([0.5], 1.0, 0.0), [0.5])
