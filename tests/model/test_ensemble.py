"""k-fold training and the ensemble: each fold model validates on its own fold, out-of-fold
probabilities cover every official-train image once, and `<v>_cv` is their average with a
threshold chosen on those out-of-fold probabilities."""

from __future__ import annotations

import json
import subprocess
import sys

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.data.cache import cache_dir, write_split
from cxr.evaluation.metrics import choose_threshold
from cxr.evaluation.stress import SHIFTS as STRESS_SHIFTS
from cxr.serving.inference import load_model, predict_arrays

from .conftest import ROOT, SIZE, tiny_raw_params, tiny_split


def _project(tmp_path, folds: int = 2) -> dict:
    """A project folder with tiny params (cnn_baseline in cv) and a cache whose rows carry folds."""
    raw = tiny_raw_params(epochs=2)
    raw["split"]["folds"] = folds
    raw["cv"] = {"variants": ["cnn_baseline"], "folds": list(range(folds))}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    folder = cache_dir(tmp_path / "data" / "processed", SIZE)
    for split, seed in (("train", 1), ("val", 2), ("test", 3)):
        data = tiny_split(8, seed=seed)
        rows = data.rows.assign(split=split, fold=[(i // 2) % folds for i in range(8)] if split != "test" else -1)
        write_split(folder, split, data.x, rows)
    return raw


def _run(tmp_path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_fold_models_and_their_ensemble(tmp_path):
    raw = _project(tmp_path)
    for fold in raw["cv"]["folds"]:
        _run(tmp_path, str(ROOT / "stages" / "train.py"), "cnn_baseline", "--fold", str(fold))
    cv = tmp_path / "models" / "cv" / "cnn_baseline"
    oof = pd.concat([pd.read_csv(cv / f"fold{k}.oof.csv") for k in (0, 1)], ignore_index=True)
    # every official-train image (train + val rows: 16) once, each scored by the model that never trained on it
    assert len(oof) == 16 and not oof["path"].duplicated().any()
    for k in (0, 1):
        member = load_model(cv / f"fold{k}.keras")
        mine = oof[oof["fold"] == k]
        assert member.meta.val.n == len(mine) == 8
    done = _run(tmp_path, str(ROOT / "stages" / "ensemble.py"), "cnn_baseline")
    assert "ensemble@cnn_baseline: 2 fold models" in done.stdout
    ens = load_model(tmp_path / "models" / "cnn_baseline_cv.keras")  # safe_mode loading, like every model
    assert ens.meta.model == "ensemble" and ens.meta.val.n == 16
    stressed = {shift: oof[f"p_{shift}"] for shift in STRESS_SHIFTS}
    assert ens.meta.threshold == pytest.approx(
        choose_threshold(ens.meta.threshold_rule, oof["label"], oof["probability"], stressed)
    )
    x = tiny_split(6, seed=9).x
    members = [keras.saving.load_model(cv / f"fold{k}.keras", safe_mode=True) for k in (0, 1)]
    mean = np.mean([predict_arrays(m, x) for m in members], axis=0)
    np.testing.assert_allclose(predict_arrays(ens.model, x), mean, atol=1e-6)
    report = json.loads((tmp_path / "metrics" / "cnn_baseline_cv_oof.json").read_text())
    assert set(report["folds"]) == {"0", "1"} and report["all"]["n"] == 16
    # stress on out-of-fold images: every shift scored, at the ensemble's threshold
    stress = json.loads((tmp_path / "metrics" / "cnn_baseline_cv_stress.json").read_text())
    assert (
        set(stress["shifts"]) == {"clean", *STRESS_SHIFTS}
        and stress["n"] == 16
        and stress["threshold"] == ens.meta.threshold
    )
    assert stress["shifts"]["clean"]["roc_auc"] == pytest.approx(ens.meta.val.roc_auc)


def test_fold_outside_cv_is_refused(tmp_path):
    _project(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "cnn_baseline", "--fold", "7"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 1 and done.stderr.strip().startswith("error: --fold 7 for cnn_baseline")
