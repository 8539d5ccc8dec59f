"""Stage `ood@<variant>`: fit the out-of-distribution gate and the refer band, and measure both.

    python stages/ood.py VARIANT     # (dvc repro ood@VARIANT) → models/VARIANT.ood.npz, metrics/VARIANT_ood.json,
                                     #   plots/VARIANT/risk_coverage.csv

The gate is fitted on the training images only and thresholded on validation (cxr.evaluation.gate); the
refer band is set on the validation probabilities. Test labels are used only to report the
risk–coverage curve. Every measured image goes through a file and `cxr predict`'s own path
(`cxr.serving.inference.predict_files`): the official test X-rays (their false-flag rate) and each family
of things that are not chest X-rays, written as files here (seeded synthetic images, scikit-learn's
sample photos, transformed validation X-rays).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxr.core import params as cxr_params
from cxr.core.constants import UNCERTAIN
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_file, write_json
from cxr.core.params import ENSEMBLE_SUFFIX
from cxr.data.cache import cache_dir, load_split
from cxr.evaluation import gate as ood
from cxr.evaluation import ood_families, selective
from cxr.model.folds import fold_paths, read_oof
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.serving.inference import load_model, predict_files

COVERAGE = 0.9  # docs/ood.md's "at 90% coverage" figures (besides the band's own)


def family_result(scores: np.ndarray, flagged: np.ndarray, test_scores: np.ndarray) -> dict:
    """Flag rate of one family, and the AUROC of the OOD score separating it from the test X-rays."""
    y = np.r_[np.ones(len(scores)), np.zeros(len(test_scores))]
    auroc = float(roc_auc_score(y, np.r_[scores, test_scores])) if len(scores) and len(test_scores) else None
    return {"n": int(len(scores)), "flag_rate": float(np.mean(flagged)) if len(flagged) else None, "auroc": auroc}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise ValueError("usage: python stages/ood.py VARIANT (a name under params.yaml variants)")
    name = sys.argv[1]
    params = cxr_params.load()
    params.model_variant(name)  # a variant, or a k-fold ensemble <v>_cv
    model_path = Path("models") / f"{name}.keras"
    loaded = load_model(model_path, with_gate=False)  # an old gate beside the model plays no part
    folder = cache_dir("data/processed", loaded.image_size)
    train, val, test = (load_split(folder, s) for s in ("train", "val", "test"))
    if len(train) < 2 or len(test) == 0:
        raise CxrError("the preprocessed train or test split is (nearly) empty; rerun `dvc repro split preprocess`")
    features = ood.penultimate(loaded.model)
    train_f, val_f = (ood.flatten(forward_arrays(features, s.x)) for s in (train, val))
    val_p = predict_arrays(loaded.model, val.x)
    if name.endswith(ENSEMBLE_SUFFIX):
        # The ensemble's members trained on the validation images; its refer band comes from the
        # out-of-fold predictions instead (each image scored by the member that never saw it).
        val_p = read_oof([fold_paths(name.removesuffix(ENSEMBLE_SUFFIX), k)[2] for k in params.cv.folds])[
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
    )
    gated = replace(loaded, gate=gate, features=features)

    # The official test X-rays, from their files as a user would pass them.
    test_pred = predict_files(list(test.rows["path"]), gated)
    bad = [p for p in test_pred if not p.ok]
    if bad:
        raise CxrError(f"{bad[0].error}; the test files must be readable (rerun `dvc repro fetch`)")
    test_scores = np.array([p.ood_score for p in test_pred])
    test_flagged = np.array([p.ood for p in test_pred])
    rng = np.random.default_rng(params.seed)
    families = ood_families.synthetic_families(rng, params.ood.family_size)
    families.update(ood_families.xray_families(val.x))
    results = {}
    with tempfile.TemporaryDirectory(prefix="cxr-ood-") as tmp:
        for family, images in families.items():
            paths = ood_families.write_family(
                images, Path(tmp) / family, "jpg" if family.startswith("photos") else "png"
            )
            preds = predict_files(paths, gated)
            results[family] = family_result(
                np.array([p.ood_score for p in preds]), np.array([p.ood for p in preds]), test_scores
            )

    # The refer band on test (labels used only to report), and the risk–coverage curve.
    y = test.y
    p = np.array([r.probability for r in test_pred])
    curve = selective.risk_coverage(y, p, loaded.threshold)
    band = selective.answered(p, gate.refer_low, gate.refer_high)
    metrics = {
        "method": "image checks + max(Mahalanobis on penultimate features, Mahalanobis on 16x16 thumbnails, view check: logistic regression on 16x16 thumbnails vs rotated/flipped/inverted/corner-cropped training copies), each scaled by its validation quantile, fitted on train",
        "threshold": gate.threshold,
        "keep_val": params.ood.keep_val,
        "val_in_distribution": gate.meta["val_in_distribution"],
        "n_train": len(train),
        "n_val": len(val),
        "test_false_flag_rate": float(test_flagged.mean()),
        "test_flagged_by": {
            why: int(n)
            for why, n in pd.Series([r.ood_reason.split(" (")[0] for r in test_pred if r.ood]).value_counts().items()
        },
        "families": results,
        "families_flag_rate": float(np.mean([r["flag_rate"] for r in results.values()])),
        "refer_band": {
            "low": gate.refer_low,
            "high": gate.refer_high,
            "target_coverage": params.predict.refer_coverage,
            "val_coverage": gate.meta["val_coverage"],
            "test": selective.answered_metrics(y, p, loaded.threshold, band),
            "test_uncertain": int(sum(r.label == UNCERTAIN for r in test_pred)),
        },
        "at_coverage_0.9": selective.at_coverage(y, p, loaded.threshold, COVERAGE),
        "full_coverage": selective.answered_metrics(y, p, loaded.threshold, np.ones(len(y), bool)),
    }
    gate = replace(gate, meta={**gate.meta, "test_false_flag_rate": metrics["test_false_flag_rate"]})
    gate.save(ood.gate_path(model_path))
    with atomic_file(Path("plots") / name / "risk_coverage.csv") as fh:
        pd.DataFrame(curve).to_csv(fh, index=False)
    write_json(Path("metrics") / f"{name}_ood.json", metrics)
    rates = " ".join(f"{k}={v['flag_rate']:.2f}" for k, v in results.items())
    b = metrics["refer_band"]
    print(f"ood@{name}: test false flags {metrics['test_false_flag_rate']:.3f}; flagged {rates}")
    print(
        f"ood@{name}: refer band [{b['low']:.4f}, {b['high']:.4f}] answers {b['val_coverage']:.3f} of val, {b['test']['coverage']:.3f} of test"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
