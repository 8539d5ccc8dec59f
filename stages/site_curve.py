"""Site-calibration learning curve: what a hospital gets from N local labelled images.

    python stages/site_curve.py [MODEL]     # (dvc repro site_curve) plots/MODEL/predictions.csv
                                                → metrics/site_curve.json

MODEL defaults to `best` in metrics/summary.json. Reads only the committed test predictions
(path, label, probability, predicted), so no model runs: for N in NS, DRAWS draws of whole
patients stratified by class (cxr.evaluation.site_curve), a site threshold by each rule on
them, scored on the test images of the other patients; the model's validation threshold is
scored on the same held-out images for comparison. Deterministic for params.yaml `base.seed`.
"""

from __future__ import annotations

import json

import pandas as pd

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.constants import POSITIVE
from cxr.core.errors import CxrError, run_main
from cxr.core.io import write_json
from cxr.core.stage import stage_args
from cxr.evaluation.site_curve import PERCENTILES, drawable, learning_curve, patient_ids

NS = [16, 32, 64, 128]
DRAWS = 300
RULES = ["sensitivity:0.97", "youden"]
OUT = paths.metrics_path("site_curve")


def model_name(requested: str | None) -> str:
    """`requested`, else the headline model (`best` in metrics/summary.json)."""
    if requested:
        return requested
    try:
        return str(json.loads(paths.SUMMARY.read_text())["best"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CxrError(f"{paths.SUMMARY}: no `best` model to read; pass MODEL or run `dvc repro report`") from None


def table(curve: dict, ns: list[int]) -> str:
    """Per rule and N: mean (5–95%) of accuracy, sensitivity, specificity, in percent."""
    lines = [f"{'rule':<17} {'N':>4} {'drawn':>5}  {'accuracy':<19} {'sensitivity':<19} {'specificity':<19}"]
    for rule, per_n in curve.items():
        for n in ns:
            row = per_n[str(n)]
            cells = [
                f"{100 * row[m]['mean']:.1f} ({100 * row[m]['p5']:.1f}–{100 * row[m]['p95']:.1f})"
                for m in ("accuracy", "sensitivity", "specificity")
            ]
            drawn = f"{row['n_calibration']['mean']:.0f}" if "n_calibration" in row else "-"
            lines.append(f"{rule:<17} {n:>4} {drawn:>5}  " + " ".join(f"{c:<19}" for c in cells))
    return "\n".join(lines)


def main() -> int:
    args = stage_args(__doc__, variant="a model with test predictions (default: the headline model)", optional=True)
    name = model_name(args.variant)
    seed = cxr_params.load().seed
    source = paths.plots_dir(name) / "predictions.csv"
    if not source.is_file():
        raise CxrError(f"{source} not found; run `dvc repro evaluate@{name}` (or `dvc pull`)")
    rows = pd.read_csv(source)
    missing = {"path", "label", "probability", "predicted"} - set(rows.columns)
    if missing:
        raise CxrError(f"{source}: missing columns {sorted(missing)}; rerun `dvc repro evaluate@{name}`")
    files = rows["path"].astype(str).tolist()
    sizes = [n for n in NS if drawable(rows["label"].to_numpy(), n)]
    skipped = [n for n in NS if n not in sizes]
    curve = learning_curve(
        rows["label"].to_numpy(),
        rows["probability"].to_numpy(),
        patient_ids(files),
        sizes,
        DRAWS,
        RULES,
        seed,
        baseline=(rows["predicted"] == POSITIVE).to_numpy(),
    )
    write_json(
        OUT,
        {
            "model": name,
            "source": source.as_posix(),
            "n_images": len(rows),
            "n_patients": len(set(patient_ids(files))),
            "draws": DRAWS,
            "seed": seed,
            "percentiles": list(PERCENTILES),
            "unit": "whole patients, stratified by class; scored on the images of the other patients",
            "curve": curve,
            "skipped_sizes": skipped,  # N that would leave no image of a class to score
        },
    )
    print(table(curve, sizes))
    if skipped:
        print(f"skipped N = {skipped}: the test set has too few images of a class for them")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    run_main(main)
