"""Stress shifts: fixed, seeded, shape-preserving, each one really changes the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from cxr.evaluation import stress


def films(n: int = 4, size: int = 40) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 60 + 120 * np.exp(-(((yy - 0.5) / 0.3) ** 2 + ((xx - 0.4) / 0.2) ** 2))
    return np.clip(base[None, :, :, None] + rng.normal(0, 5, (n, size, size, 1)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(stress.SHIFTS))
def test_each_shift_is_seeded_shape_preserving_and_not_the_identity(name):
    x = films()
    a, b = stress.shifted(x, name, seed=1), stress.shifted(x, name, seed=1)
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, b), "the same seed gives the same pixels"
    assert np.mean(np.abs(a.astype(int) - x.astype(int))) > 0.5, f"{name} barely changes the image"


def test_directions_are_as_named():
    x = films()
    assert stress.shifted(x, "exposure_dark", 0).mean() < x.mean() < stress.shifted(x, "exposure_bright", 0).mean()
    assert stress.shifted(x, "contrast_low", 0).std() < x.std() < stress.shifted(x, "contrast_high", 0).std()
    border = stress.shifted(x, "zoom_out", 0)[:, :2, :, :]
    assert border.max() == 0  # shrunk into a black border
    assert stress.shifted(x, "pad_aspect", 0)[:, :, :3, :].max() == 0  # black side bars


def test_summary_mean_and_worst():
    rng = np.random.default_rng(3)
    y = np.array([0, 1] * 50)
    clean = np.clip(0.5 * y + rng.uniform(0, 0.5, 100), 0, 1)
    probs = {"a": np.clip(clean + rng.normal(0, 0.1, 100), 0, 1), "b": np.clip(1 - clean, 0, 1)}
    s = stress.stress_summary(y, clean, probs, 0.5)
    aucs = [s["shifts"][n]["roc_auc"] for n in ("a", "b")]
    assert s["mean"]["roc_auc"] == pytest.approx(np.mean(aucs)) and s["worst"]["roc_auc"] == pytest.approx(min(aucs))
    assert s["shifts"]["clean"]["roc_auc"] > s["worst"]["roc_auc"] and s["n"] == 100
    with pytest.raises(ValueError, match="unknown shift"):
        stress.shifted(films(), "sepia", 0)
