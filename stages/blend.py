"""Stage `blend`: an ensemble of diverse backbones, measured: its members' probabilities averaged.

    python stages/blend.py     # (dvc repro screened/dvc.yaml:blend) → metrics/blend.json, plots/blend/*.csv

The members are params.yaml `blend.members`, trained variants (declared with their reason there).
Each scores the validation and test images from its own cache, at its own input size, so no image
is resized twice. The threshold is chosen by `train.threshold_rule` on the averaged validation
probabilities (stress_youden pools the stress shifts too, each averaged over the members); the
test set only reports, with the patient-level intervals of evaluate. The blend is measured, not
served (`cxr predict` runs one model): metrics/blend.json also says whether the selection rule
(report.select_by / incumbent / select_margin) would pick it over the incumbent.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_file, write_json
from cxr.core.stage import stage_args
from cxr.data.cache import CachedSplit, cache_dir, load_split
from cxr.evaluation import report
from cxr.evaluation.metrics import binary_metrics, choose_threshold, evaluate_probabilities
from cxr.evaluation.stress import stress_probabilities, stress_summary
from cxr.model import sidecar
from cxr.model.forward import predict_arrays
from cxr.serving.inference import load_model

NAME = "blend"


def members(params: cxr_params.Params) -> list[str]:
    """params.yaml `blend.members`: two or more distinct trained variants."""
    raw = yaml.safe_load(cxr_params.PARAMS_FILE.read_text()) or {}
    names = (raw.get("blend") or {}).get("members")
    if not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names):
        raise CxrError(f"params.yaml blend.members must list two or more distinct variants, got {names!r}")
    for name in names:
        if name not in params.variants:
            raise CxrError(f"params.yaml blend.members: '{name}' is not a variant; known: {', '.join(params.variants)}")
    return names


def member_probabilities(name: str, seed: int) -> tuple[CachedSplit, CachedSplit, dict[str, Any]]:
    """One member's validation, stressed-validation and test probabilities, from its own cache."""
    loaded = load_model(paths.model_path(name), with_gate=False)
    folder = cache_dir(paths.PROCESSED, loaded.image_size)
    val, test = load_split(folder, "val"), load_split(folder, "test")
    probs = {
        "val": predict_arrays(loaded.model, val.x),
        "test": predict_arrays(loaded.model, test.x),
        "stress": stress_probabilities(loaded.model, val.x, seed),
    }
    return val, test, probs


def validation_score(name: str, select_by: str) -> float | None:
    """A trained variant's validation figure `select_by` (its sidecar and metrics/<v>_stress.json; no test file)."""
    stress = json.loads(paths.metrics_path(name, "stress").read_text())
    meta = sidecar.read(paths.model_path(name))
    return report.VariantResult(name, {}, meta, pd.DataFrame(), pd.DataFrame(), stress).score(select_by)


def same_rows(first: CachedSplit, other: CachedSplit, what: str) -> None:
    if list(first.rows["path"]) != list(other.rows["path"]):
        raise CxrError(f"the members' {what} caches list different images; rerun `dvc repro preprocess`")


def main() -> int:
    stage_args(__doc__)
    params = cxr_params.load()
    names = members(params)
    per_member = {name: member_probabilities(name, params.seed) for name in names}
    val, test, _ = per_member[names[0]]
    for name in names[1:]:
        same_rows(val, per_member[name][0], "validation")
        same_rows(test, per_member[name][1], "test")
    val_p = np.mean([p["val"] for _, _, p in per_member.values()], axis=0)
    test_p = np.mean([p["test"] for _, _, p in per_member.values()], axis=0)
    shifts = per_member[names[0]][2]["stress"]
    stressed = {s: np.mean([p["stress"][s] for _, _, p in per_member.values()], axis=0) for s in shifts}
    rule = params.train.threshold_rule
    threshold = choose_threshold(rule, val.y, val_p, stressed)
    val_m = binary_metrics(val.y, val_p, threshold)
    stress = stress_summary(val.y, val_p, stressed, threshold)
    result = evaluate_probabilities(
        test.y,
        test_p,
        test.rows,
        threshold,
        val_roc_auc=val_m["roc_auc"],
        bootstrap_samples=params.evaluate.bootstrap_samples,
        calibration_bins=params.evaluate.calibration_bins,
        seed=params.seed,
    )
    # The selection rule, on validation figures only: the blend against the incumbent's own.
    select_by, incumbent = params.report.select_by, params.report.incumbent
    blend_score = val_m["roc_auc"] if select_by == "val_roc_auc" else stress["mean"][select_by.removeprefix("stress_")]
    scores = {NAME: blend_score}
    if incumbent:
        scores[incumbent] = validation_score(incumbent, select_by)
    picked = report.pick_best(scores, incumbent, params.report.select_margin)
    metrics = {
        **result.metrics,
        "members": names,
        # each member's own figures, recomputed here the way train computed them (threshold-free)
        "member_figures": {
            name: {
                "val_roc_auc": binary_metrics(v.y, pr["val"], 0.5)["roc_auc"],
                "stress_roc_auc": stress_summary(v.y, pr["val"], pr["stress"], 0.5)["mean"]["roc_auc"],
            }
            for name, (v, _, pr) in per_member.items()
        },
        "threshold_rule": rule,
        "val": val_m,
        "stress": stress,
        "selection": {
            "select_by": select_by,
            "scores": scores,
            "incumbent": incumbent,
            "select_margin": params.report.select_margin,
            "picked": picked,
        },
    }
    for table, frame in result.tables.items():
        with atomic_file(paths.plots_dir(NAME) / f"{table}.csv") as fh:
            frame.to_csv(fh, index=False)
    write_json(paths.metrics_path(NAME), metrics)
    print(
        f"blend of {', '.join(names)}: val roc_auc {val_m['roc_auc']:.4f}, mean stress roc_auc "
        f"{stress['mean']['roc_auc']:.4f}, threshold {threshold:.3f} ({rule}); the rule picks {picked}; "
        f"test n={metrics['n_test']} roc_auc={metrics['roc_auc']:.3f}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
