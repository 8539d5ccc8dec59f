"""Stage `ensemble@<variant>`: average a variant's k fold models into one model, `<variant>_cv`,
and choose its threshold on the out-of-fold predictions of every official-train image.

    python stages/ensemble.py VARIANT     # (dvc repro ensemble@VARIANT) → models/VARIANT_cv.{keras,json},
                                              metrics/VARIANT_cv_{oof,stress}.json

The fold models come from `train_fold@VARIANT-<k>` (models/cv/VARIANT/fold<k>.*). Each image's
out-of-fold probability comes from the one fold model that never trained on it, so the k
folds together give a validation set of all 5,216 official-train images instead of 524.
evaluate@VARIANT_cv and the report then treat the ensemble as one more variant.
"""

from __future__ import annotations

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import write_json
from cxr.core.params import ENSEMBLE_SUFFIX
from cxr.core.stage import stage_args


def main() -> int:
    name = stage_args(__doc__, variant="a name under params.yaml cv.variants").variant
    params = cxr_params.load()
    if name not in params.cv.variants:
        raise CxrError(f"'{name}' is not in params.yaml cv.variants {params.cv.variants}")
    from cxr.evaluation.metrics import binary_metrics
    from cxr.evaluation.stress import stress_summary
    from cxr.model.ensemble import build_ensemble
    from cxr.model.folds import read_oof
    from cxr.model.training import save_result
    from cxr.serving.inference import load_model

    folds = [paths.fold_paths(name, k) for k in params.cv.folds]
    oof = read_oof([oof_path for _, _, oof_path in folds])
    members = [load_model(model_path) for model_path, _, _ in folds]
    result = build_ensemble(f"{name}{ENSEMBLE_SUFFIX}", members, oof, params)
    out = f"{name}{ENSEMBLE_SUFFIX}"
    model_path = paths.model_path(out)
    save_result(result, model_path, paths.sidecar_path(model_path))
    # Per fold too, so a reader sees how much the folds differ (the noise floor of one fold model).
    per_fold = {
        int(k): binary_metrics(g["label"], g["probability"], result.meta.threshold) for k, g in oof.groupby("fold")
    }
    write_json(
        paths.metrics_path(out, "oof"),
        {
            "threshold": result.meta.threshold,
            "threshold_rule": result.meta.threshold_rule,
            "all": binary_metrics(oof["label"], oof["probability"], result.meta.threshold),
            "folds": per_fold,
        },
    )
    # Stress on out-of-fold images too: each shifted image scored by the fold model that never saw it.
    stress = stress_summary(
        oof["label"].to_numpy(), oof["probability"].to_numpy(), result.stress_prob, result.meta.threshold
    )
    write_json(paths.metrics_path(out, "stress"), stress)
    v = result.meta.val
    print(
        f"ensemble@{name}: {len(members)} fold models → "
        f"models/{out}.keras; out-of-fold n={v.n} roc_auc={v.roc_auc:.4f} "
        f"threshold={result.meta.threshold:.3f} ({result.meta.threshold_rule}) "
        f"sensitivity={v.sensitivity:.3f} specificity={v.specificity:.3f}; "
        f"mean stress roc_auc {stress['mean']['roc_auc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
