"""Training: determinism, learning, threshold choice, sidecar, DVCLive files, and the stage
script end to end on a tiny cache in a temporary project."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from dataclasses import replace

import keras
import numpy as np
import pytest
import yaml

from cxr.data.cache import cache_dir, write_split
from cxr.evaluation.metrics import binary_metrics, youden_threshold
from cxr.model.architectures import build_model
from cxr.model.training import class_weights, compile_model, save_result, set_determinism, train_variant
from cxr.serving.inference import predict_arrays as predict

from .conftest import ROOT, SIZE, tiny_raw_params, tiny_split


def val_summary(y, prob, threshold):
    """The validation figures a sidecar records, recomputed from probabilities."""
    m = binary_metrics(y, prob, threshold)
    return {k: m[k] for k in ("roc_auc", "accuracy", "sensitivity", "specificity", "n")}


SIDECAR_KEYS = [
    "variant",
    "model",
    "image_size",
    "resize",
    "threshold",
    "threshold_rule",
    "val",
    "epochs_run",
    "train_seconds",
    "seed",
    "params",
    "weights",
]


def test_same_seed_gives_identical_weights_and_metrics(params, splits):
    variant = params.variant("cnn_augmented")  # augmentation and shuffling are seeded too
    first = train_variant(variant, params, *splits, verbose=0)
    second = train_variant(variant, params, *splits, verbose=0)
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert first.history == second.history
    assert replace(first.meta, train_seconds=0) == replace(second.meta, train_seconds=0)
    set_determinism(params.seed + 1)  # and the seed does matter
    other = build_model(variant, replace(params, seed=params.seed + 1))
    assert not np.array_equal(other.get_weights()[0], first.model.get_weights()[0])


def test_cnn_overfits_one_small_batch(params):
    batch = tiny_split(8, seed=5)
    variant = replace(params.variant("cnn_baseline"), learning_rate=1e-3)
    keras.utils.set_random_seed(0)
    model = compile_model(build_model(variant, params), variant, steps_per_epoch=1, epochs=1)
    x, y = batch.x.astype("float32"), batch.y.astype("float32")
    losses = [float(model.train_on_batch(x, y)[0]) for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0] and losses[-1] < 0.1
    assert np.array_equal((predict(model, batch.x) >= 0.5).astype(int), batch.y)


def test_youden_threshold_maximises_tpr_minus_fpr():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    prob = np.clip(0.35 * y + rng.normal(0.4, 0.2, 200), 0, 1)
    threshold = youden_threshold(y, prob)

    def j(t):
        pred = prob >= t
        return pred[y == 1].mean() - pred[y == 0].mean()

    assert j(threshold) == pytest.approx(max(j(t) for t in np.unique(prob)))
    assert 0 <= threshold <= 1


def test_class_weights_balance_the_classes():
    y = np.array([0, 1, 1, 1, 1, 1])
    weights = class_weights(y)
    assert weights[0] == pytest.approx(3.0) and weights[1] == pytest.approx(0.6)
    assert weights[0] * (y == 0).sum() == pytest.approx(weights[1] * (y == 1).sum())


def test_sidecar_matches_the_saved_model_and_dvclive_files(params, splits, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # DVCLive looks for a DVC repo in the working directory
    variant = replace(params.variant("transfer_features"), epochs=2)
    result = train_variant(variant, params, *splits, live_dir=tmp_path / "live", verbose=0)
    meta = result.meta.to_dict()
    assert list(meta) == SIDECAR_KEYS
    assert (
        meta["variant"] == "transfer_features"
        and meta["image_size"] == SIZE
        and meta["threshold_rule"] == params.train.threshold_rule
    )
    assert meta["resize"] == params.preprocess.resize and meta["seed"] == params.seed
    assert meta["params"]["transfer"]["backbone"] == "mobilenet_v2" and meta["params"]["epochs"] == 2
    # the fixture's backbone starts from random weights: no ImageNet provenance to record
    assert meta["params"]["transfer"]["weights"] != "imagenet" and meta["weights"] == {}
    assert 1 <= meta["epochs_run"] <= 2 and meta["epochs_run"] == len(result.history["loss"])
    # The composed model (backbone + head) reproduces the validation figures the head gave.
    val = splits[1]
    assert val_summary(val.y, predict(result.model, val.x), meta["threshold"]) == pytest.approx(meta["val"])
    save_result(result, tmp_path / "tf.keras", tmp_path / "tf.json")
    reloaded = keras.saving.load_model(tmp_path / "tf.keras", safe_mode=True)
    np.testing.assert_allclose(predict(reloaded, val.x), predict(result.model, val.x), rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "tf.json").read_text()) == meta
    live = tmp_path / "live"
    for metric in ("train/loss", "train/auc", "eval/loss", "eval/roc_auc", "eval/accuracy"):
        rows = (live / "plots" / "metrics" / f"{metric}.tsv").read_text().splitlines()
        assert rows[0] == f"step\t{metric.split('/')[1]}" and len(rows) == 1 + meta["epochs_run"]
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["best"]["val_roc_auc"] == pytest.approx(meta["val"]["roc_auc"])
    assert not (live / "dvc.yaml").exists() and not (tmp_path / "dvc.yaml").exists()


def _tiny_project(tmp_path, **variant_changes):
    raw = tiny_raw_params(epochs=2)
    raw["variants"]["cnn_baseline"].update(variant_changes)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    folder = cache_dir(tmp_path / "data" / "processed", SIZE)
    for split, seed in (("train", 1), ("val", 2)):
        data = tiny_split(8, seed=seed)
        write_split(folder, split, data.x, data.rows)


def test_stage_script_end_to_end(tmp_path):
    _tiny_project(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), "cnn_baseline"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train@cnn_baseline:" in done.stdout and "Epoch 1/2" in done.stdout
    meta = json.loads((tmp_path / "models" / "cnn_baseline.json").read_text())
    assert list(meta) == SIDECAR_KEYS and meta["val"]["n"] == 8 and meta["epochs_run"] in (1, 2)
    model = keras.saving.load_model(tmp_path / "models" / "cnn_baseline.keras", safe_mode=True)
    val = tiny_split(8, seed=2)
    assert val_summary(val.y, predict(model, val.x), meta["threshold"]) == pytest.approx(meta["val"])
    live = tmp_path / "dvclive" / "cnn_baseline"
    assert json.loads((live / "metrics.json").read_text())["step"] == meta["epochs_run"] - 1
    assert (live / "plots" / "metrics" / "eval" / "roc_auc.tsv").is_file()
    stress = json.loads((tmp_path / "metrics" / "cnn_baseline_stress.json").read_text())
    assert stress["threshold"] == meta["threshold"] and stress["n"] == 8 and len(stress["shifts"]) == 15
    assert stress["shifts"]["clean"]["roc_auc"] == pytest.approx(meta["val"]["roc_auc"])
    leftovers = [p.name for p in (tmp_path / "models").iterdir()] + [p.name for p in (tmp_path / "dvclive").iterdir()]
    assert sorted(leftovers) == ["cnn_baseline", "cnn_baseline.json", "cnn_baseline.keras"]


def test_stage_script_bad_param_fails_cleanly(tmp_path, monkeypatch, capsys):
    _tiny_project(tmp_path, batch_size=64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "cnn_baseline"])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "stages" / "train.py"), run_name="__main__")
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "error: params.yaml variants.cnn_baseline.batch_size: 64 is larger than the training set (8 images); lower it"
    )
    assert not (tmp_path / "models").exists() and not [p for p in (tmp_path / "dvclive").rglob("*")]
