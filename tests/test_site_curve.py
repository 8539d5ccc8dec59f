"""cxr.evaluation.site_curve: site threshold rules, whole-patient stratified draws, the learning curve.

.venv/bin/pytest tests/test_site_curve.py      # pure numpy, about a second
"""

from __future__ import annotations

import numpy as np
import pytest

from cxr.evaluation import site_curve
from cxr.evaluation.site_curve import (
    choose_site_threshold,
    draw_calibration_set,
    learning_curve,
    patient_ids,
    quotas,
)

Y = np.array([0, 0, 0, 1, 1, 1])
P = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("youden", 0.4),  # J = 2/3 at 0.4 and at 0.7; the tie goes to the one nearer 0.5
        ("sensitivity:0.97", 0.4),  # every pneumonia called: the lowest positive
        ("sensitivity:0.6", 0.7),  # 2 of 3 suffice: the highest threshold reaching it
        ("sensitivity:1", 0.4),
    ],
)
def test_site_rules_on_known_arrays(rule, expected):
    assert choose_site_threshold(rule, Y, P) == expected


@pytest.mark.parametrize("rule", ["stress_youden", "calibrated_0.5", "sensitivity:0", "sensitivity:1.5", "f1", ""])
def test_other_rules_are_refused(rule):
    with pytest.raises(ValueError, match="youden or sensitivity"):
        choose_site_threshold(rule, Y, P)


def test_patient_ids_from_names_else_one_per_file():
    paths = [
        "t/PNEUMONIA/person12_bacteria_3.jpeg",
        "t/PNEUMONIA/person12_virus_9.jpeg",
        "t/NORMAL/IM-0001-0001.jpeg",
        "a/NORMAL/scan.png",
        "b/PNEUMONIA/scan.png",
    ]
    assert patient_ids(paths) == ["person12", "person12", "IM-0001", "a/NORMAL/scan.png", "b/PNEUMONIA/scan.png"]


def pool(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """60 one-image normal patients and 40 pneumonia patients of 1-5 images; distinct probabilities."""
    rng = np.random.default_rng(seed)
    patients = [f"n{i}" for i in range(60)]
    for i in range(40):
        patients += [f"p{i}"] * int(rng.integers(1, 6))
    y = np.array([pid.startswith("p") for pid in patients], dtype=int)
    p = np.clip(0.3 * y + rng.uniform(0.0, 0.7, len(y)), 0, 1)
    p = p + np.arange(len(y)) * 1e-9  # every image identifiable by its probability
    return y, p, np.array(patients)


@pytest.mark.parametrize("n", [4, 16, 40])
def test_draws_are_whole_patients_stratified_and_deterministic(n):
    y, _, patients = pool()
    a = draw_calibration_set(y, patients, n, np.random.default_rng(7))
    b = draw_calibration_set(y, patients, n, np.random.default_rng(7))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, draw_calibration_set(y, patients, n, np.random.default_rng(8)))
    assert set(patients[a]).isdisjoint(patients[~a])  # no patient split between calibration and scoring
    biggest = {0: 1, 1: 5}
    for cls, quota in quotas(y, n).items():
        got = int((y[a] == cls).sum())
        assert quota <= got < quota + biggest[cls]  # the quota, plus at most the last patient's other images


def test_quotas_follow_the_class_shares_with_one_of_each_at_least():
    y = np.array([0] * 3 + [1] * 97)
    assert quotas(y, 16) == {0: 1, 1: 15} and quotas(np.array([0, 1, 1, 1]), 8) == {0: 2, 1: 6}


def test_a_draw_larger_than_a_class_is_refused():
    y, _, patients = pool()
    with pytest.raises(ValueError, match="too few images"):
        draw_calibration_set(y, patients, len(y), np.random.default_rng(0))


def test_learning_curve_never_scores_an_image_with_a_threshold_it_set(monkeypatch):
    y, p, patients = pool()
    seen: list[tuple[set, set]] = []
    chosen = site_curve.choose_site_threshold
    scored = site_curve.score

    def choose(rule, yy, pp):
        seen.append((set(pp.tolist()), set()))
        return chosen(rule, yy, pp)

    def score(yy, pp, t):
        if seen and not seen[-1][1]:
            seen[-1] = (seen[-1][0], set(pp.tolist()))
        return scored(yy, pp, t)

    monkeypatch.setattr(site_curve, "choose_site_threshold", choose)
    monkeypatch.setattr(site_curve, "score", score)
    learning_curve(y, p, patients, [8, 32], 20, ["youden"], seed=3)
    assert len(seen) == 40
    for calibration, held_out in seen:
        assert calibration and held_out and calibration.isdisjoint(held_out)
        assert len(calibration) + len(held_out) == len(y)


def test_learning_curve_is_deterministic_and_summarised():
    y, p, patients = pool()
    args = (y, p, patients, [8, 16], 30, ["sensitivity:0.97", "youden"])
    a = learning_curve(*args, seed=1, baseline=p >= 0.5)
    assert a == learning_curve(*args, seed=1, baseline=p >= 0.5)
    assert a != learning_curve(*args, seed=2, baseline=p >= 0.5)
    assert set(a) == {"sensitivity:0.97", "youden", "validation"} and set(a["youden"]) == {"8", "16"}
    row = a["youden"]["16"]["accuracy"]
    assert row["p5"] <= row["mean"] <= row["p95"] and 0 <= row["p5"] and row["p95"] <= 1
    assert a["youden"]["16"]["n_calibration"]["mean"] >= 16


def test_drawable_sizes_leave_both_classes_to_score():
    y = np.array([0] * 4 + [1] * 6)
    assert site_curve.drawable(y, 4) and not site_curve.drawable(y, 16) and not site_curve.drawable(y, 1)
    assert [n for n in (2, 4, 8, 9, 10) if site_curve.drawable(y, n)] == [2, 4, 8]
