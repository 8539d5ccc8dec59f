"""The comparison of the variants: read what train and evaluate wrote, pick the best, build the page.

    python stages/report.py       # (dvc repro report) → metrics/summary.json, plots/report.html, plots/figures/
    python stages/report.py all   # every model of both pipelines → metrics/all/summary.json, plots/all/...

Nothing is re-evaluated here: metrics, ROC points and confusion counts come from evaluate's files
(metrics/<v>.json, plots/<v>/roc.csv, plots/<v>/predictions.csv). cxr.evaluation.figures draws the figures;
templates/report.html.j2 is the page (Jinja2 with autoescape, so every value shown is escaped).

The best variant is the one with the highest *validation* figure `report.select_by` (ties: the
first name in alphabetical order), kept from `report.incumbent` unless it cuts the incumbent's
error by more than `report.select_margin` (pick_best). Test metrics are reported for every variant
but never used to choose.
"""

from __future__ import annotations

import base64
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from cxr.core import paths
from cxr.core.constants import NEGATIVE, POSITIVE, SPLITS
from cxr.core.errors import CxrError
from cxr.evaluation.metrics import specificity_by_series
from cxr.model import sidecar
from cxr.model.sidecar import Sidecar

# report.select_by → what the summary and page say the headline model was chosen by
SELECTED_BY = {
    "val_roc_auc": "validation roc_auc",
    "stress_roc_auc": "mean validation roc_auc under the stress shifts",
    "stress_specificity": "mean validation specificity under the stress shifts",
}
PREDICTION_COLUMNS = ("path", "label", "probability", "actual", "predicted")
ROC_COLUMNS = ("fpr", "tpr")
CONFUSION_KEYS = ("tn", "fp", "fn", "tp")
DATA_SOURCE = "Kermany et al. 2018, Mendeley Data doi:10.17632/rscbjbr9sj (CC BY 4.0)"
# Published class mix, used only when the audit does not give this run's counts.
PUBLISHED_PNEUMONIA_SHARE = {"test": 0.625, "train": 0.74}
TEMPLATE = "report.html.j2"


@dataclass
class VariantResult:
    """One variant's evaluation (metrics/<v>.json), sidecar (models/<v>.json), test predictions and ROC points."""

    name: str
    metrics: dict[str, Any]
    sidecar: Sidecar
    predictions: pd.DataFrame
    roc: pd.DataFrame  # fpr, tpr, threshold; empty when the test set has one class
    stress: dict[str, Any] = field(default_factory=dict)  # metrics/<v>_stress.json (validation under shifts)

    def score(self, select_by: str) -> float | None:
        """The validation figure `report.select_by` ranks by (never a test figure)."""
        if select_by == "val_roc_auc":
            return self.val_roc_auc
        value = _dict(self.stress.get("mean")).get(select_by.removeprefix("stress_"))
        return float(value) if _is_number(value) and math.isfinite(value) else None

    @property
    def val_roc_auc(self) -> float | None:
        value = self.sidecar.val.roc_auc
        return float(value) if math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a mapping, else {}: JSON written by other stages is read defensively."""
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _read_json(path: Path, hint: str) -> Any:
    if not path.is_file():
        raise CxrError(f"{path} not found; {hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not valid JSON ({exc}); {hint}") from None


def _read_csv(path: Path, columns: tuple[str, ...], hint: str, dtype: dict[str, type] | None = None) -> pd.DataFrame:
    """A CSV that must have `columns`; CxrError naming the file otherwise."""
    if not path.is_file():
        raise CxrError(f"{path} not found; {hint}")
    try:
        frame = pd.read_csv(path, dtype=dtype)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not a readable CSV ({' '.join(str(exc).split())}); {hint}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CxrError(f"{path} lacks column(s) {', '.join(missing)}; {hint}")
    return frame


def load_result(name: str, root: Path = Path(".")) -> VariantResult:
    """Read one variant's outputs of train and evaluate; CxrError naming a missing/bad file."""
    hint = f"run `dvc repro evaluate@{name}`"
    metrics_path = paths.metrics_path(name, root=root)
    metrics = _read_json(metrics_path, hint)
    meta = sidecar.read(paths.model_path(name, root))
    if not isinstance(metrics, dict):
        raise CxrError(f"{metrics_path} must hold a JSON object; {hint}")
    confusion = _dict(metrics.get("confusion"))
    if not all(isinstance(confusion.get(k), int) for k in CONFUSION_KEYS):
        raise CxrError(f"{metrics_path} lacks confusion counts ({', '.join(CONFUSION_KEYS)}); {hint}")
    if not _is_number(metrics.get("threshold")):
        raise CxrError(f"{metrics_path} lacks a numeric threshold; {hint}")
    plots = paths.plots_dir(name, root)
    predictions = _read_csv(
        plots / "predictions.csv", PREDICTION_COLUMNS, hint, {"path": str, "actual": str, "predicted": str}
    )
    roc = _read_csv(plots / "roc.csv", ROC_COLUMNS, hint)
    stress = _read_json(
        paths.metrics_path(name, "stress", root),
        f"run `dvc repro {'ensemble@' + name.removesuffix('_cv') if name.endswith('_cv') else 'train@' + name}`",
    )
    return VariantResult(name, metrics, meta, predictions, roc, _dict(stress))


def read_audit(path: Path) -> dict[str, Any]:
    """The split stage's audit, or {} when absent (the report then says so)."""
    if not path.is_file():
        return {}
    audit = _read_json(path, "run `dvc repro split`")
    return audit if isinstance(audit, dict) else {}


def read_training_curves(folder: Path) -> dict[str, pd.DataFrame]:
    """DVCLive's per-metric TSVs under `folder/plots/metrics` (e.g. train/loss, eval/auc): step, value."""
    curves: dict[str, pd.DataFrame] = {}
    base = folder / "plots" / "metrics"
    for tsv in sorted(base.rglob("*.tsv")) if base.is_dir() else []:
        try:
            df = pd.read_csv(tsv, sep="\t")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            continue  # a damaged log only loses its curve, not the report
        value_cols = [c for c in df.columns if c not in ("step", "timestamp")]
        if df.empty or not value_cols:
            continue
        step = df["step"] if "step" in df.columns else pd.Series(range(len(df)))
        curves[tsv.relative_to(base).with_suffix("").as_posix()] = pd.DataFrame(
            {"step": step, "value": df[value_cols[-1]]}
        )
    return curves


# ------------------------------------------------------------------------- selection, summary


def pick_best(scores: dict[str, float | None], incumbent: str | None = None, margin: float = 0.0) -> str:
    """The variant with the highest validation score (ties: the alphabetically first name), unless
    `incumbent` has a score and the best does not cut the incumbent's error by more than `margin`:
    then the incumbent.

    The scores are proportions near 1 (AUCs, specificities), so the margin is on the error 1 − score,
    as a fraction of the incumbent's: the best replaces it only when (1 − best) < (1 − incumbent) ×
    (1 − margin). On that scale a seed's spread is about the same at 0.990 as at 0.999, where an
    additive margin would ask the impossible of a near-perfect incumbent (0.003 above 0.9974)."""
    known = {name: score for name, score in scores.items() if score is not None}
    if not known:
        raise CxrError(
            "no variant has the validation figure report.select_by ranks by "
            "(models/<v>.json, metrics/<v>_stress.json); rerun `dvc repro train`"
        )
    best = min(known, key=lambda name: (-known[name], name))
    if incumbent in known and (1 - known[best]) >= (1 - known[incumbent]) * (1 - margin):
        return incumbent
    return best


def build_summary(
    results: dict[str, VariantResult], select_by: str = "val_roc_auc", incumbent: str | None = None, margin: float = 0.0
) -> dict[str, Any]:
    """metrics/summary.json: the best variant (by `select_by`, a validation figure, switching from
    `incumbent` only by more than `margin`) and each variant's test metrics next to its validation
    and stress figures."""
    variants = {}
    for name, r in results.items():
        m = r.metrics
        variants[name] = {
            "accuracy": m.get("accuracy"),
            "sensitivity": m.get("sensitivity"),
            "specificity": m.get("specificity"),
            "roc_auc": m.get("roc_auc"),
            "ci95": m.get("ci95", {}),
            "threshold": m.get("threshold"),
            "val_roc_auc": r.val_roc_auc,
            "stress_roc_auc": r.score("stress_roc_auc"),
            "stress_specificity": r.score("stress_specificity"),
            "threshold_rule": r.sidecar.threshold_rule,
            "train_seconds": r.sidecar.train_seconds,
            "epochs_run": r.sidecar.epochs_run,
        }
    best = pick_best({name: r.score(select_by) for name, r in results.items()}, incumbent, margin)
    rule = (
        {"select_by": select_by}
        if incumbent is None
        else {
            "select_by": select_by,
            "incumbent": incumbent,
            "select_margin": margin,
            "select_margin_scale": "the share of the incumbent's error 1 - select_by a challenger must cut",
        }
    )
    return {"best": best, "selected_by": SELECTED_BY[select_by], **rule, "variants": variants}


def series_specificity(results: dict[str, VariantResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant, test specificity per file-name series of the normal images (from predictions.csv)."""
    return {
        name: specificity_by_series(
            r.predictions["label"], r.predictions["probability"], r.predictions["path"], r.metrics["threshold"]
        )
        for name, r in results.items()
    }


# ------------------------------------------------------------------------------ page context


def machine() -> str:
    """What ran the report: OS, CPU architecture and count."""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def pneumonia_share(audit: dict[str, Any], split: str) -> float | None:
    """Fraction of pneumonia images in one split per the audit's counts, or None."""
    counts = _dict(_dict(_dict(audit.get("counts")).get(split)).get("by_label"))
    total = sum(v for v in counts.values() if isinstance(v, (int, float)))
    return counts.get(POSITIVE, 0) / total if total else None


def split_description(strategy: str, val_fraction: float) -> str:
    """One sentence on how validation was made (from params.split)."""
    if strategy == "patient_grouped":
        return (
            f"patient_grouped: validation is {val_fraction:.0%} of the training patients (stratified by class and "
            "subtype; children sharing an identical image are kept together), so no child is in both train and "
            "validation; the official test set is kept as published."
        )
    if strategy == "seed":
        return (
            "seed: the seed notebook's protocol, 16 NORMAL and 16 PNEUMONIA (8 bacterial, 8 viral) test images "
            "moved to validation; validation images may share patients with the test set."
        )
    return f"{strategy}"


def data_rows(audit: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per split of the audit's counts (train, val, test first); [] without an audit."""
    counts = _dict(audit.get("counts"))
    rows = []
    for split in [s for s in SPLITS if s in counts] + sorted(set(counts) - set(SPLITS)):
        c = _dict(counts[split])
        lab, sub = _dict(c.get("by_label")), _dict(c.get("by_subtype"))
        rows.append(
            {
                "split": split,
                "images": c.get("images", "—"),
                "patients": c.get("patients", "—"),
                "normal": lab.get(NEGATIVE, 0),
                "pneumonia": lab.get(POSITIVE, 0),
                "bacteria": sub.get("PNEUMONIA/bacteria", 0),
                "virus": sub.get("PNEUMONIA/virus", 0),
                "share": pneumonia_share(audit, split),
            }
        )
    return rows


def data_sizes(audit: dict[str, Any]) -> str | None:
    """'Images: N train, N val, N test (N test patients).' from the audit, or None."""
    counts = _dict(audit.get("counts"))
    if not counts:
        return None
    sizes = ", ".join(f"{_dict(counts.get(s)).get('images', '?')} {s}" for s in SPLITS if s in counts)
    test_pat = _dict(counts.get("test")).get("patients")
    return f"Images: {sizes}" + (f" ({test_pat} test patients)" if test_pat is not None else "") + "."


def audit_notes(audit: dict[str, Any]) -> list[str]:
    """Exclusions, duplicates and unparsed names the split stage recorded."""
    notes = []
    if isinstance(audit.get("images_found"), int):
        notes.append(f"{audit['images_found']} image files found")
    if isinstance(audit.get("excluded"), list):
        notes.append(f"{len(audit['excluded'])} excluded as unreadable")
    dup = audit.get("duplicates")
    if isinstance(dup, dict) and isinstance(dup.get("groups"), int):
        notes.append(
            f"{dup['groups']} groups of byte-identical images "
            f"({dup.get('groups_across_train_test', '?')} across official train/test)"
        )
    removed = audit.get("removed_from_train_as_test_duplicates")
    if isinstance(removed, list):
        notes.append(f"{len(removed)} training copies of test images removed")
    if isinstance(audit.get("unparsed_names"), int):
        notes.append(f"{audit['unparsed_names']} file names without a parsable patient id")
    return notes


@dataclass
class ReportInputs:
    """What the HTML page is built from (all from this run)."""

    summary: dict[str, Any]
    results: dict[str, VariantResult]
    audit: dict[str, Any]
    split_strategy: str
    val_fraction: float
    figures: dict[str, Path]  # caption → PNG
    notes: list[str]
    commit: str
    machine: str
    source: str = ""
    ood: dict[str, Any] | None = None  # metrics/<best>_ood.json (stage ood@<best>), when present


def read_ood(name: str, root: Path = Path(".")) -> tuple[dict[str, Any] | None, pd.DataFrame | None]:
    """What stage ood@<name> measured: metrics/<name>_ood.json and plots/<name>/risk_coverage.csv,
    or (None, None) when that stage has not run for it."""
    path, curve = paths.metrics_path(name, "ood", root), paths.plots_dir(name, root) / "risk_coverage.csv"
    if not path.is_file() or not curve.is_file():
        return None, None
    hint = f"rerun `dvc repro ood@{name}`"
    return _read_json(path, hint), _read_csv(curve, ("coverage", "accuracy", "sensitivity", "specificity"), hint)


def higher_on_test(summary: dict[str, Any]) -> str | None:
    """A variant with a strictly higher test AUC than the selected one (the highest), else None."""
    test_auc = {n: v["roc_auc"] for n, v in summary["variants"].items() if v["roc_auc"] is not None}
    if not test_auc:
        return None
    top = max(test_auc, key=lambda n: (test_auc[n], n))
    return top if top != summary["best"] and test_auc[top] > (test_auc.get(summary["best"]) or -1.0) else None


def model_card(inp: ReportInputs) -> dict[str, Any]:
    """Intended use, data, limitations and provenance, with this run's class mix."""
    test_share, train_share = pneumonia_share(inp.audit, "test"), pneumonia_share(inp.audit, "train")
    published = test_share is None or train_share is None
    if published:
        test_share, train_share = PUBLISHED_PNEUMONIA_SHARE["test"], PUBLISHED_PNEUMONIA_SHARE["train"]
    best = inp.results[inp.summary["best"]].sidecar
    rule = best.threshold_rule
    ratio = (
        f"about {train_share / (1 - train_share):.1f} pneumonia images per normal one"
        if train_share < 1
        else "no normal images"
    )
    limits = [
        "Single hospital: Guangzhou Women and Children's Medical Center; "
        "performance elsewhere (other scanners, protocols, populations) is unknown.",
        "Pediatric patients aged 1–5 only; not validated for adults or other ages.",
        f"Test-set shift: the test set is {test_share:.1%} pneumonia vs {train_share:.1%} in training, so accuracy, "
        "precision and calibration on test do not transfer to a population with another prevalence"
        + (" (published figures: this run's audit has no class counts)." if published else "."),
        f"Class imbalance: {ratio} in training; the decision threshold is set on validation ({rule}), not on test.",
        "Labels are image-level diagnoses by the dataset's graders; bacterial/viral subtypes come from file names.",
    ]
    if "224" in inp.source:
        limits.append(
            "Images come from a 224-pixel mirror of the data, not the original resolutions; fine detail is lost."
        )
    return {
        "source": DATA_SOURCE,
        "model": best.model,
        "image_size": best.image_size,
        "limits": limits,
        "weights": pretrained_weights(inp.results),
    }


def pretrained_weights(results: dict[str, VariantResult]) -> list[dict[str, str]]:
    """Where each variant's ImageNet starting weights came from, as its sidecar records them."""
    return [{"variant": name, **r.sidecar.weights} for name, r in sorted(results.items()) if r.sidecar.weights]


def page_context(inp: ReportInputs) -> dict[str, Any]:
    """Everything the page shows, as plain values: the template formats and escapes them."""
    series = series_specificity(inp.results)
    val_series = {name: _dict(r.metrics.get("val_specificity_by_series")) for name, r in inp.results.items()}
    val_series = {name: by for name, by in val_series.items() if by}
    return {
        "best": inp.summary["best"],
        "variants": inp.summary["variants"],
        "selected_by": inp.summary["selected_by"],
        "stress": {name: r.stress for name, r in inp.results.items() if r.stress},
        "higher_on_test": higher_on_test(inp.summary),
        "sensitivity_by_subtype": {n: _dict(r.metrics.get("sensitivity_by_subtype")) for n, r in inp.results.items()},
        "series": series,
        "val_series": val_series,
        "val_series_names": sorted({s for by_series in val_series.values() for s in by_series}),
        "series_names": sorted({s for by_series in series.values() for s in by_series}),
        "data_sizes": data_sizes(inp.audit),
        "data_rows": data_rows(inp.audit),
        "audit_notes": audit_notes(inp.audit),
        "split_strategy": inp.split_strategy,
        "split_description": split_description(inp.split_strategy, inp.val_fraction),
        # embedded as data URIs, so the page is one self-contained file
        "figures": [
            {"caption": c, "png_base64": base64.b64encode(png.read_bytes()).decode("ascii")}
            for c, png in inp.figures.items()
        ],
        "notes": inp.notes,
        "card": model_card(inp),
        "commit": inp.commit,
        "machine": inp.machine,
        "ood": inp.ood,
    }


def number(value: Any, digits: int = 3) -> str:
    """A number with `digits` decimals, or — for a missing value (the template's `num` filter)."""
    return f"{value:.{digits}f}" if _is_number(value) else "—"


def percent(value: Any) -> str:
    """A fraction as a percentage with one decimal, or — (the template's `pct` filter)."""
    return f"{value:.1%}" if _is_number(value) else "—"


_PAGES = jinja2.Environment(
    loader=jinja2.PackageLoader("cxr.evaluation", "templates"),
    autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2")),
    undefined=jinja2.StrictUndefined,  # a misspelt name fails the report instead of vanishing from it
    trim_blocks=True,
    lstrip_blocks=True,
)
_PAGES.filters.update(num=number, pct=percent)


def render_html(inp: ReportInputs) -> str:
    """The whole report as one self-contained HTML page (inline CSS, images as data URIs)."""
    return _PAGES.get_template(TEMPLATE).render(page_context(inp))
