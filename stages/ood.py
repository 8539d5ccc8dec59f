"""Stage `ood@<variant>`: fit the out-of-distribution gate and the refer band, and measure both.

    python stages/ood.py VARIANT     # (dvc repro ood@VARIANT) → models/VARIANT.ood.npz, metrics/VARIANT_ood.json,
                                     #   plots/VARIANT/risk_coverage.csv

The gate is fitted on the training images only and thresholded on held-out X-rays — validation and
the patient-grouped CV folds of the training images (cxr.evaluation.gate.fit_gate) —; the refer band
is set on the validation probabilities. Test labels are used only to report the
risk–coverage curve. Every measured image goes through a file and `cxr predict`'s own path
(`cxr.serving.inference.predict_files`): the official test X-rays (their false-flag rate) and each family
of things that are not chest X-rays, written as files here (seeded synthetic images, scikit-learn's
sample photos, transformed validation X-rays). The figures are cxr.evaluation.ood_report's.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_file, write_json
from cxr.core.params import ENSEMBLE_SUFFIX, Params
from cxr.core.stage import stage_args
from cxr.data.cache import CachedSplit, cache_dir, load_split
from cxr.evaluation import gate as ood
from cxr.evaluation import ood_families, ood_report, selective
from cxr.model.folds import read_oof
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.serving.inference import LoadedModel, Prediction, load_model, predict_files


def read_cache(image_size: int) -> tuple[CachedSplit, CachedSplit, CachedSplit]:
    """The train, val and test splits at the model's size."""
    folder = cache_dir(paths.PROCESSED, image_size)
    train, val, test = (load_split(folder, s) for s in ("train", "val", "test"))
    if len(train) < 2 or len(test) == 0:
        raise CxrError("the preprocessed train or test split is (nearly) empty; rerun `dvc repro split preprocess`")
    return train, val, test


def fit_gate(name: str, loaded: LoadedModel, train: CachedSplit, val: CachedSplit, params: Params) -> LoadedModel:
    """The model with its new gate: detectors fitted on train, thresholds and refer band on validation."""
    features = ood.penultimate(loaded.model)
    train_f, val_f = (ood.flatten(forward_arrays(features, s.x)) for s in (train, val))
    val_p = predict_arrays(loaded.model, val.x)
    if name.endswith(ENSEMBLE_SUFFIX):
        # The ensemble's members trained on the validation images; its refer band comes from the
        # out-of-fold predictions instead (each image scored by the member that never saw it).
        val_p = read_oof([paths.fold_paths(name.removesuffix(ENSEMBLE_SUFFIX), k)[2] for k in params.cv.folds])[
            "probability"
        ].to_numpy()
    checks = ood.Checks(params.ood.min_std, params.ood.max_colourfulness, params.ood.max_aspect)
    gate = ood.fit_gate(
        train_f,
        train.x,
        val_f,
        val.x,
        val_p,
        loaded.threshold,
        params.ood.keep_val,
        params.predict.refer_coverage,
        checks,
        params.seed,
        train_groups(train),
    )
    return replace(loaded, gate=gate, features=features)


def train_groups(train: CachedSplit) -> np.ndarray | None:
    """The training images' patient-grouped CV folds (the gate's worst_group threshold), or None
    when the split has none (split.folds: 0; the threshold is then set on validation alone)."""
    folds = train.rows["fold"].astype(int).to_numpy()
    # a negative fold is cxr.data.dataset.NO_FOLD (folds off)
    return folds if (folds >= 0).all() and len(np.unique(folds)) >= 2 else None


def predict_test(test: CachedSplit, gated: LoadedModel) -> list[Prediction]:
    """The official test X-rays, from their files as a user would pass them."""
    test_pred = predict_files(list(test.rows["path"]), gated)
    bad = [p for p in test_pred if not p.ok]
    if bad:
        raise CxrError(f"{bad[0].error}; the test files must be readable (rerun `dvc repro fetch`)")
    return test_pred


def predict_families(val: CachedSplit, gated: LoadedModel, params: Params) -> dict[str, list[Prediction]]:
    """Each family of images that are not chest X-rays, written as files and run through `cxr predict`."""
    rng = np.random.default_rng(params.seed)
    families = ood_families.synthetic_families(rng, params.ood.family_size)
    families.update(ood_families.xray_families(val.x))
    answers = {}
    with tempfile.TemporaryDirectory(prefix="cxr-ood-") as tmp:
        for family, images in families.items():
            files = ood_families.write_family(
                images, Path(tmp) / family, "jpg" if family.startswith("photos") else "png"
            )
            answers[family] = predict_files(files, gated)
    return answers


def write_outputs(name: str, gate: ood.Gate, curve: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """The gate (with its test false-flag rate) beside the model, the risk–coverage table, the metrics."""
    gate = replace(gate, meta={**gate.meta, "test_false_flag_rate": metrics["test_false_flag_rate"]})
    gate.save(paths.gate_path(paths.model_path(name)))
    with atomic_file(paths.plots_dir(name) / "risk_coverage.csv") as fh:
        pd.DataFrame(curve).to_csv(fh, index=False)
    write_json(paths.metrics_path(name, "ood"), metrics)


def print_summary(name: str, metrics: dict[str, Any]) -> None:
    rates = " ".join(f"{k}={v['flag_rate']:.2f}" for k, v in metrics["families"].items())
    b = metrics["refer_band"]
    print(f"ood@{name}: test false flags {metrics['test_false_flag_rate']:.3f}; flagged {rates}")
    print(
        f"ood@{name}: refer band [{b['low']:.4f}, {b['high']:.4f}] answers "
        f"{b['val_coverage']:.3f} of val, {b['test']['coverage']:.3f} of test"
    )


def main() -> int:
    name = stage_args(__doc__, variant="a name under params.yaml variants, or <v>_cv").variant
    params = cxr_params.load()
    params.model_variant(name)  # a variant, or a k-fold ensemble <v>_cv
    loaded = load_model(paths.model_path(name), with_gate=False)  # an old gate beside the model plays no part
    train, val, test = read_cache(loaded.image_size)
    gated = fit_gate(name, loaded, train, val, params)
    test_pred = predict_test(test, gated)
    families = ood_report.family_results(predict_families(val, gated, params), test_pred)
    # The refer band on test (labels used only to report), and the risk–coverage curve.
    curve = selective.risk_coverage(test.y, ood_report.probabilities(test_pred), loaded.threshold)
    metrics = ood_report.ood_metrics(
        gated.gate,
        loaded.threshold,
        test.y,
        test_pred,
        families,
        n_train=len(train),
        n_val=len(val),
        keep_val=params.ood.keep_val,
        refer_coverage=params.predict.refer_coverage,
    )
    write_outputs(name, gated.gate, curve, metrics)
    print_summary(name, metrics)
    return 0


if __name__ == "__main__":
    run_main(main)
