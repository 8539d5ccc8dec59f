"""Stage `report`: compare all variants, pick the best by validation AUC, write the HTML report.

python stages/report.py       # (dvc repro report) → metrics/summary.json, plots/report.html, plots/figures/*.png
"""

from __future__ import annotations

import sys

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import run_main
from cxr.core.io import atomic_dir, atomic_file, write_json
from cxr.core.provenance import git_commit
from cxr.core.stage import stage_args
from cxr.evaluation import figures as cxr_figures
from cxr.evaluation import report


def main() -> int:
    stage_args(__doc__)
    params = cxr_params.load()
    results = {name: report.load_result(name) for name in params.model_names}
    summary = report.build_summary(
        results, params.report.select_by, params.report.incumbent, params.report.select_margin
    )
    best = summary["best"]
    # ensembles have no curves of their own (their fold models train without DVCLive)
    curves = {name: report.read_training_curves(paths.live_dir(name)) for name in params.variants}
    # Figures go to a temporary folder that replaces plots/figures only when everything succeeded.
    with atomic_dir(paths.FIGURES) as tmp:
        figures, notes = cxr_figures.make_figures(results, curves, tmp)
        skipped = cxr_figures.make_gradcam(
            best, results[best].predictions, params.report.gradcam_per_outcome, tmp / "gradcam_grid.png"
        )
        ood, curve = report.read_ood(best)
        if ood is not None:
            cxr_figures.plot_risk_coverage(best, curve, ood, tmp / "risk_coverage.png")
            figures[f"Risk-coverage of {best}: accuracy and specificity of the answered test images"] = (
                tmp / "risk_coverage.png"
            )
        else:
            notes.append(f"No out-of-distribution results for {best}: run `dvc repro ood@{best}`.")
        if skipped is None:
            figures[f"Grad-CAM of {best}: most confident TP / FP / TN / FN test images"] = tmp / "gradcam_grid.png"
        else:
            notes.append(skipped)
            print(f"report: {skipped}", file=sys.stderr)
        page = report.render_html(
            report.ReportInputs(
                summary=summary,
                results=results,
                audit=report.read_audit(paths.AUDIT),
                split_strategy=params.split.strategy,
                val_fraction=params.split.val_fraction,
                figures=figures,
                notes=notes,
                commit=git_commit(short=True) or "unknown",
                machine=report.machine(),
                source=params.fetch.source,
                ood=ood,
            )
        )
        with atomic_file(paths.REPORT_PAGE) as fh:
            fh.write(page)
        write_json(paths.SUMMARY, summary)
    print(
        f"report: best = {best} by {summary['selected_by']} "
        f"({summary['variants'][best][summary['select_by']]:.4f}); plots/report.html"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
