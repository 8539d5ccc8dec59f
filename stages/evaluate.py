"""Stage `evaluate@<variant>`: test-set metrics at the validation threshold, with patient-level CIs.

    python stages/evaluate.py VARIANT     # (dvc repro evaluate@VARIANT) → metrics/VARIANT.json, plots/VARIANT/*.csv

The decision threshold and the validation AUC come from the model's sidecar (chosen on
validation); the test set only reports. Beside the test figures, `val_specificity_by_series`:
specificity per file-name series of the normal validation images (for a k-fold ensemble, of its
out-of-fold rows: its members trained on the validation images), so a reader sees whether the
test set's weak series is weak on validation too; and `calibration`: Platt scaling fitted on
the same validation (or out-of-fold) predictions, with the ECE and Brier score before and after
on validation and test.
"""

from __future__ import annotations

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_file, write_json
from cxr.core.params import ENSEMBLE_SUFFIX
from cxr.core.stage import stage_args
from cxr.data.cache import cache_dir, load_split
from cxr.evaluation.metrics import calibration_report, evaluate_probabilities, specificity_by_series
from cxr.model.folds import read_oof
from cxr.serving.inference import load_model, predict_arrays


def main() -> int:
    name = stage_args(__doc__, variant="a name under params.yaml variants, or <v>_cv").variant
    params = cxr_params.load()
    params.model_variant(name)  # unknown name → a clear error listing the known ones (variants and <v>_cv ensembles)
    loaded = load_model(paths.model_path(name))
    test = load_split(cache_dir(paths.PROCESSED, loaded.image_size), "test")
    if len(test) == 0:
        raise CxrError("the preprocessed test split is empty; rerun `dvc repro split preprocess`")
    test_p = predict_arrays(loaded.model, test.x)
    result = evaluate_probabilities(
        test.y,
        test_p,
        test.rows,
        loaded.threshold,
        val_roc_auc=loaded.meta.val.roc_auc,
        bootstrap_samples=params.evaluate.bootstrap_samples,
        calibration_bins=params.evaluate.calibration_bins,
        seed=params.seed,
    )
    if name.endswith(ENSEMBLE_SUFFIX):
        oof = read_oof([paths.fold_paths(name.removesuffix(ENSEMBLE_SUFFIX), k)[2] for k in params.cv.folds])
        val_y, val_p, val_paths = oof["label"].to_numpy(), oof["probability"].to_numpy(), oof["path"]
    else:
        val = load_split(cache_dir(paths.PROCESSED, loaded.image_size), "val")
        val_y, val_p, val_paths = val.y, predict_arrays(loaded.model, val.x), val.rows["path"]
    result.metrics["val_specificity_by_series"] = (
        specificity_by_series(val_y, val_p, val_paths, loaded.threshold) if len(val_y) else {}
    )
    # Platt scaling fitted on validation (out-of-fold for an ensemble): does 0.5 then mean 0.5?
    if len(set(val_y.tolist())) == 2:
        result.metrics["calibration"] = calibration_report(
            val_y, val_p, test.y, test_p, params.evaluate.calibration_bins
        )
        result.metrics["calibration"]["fitted_on"] = "out-of-fold" if name.endswith(ENSEMBLE_SUFFIX) else "validation"
    # Everything is computed before anything is written: an error leaves the old outputs whole.
    for table, frame in result.tables.items():
        with atomic_file(paths.plots_dir(name) / f"{table}.csv") as fh:
            frame.to_csv(fh, index=False)
    write_json(paths.metrics_path(name), result.metrics)
    m = result.metrics
    shown = " ".join(
        f"{k}={m[k]:.3f}"
        for k in ("threshold", "accuracy", "sensitivity", "specificity", "roc_auc")
        if m[k] is not None
    )
    print(f"evaluate@{name}: n={m['n_test']} {shown}; roc_auc 95% CI {m['ci95']['roc_auc']}")
    return 0


if __name__ == "__main__":
    run_main(main)
