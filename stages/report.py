"""Stage `report`: compare the models, pick the headline by the declared validation rule, write the HTML report.

python stages/report.py       # (dvc repro report) the default pipeline's models (params.yaml pipeline.default)
                              #   → metrics/summary.json, plots/report.html, plots/figures/*.png
python stages/report.py all   # (dvc repro screened/dvc.yaml:report_all) every model of both pipelines,
                              #   the k-fold ensembles too → metrics/all/summary.json, plots/all/...

The headline model (`best`, which `cxr predict` and site_curve use) is the default report's. The rule
(report.select_by / incumbent / select_margin) is the same in both; when report_all picks a
screened model, that model belongs in pipeline.default.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_dir, atomic_file, write_json
from cxr.core.provenance import git_commit
from cxr.core.stage import stage_args
from cxr.evaluation import figures as cxr_figures
from cxr.evaluation import report

ALL = "all"


@dataclass(frozen=True)
class Outputs:
    summary: Path
    page: Path
    figures: Path

    @classmethod
    def of(cls, which: str | None) -> Outputs:
        """The default report's files (cxr.core.paths), or the same names under metrics/all and plots/all."""
        if which is None:
            return cls(paths.SUMMARY, paths.REPORT_PAGE, paths.FIGURES)
        return cls(
            paths.SUMMARY.parent / which / paths.SUMMARY.name,
            paths.REPORT_PAGE.parent / which / paths.REPORT_PAGE.name,
            paths.FIGURES.parent / which / paths.FIGURES.name,
        )


def default_models(params: cxr_params.Params) -> list[str]:
    """The default pipeline's variants: the keys of params.yaml `pipeline.default`; every variant and
    k-fold ensemble when params.yaml splits nothing off (it has no `pipeline` section)."""
    raw = yaml.safe_load(cxr_params.PARAMS_FILE.read_text()) or {}
    if "pipeline" not in raw:
        return params.model_names
    names = list((raw["pipeline"] or {}).get("default") or {})
    if not names:
        raise CxrError("params.yaml pipeline.default names no variant; list the models the default report compares")
    return names


def main() -> int:
    which = stage_args(
        __doc__, variant=f"'{ALL}': every model of both pipelines (default: the default pipeline's)", optional=True
    ).variant
    if which not in (None, ALL):
        raise CxrError(f"unknown report '{which}': run `python stages/report.py` or `python stages/report.py {ALL}`")
    params = cxr_params.load()
    names = params.model_names if which == ALL else default_models(params)
    for name in names:
        params.model_variant(name)  # a clear error for a name that is not a variant
    out = Outputs.of(which)
    results = {name: report.load_result(name) for name in names}
    summary = report.build_summary(
        results, params.report.select_by, params.report.incumbent, params.report.select_margin
    )
    best = summary["best"]
    # ensembles have no curves of their own (their fold models train without DVCLive)
    curves = {name: report.read_training_curves(paths.live_dir(name)) for name in names if name in params.variants}
    # Figures go to a temporary folder that replaces plots/figures only when everything succeeded.
    with atomic_dir(out.figures) as tmp:
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
        with atomic_file(out.page) as fh:
            fh.write(page)
        write_json(out.summary, summary)
    print(
        f"report: best = {best} by {summary['selected_by']} "
        f"({summary['variants'][best][summary['select_by']]:.4f}); {out.page}"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
