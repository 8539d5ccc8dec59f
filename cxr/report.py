"""The comparison of all variants: summary.json, figures and one self-contained HTML report.

    python stages/report.py       # (dvc repro report) → metrics/summary.json, plots/report.html, plots/figures/

The best variant is the one with the highest *validation* ROC AUC (ties: the first name in
alphabetical order). Test metrics are reported for every variant but never used to choose.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, confusion_matrix, roc_curve  # noqa: E402

from cxr.errors import CxrError  # noqa: E402

SELECTED_BY = "validation roc_auc"
OUTCOMES = ("TP", "FP", "TN", "FN")
CLASSES = ("NORMAL", "PNEUMONIA")
COMPARED = (("accuracy", "Accuracy"), ("sensitivity", "Sensitivity"), ("specificity", "Specificity"), ("roc_auc", "ROC AUC"))
PREDICTION_COLUMNS = ("path", "label", "probability", "actual", "predicted")
DATA_SOURCE = "Kermany et al. 2018, Mendeley Data doi:10.17632/rscbjbr9sj (CC BY 4.0)"
# Published class mix, used only when the audit does not give this run's counts.
PUBLISHED_PNEUMONIA_SHARE = {"test": 0.625, "train": 0.74}
DPI = 100


@dataclass
class VariantResult:
    """One variant's evaluation (metrics/<v>.json), sidecar (models/<v>.json) and test predictions."""

    name: str
    metrics: dict[str, Any]
    sidecar: dict[str, Any]
    predictions: pd.DataFrame

    @property
    def val_roc_auc(self) -> float | None:
        value = _dict(self.sidecar.get("val")).get("roc_auc")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _dict(value: Any) -> dict[str, Any]:
    """`value` if it is a mapping, else {}: JSON written by other stages is read defensively."""
    return value if isinstance(value, dict) else {}


def _read_json(path: Path, hint: str) -> Any:
    if not path.is_file():
        raise CxrError(f"{path} not found; {hint}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CxrError(f"{path} is not valid JSON ({exc}); {hint}") from None


def load_result(name: str, root: Path = Path(".")) -> VariantResult:
    """Read one variant's outputs of train and evaluate; CxrError naming a missing/bad file."""
    hint = f"run `dvc repro evaluate@{name}`"
    metrics = _read_json(root / "metrics" / f"{name}.json", hint)
    sidecar = _read_json(root / "models" / f"{name}.json", f"run `dvc repro train@{name}`")
    if not isinstance(metrics, dict) or not isinstance(sidecar, dict):
        raise CxrError(f"metrics/{name}.json and models/{name}.json must hold JSON objects; {hint}")
    pred_path = root / "plots" / name / "predictions.csv"
    if not pred_path.is_file():
        raise CxrError(f"{pred_path} not found; {hint}")
    try:
        predictions = pd.read_csv(pred_path, dtype={"path": str, "actual": str, "predicted": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CxrError(f"{pred_path} is not a readable CSV ({' '.join(str(exc).split())}); {hint}") from None
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise CxrError(f"{pred_path} lacks column(s) {', '.join(missing)}; {hint}")
    return VariantResult(name, metrics, sidecar, predictions)


def read_audit(path: Path) -> dict[str, Any]:
    """The split stage's audit, or {} when absent (the report then says so)."""
    if not path.is_file():
        return {}
    audit = _read_json(path, "run `dvc repro split`")
    return audit if isinstance(audit, dict) else {}


def pick_best(val_aucs: dict[str, float | None]) -> str:
    """The variant with the highest validation AUC; ties go to the alphabetically first name."""
    known = {name: auc for name, auc in val_aucs.items() if auc is not None}
    if not known:
        raise CxrError("no variant has a validation roc_auc in its sidecar (models/<v>.json val.roc_auc); rerun `dvc repro train`")
    return min(known, key=lambda name: (-known[name], name))


def build_summary(results: dict[str, VariantResult]) -> dict[str, Any]:
    """metrics/summary.json: the best variant (by validation AUC) and each variant's test metrics."""
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
            "train_seconds": r.sidecar.get("train_seconds"),
            "epochs_run": r.sidecar.get("epochs_run"),
        }
    best = pick_best({name: r.val_roc_auc for name, r in results.items()})
    return {"best": best, "selected_by": SELECTED_BY, "variants": variants}


# ---------------------------------------------------------------------------------- figures

def plot_roc_all(results: dict[str, VariantResult], out_png: Path) -> None:
    """Test ROC curves of all variants, each with its operating point at the validation threshold."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, r in results.items():
        y, p = r.predictions["label"].to_numpy(), r.predictions["probability"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        auc = r.metrics.get("roc_auc")
        line, = ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
        sens, spec = r.metrics.get("sensitivity"), r.metrics.get("specificity")
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="False positive rate (1 − specificity)", ylabel="True positive rate (sensitivity)",
           title="Test ROC (dots: validation threshold)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, out_png)


def _error_bar(value: float | None, ci: Any) -> tuple[float, float]:
    if value is None or not isinstance(ci, (list, tuple)) or len(ci) != 2 or None in ci:
        return (0.0, 0.0)
    # A percentile interval need not contain the point estimate; matplotlib wants lengths ≥ 0.
    return (max(value - ci[0], 0.0), max(ci[1] - value, 0.0))


def plot_comparison(results: dict[str, VariantResult], out_png: Path) -> None:
    """Grouped bars of test accuracy/sensitivity/specificity/AUC with patient-bootstrap 95% CIs."""
    names = list(results)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(COMPARED))
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(COMPARED) + 0.4 * len(names)), 4.5))
    for i, name in enumerate(names):
        m = results[name].metrics
        values = [m.get(key) for key, _ in COMPARED]
        errors = np.array([_error_bar(v, _dict(m.get("ci95")).get(key)) for v, (key, _) in zip(values, COMPARED)]).T
        ax.bar(x + (i - (len(names) - 1) / 2) * width, [v if v is not None else 0 for v in values], width,
               yerr=errors, capsize=2, label=name)
    ax.set_xticks(x, [label for _, label in COMPARED])
    ax.set(ylim=(0, 1.05), ylabel="Test value (95% CI, patient bootstrap)", title="Test metrics at each variant's validation threshold")
    ax.legend(fontsize=8, ncol=min(len(names), 3), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    _save(fig, out_png)


def plot_confusions(results: dict[str, VariantResult], out_png: Path) -> None:
    """One test confusion matrix per variant (rows actual, columns predicted)."""
    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.ravel(), results.items()):
        cm = confusion_matrix(r.predictions["actual"], r.predictions["predicted"], labels=list(CLASSES))
        ConfusionMatrixDisplay(cm, display_labels=list(CLASSES)).plot(ax=ax, colorbar=False, cmap="Blues")
        ax.set_title(name, fontsize=10)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("Test confusion matrices at the validation threshold")
    _save(fig, out_png)


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
        curves[tsv.relative_to(base).with_suffix("").as_posix()] = pd.DataFrame({"step": step, "value": df[value_cols[-1]]})
    return curves


def plot_training_curves(curves: dict[str, dict[str, pd.DataFrame]], out_png: Path) -> bool:
    """One panel per metric (loss, auc, …): solid train, dashed validation per variant. False if none."""
    by_metric: dict[str, list[tuple[str, str, pd.DataFrame]]] = {}
    for variant, named in curves.items():
        for name, df in named.items():
            stage, _, metric = name.rpartition("/")
            by_metric.setdefault(metric, []).append((variant, stage, df))
    if not by_metric:
        return False
    metrics = sorted(by_metric)
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(6.0, 4.5 * len(metrics)), 4.2), squeeze=False)
    colors = {v: f"C{i % 10}" for i, v in enumerate(curves)}
    for ax, metric in zip(axes[0], metrics):
        for variant, stage, df in by_metric[metric]:
            style = "--" if stage in ("eval", "val", "validation") else "-"
            ax.plot(df["step"], df["value"], style, color=colors[variant])
        ax.set(title=metric, xlabel="epoch")
    # one legend entry per variant (colour); the line style is explained in the title
    handles = [plt.Line2D([], [], color=c, label=v) for v, c in colors.items() if curves[v]]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3), fontsize=8)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(handles) / 3) + 0.02, 1, 0.93))
    fig.suptitle("Training curves (solid: train, dashed: validation)")
    _save(fig, out_png, tight=False)
    return True


def make_figures(results: dict[str, VariantResult], curves: dict[str, dict[str, pd.DataFrame]], folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Write the comparison figures into `folder`; returns caption → PNG, and notes on what is missing."""
    figures = {
        "ROC curves of all variants (test)": (plot_roc_all, folder / "roc_all.png"),
        "Test metrics with 95% patient-bootstrap intervals": (plot_comparison, folder / "comparison.png"),
        "Confusion matrices (test, validation threshold)": (plot_confusions, folder / "confusion_matrices.png"),
    }
    for plot, png in figures.values():
        plot(results, png)
    out = {caption: png for caption, (_, png) in figures.items()}
    notes = []
    if plot_training_curves(curves, folder / "training_curves.png"):
        out["Training curves"] = folder / "training_curves.png"
    else:
        notes.append("No training curves found under dvclive/<variant>/plots/metrics.")
    return out, notes


def _save(fig: Any, out_png: Path, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)


# --------------------------------------------------------------------------------- Grad-CAM

def gradcam_examples(predictions: pd.DataFrame, per_outcome: int) -> pd.DataFrame:
    """The `per_outcome` most confident test images of each outcome (TP, FP, TN, FN).

    Confident = highest probability among predicted pneumonia, lowest among predicted normal;
    ties go by path, so the pick is the same every run.
    """
    if per_outcome < 0:
        raise ValueError(f"report.gradcam_per_outcome must be ≥ 0, got {per_outcome}")
    actual_pos = predictions["actual"] == "PNEUMONIA"
    pred_pos = predictions["predicted"] == "PNEUMONIA"
    masks = {"TP": actual_pos & pred_pos, "FP": ~actual_pos & pred_pos, "TN": ~actual_pos & ~pred_pos, "FN": actual_pos & ~pred_pos}
    picked = []
    for outcome in OUTCOMES:
        confidence = predictions["probability"] if outcome in ("TP", "FP") else -predictions["probability"]
        part = predictions[masks[outcome]].assign(outcome=outcome, _key=confidence[masks[outcome]])
        picked.append(part.sort_values(["_key", "path"], ascending=[False, True], kind="stable").head(per_outcome))
    return pd.concat(picked, ignore_index=True).drop(columns="_key")


def make_gradcam(name: str, predictions: pd.DataFrame, per_outcome: int, out_png: Path, processed: Path = Path("data/processed"), models: Path = Path("models")) -> str | None:
    """Grad-CAM grid of the best variant; returns None on success or why it was skipped."""
    if per_outcome == 0:
        return "Grad-CAM disabled (report.gradcam_per_outcome = 0)"
    try:
        from cxr.gradcam import gradcam_grid
    except ImportError as exc:
        return f"Grad-CAM unavailable (cxr.gradcam cannot be imported: {exc})"
    from cxr.cache import cache_dir, load_split
    from cxr.inference import load_model

    picked = gradcam_examples(predictions, per_outcome)
    if picked.empty:
        return "Grad-CAM skipped: no test predictions"
    loaded = load_model(models / f"{name}.keras")
    test = load_split(cache_dir(processed, loaded.image_size), "test")
    index = {path: i for i, path in enumerate(test.rows["path"])}
    absent = [p for p in picked["path"] if p not in index]
    if absent:
        raise CxrError(f"plots/{name}/predictions.csv names {absent[0]}, not in the test cache; rerun `dvc repro evaluate@{name}`")
    images = np.stack([test.x[index[p]] for p in picked["path"]])
    titles = [f"{o} p={p:.2f} {Path(path).name}" for o, p, path in zip(picked["outcome"], picked["probability"], picked["path"])]
    try:
        gradcam_grid(loaded.model, images, titles, out_png, ncols=per_outcome)  # one row per outcome, when full
    except CxrError as exc:  # e.g. the dense variant: no convolution layer
        return f"Grad-CAM unavailable for {name}: {' '.join(str(exc).split())}"
    except Exception as exc:  # an explanation figure must not sink the whole report; the note says why
        return f"Grad-CAM failed for {name} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
    return None


# ------------------------------------------------------------------------------------- HTML

def git_commit(cwd: Path = Path(".")) -> str:
    """Short commit hash of the working tree, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def machine() -> str:
    """What ran the report: OS, CPU architecture and count."""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "—"


def _with_ci(value: Any, ci: Any) -> str:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
        return f"{_num(value)} <span class=ci>[{_num(ci[0])}–{_num(ci[1])}]</span>"
    return _num(value)


def pneumonia_share(audit: dict[str, Any], split: str) -> float | None:
    """Fraction of pneumonia images in one split per the audit's counts, or None."""
    counts = _dict(_dict(_dict(audit.get("counts")).get(split)).get("by_label"))
    total = sum(v for v in counts.values() if isinstance(v, (int, float)))
    return counts.get("PNEUMONIA", 0) / total if total else None


def split_description(strategy: str, val_fraction: float) -> str:
    """One sentence on how validation was made (from params.split)."""
    if strategy == "patient_grouped":
        return (f"patient_grouped: validation is {val_fraction:.0%} of the training patients (stratified by class and "
                "subtype; children sharing an identical image are kept together), so no child is in both train and "
                "validation; the official test set is kept as published.")
    if strategy == "seed":
        return ("seed: the seed notebook's protocol, 16 NORMAL and 16 PNEUMONIA (8 bacterial, 8 viral) test images "
                "moved to validation; validation images may share patients with the test set.")
    return f"{strategy}"


def _data_table(audit: dict[str, Any]) -> str:
    counts = _dict(audit.get("counts"))
    if not counts:
        return "<p>No data audit found (data/split/audit.json); run <code>dvc repro split</code>.</p>"
    head = "<tr><th>split</th><th>images</th><th>patients</th><th>NORMAL</th><th>PNEUMONIA</th><th>bacteria</th><th>virus</th><th>% pneumonia</th></tr>"
    body = []
    for split in [s for s in ("train", "val", "test") if s in counts] + sorted(set(counts) - {"train", "val", "test"}):
        c = _dict(counts[split])
        lab, sub = _dict(c.get("by_label")), _dict(c.get("by_subtype"))
        share = pneumonia_share(audit, split)
        cells = [split, c.get("images", "—"), c.get("patients", "—"), lab.get("NORMAL", 0), lab.get("PNEUMONIA", 0),
                 sub.get("PNEUMONIA/bacteria", 0), sub.get("PNEUMONIA/virus", 0), f"{share:.1%}" if share is not None else "—"]
        body.append("<tr>" + "".join(f"<td>{_e(x)}</td>" for x in cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _audit_notes(audit: dict[str, Any]) -> list[str]:
    notes = []
    if isinstance(audit.get("images_found"), int):
        notes.append(f"{audit['images_found']} image files found")
    if isinstance(audit.get("excluded"), list):
        notes.append(f"{len(audit['excluded'])} excluded as unreadable")
    dup = audit.get("duplicates")
    if isinstance(dup, dict) and isinstance(dup.get("groups"), int):
        notes.append(f"{dup['groups']} groups of byte-identical images ({dup.get('groups_across_train_test', '?')} across official train/test)")
    removed = audit.get("removed_from_train_as_test_duplicates")
    if isinstance(removed, list):
        notes.append(f"{len(removed)} training copies of test images removed")
    if isinstance(audit.get("unparsed_names"), int):
        notes.append(f"{audit['unparsed_names']} file names without a parsable patient id")
    return notes


def _comparison_table(summary: dict[str, Any], results: dict[str, VariantResult]) -> str:
    head = ("<tr><th>variant</th><th>val AUC</th><th>test AUC</th><th>accuracy</th><th>sensitivity</th>"
            "<th>specificity</th><th>sens. bacterial</th><th>sens. viral</th><th>threshold</th><th>epochs</th><th>train s</th></tr>")
    rows = []
    for name, v in summary["variants"].items():
        ci = v.get("ci95") or {}
        mark = " ★" if name == summary["best"] else ""
        cells = [f"<td>{_e(name)}{mark}</td>", f"<td>{_num(v['val_roc_auc'])}</td>"]
        cells += [f"<td>{_with_ci(v[k], ci.get(k))}</td>" for k in ("roc_auc", "accuracy", "sensitivity", "specificity")]
        by_subtype = results[name].metrics.get("sensitivity_by_subtype") or {}
        cells += [f"<td>{_num(by_subtype.get(s))}</td>" for s in ("bacteria", "virus")]
        cells += [f"<td>{_num(v['threshold'])}</td>", f"<td>{_e(v['epochs_run'] if v['epochs_run'] is not None else '—')}</td>",
                  f"<td>{_num(v['train_seconds'], 0)}</td>"]
        rows.append(f"<tr{' class=best' if mark else ''}>{''.join(cells)}</tr>")
    return f"<table class=results>{head}{''.join(rows)}</table>"


def _figure(title: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f"<figure><img alt='{_e(title)}' src='data:image/png;base64,{data}'><figcaption>{_e(title)}</figcaption></figure>"


CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}tr.best{background:#eef6ee}.ci{color:#666;font-size:.85em}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.5em .8em}.card li{margin:.25em 0}
"""


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


def executive_summary(inp: ReportInputs) -> str:
    """Two or three sentences on data, the winner and its test performance."""
    best = inp.summary["best"]
    b = inp.summary["variants"][best]
    ci = b.get("ci95") or {}
    counts = _dict(inp.audit.get("counts"))
    parts = []
    if counts:
        sizes = ", ".join(f"{_dict(counts.get(s)).get('images', '?')} {s}" for s in ("train", "val", "test") if s in counts)
        test_pat = _dict(counts.get("test")).get("patients")
        parts.append(_e(f"Images: {sizes}" + (f" ({test_pat} test patients)" if test_pat is not None else "") + "."))
    parts.append(_e(f"Split strategy: {inp.split_strategy} (see Data)."))
    parts.append(
        f"{len(inp.summary['variants'])} variants compared; <b>{_e(best)}</b> has the highest validation AUC "
        f"({_num(b['val_roc_auc'])}) and is selected. On the test set at its validation threshold "
        f"({_num(b['threshold'])}) it reaches ROC AUC {_with_ci(b['roc_auc'], ci.get('roc_auc'))}, "
        f"sensitivity {_with_ci(b['sensitivity'], ci.get('sensitivity'))} and specificity "
        f"{_with_ci(b['specificity'], ci.get('specificity'))} (95% patient-bootstrap intervals).")
    test_auc = {n: v["roc_auc"] for n, v in inp.summary["variants"].items() if v["roc_auc"] is not None}
    top = max(test_auc, key=lambda n: (test_auc[n], n)) if test_auc else best
    if top != best and test_auc[top] > (test_auc.get(best) or -1.0):
        parts.append(f"{_e(top)} has a higher test AUC ({_num(test_auc[top])}), but the test set is for reporting "
                     "only and does not change the choice.")
    return "<p>" + " ".join(parts) + "</p>"


def model_card(inp: ReportInputs) -> str:
    """Intended use, data, limitations and provenance, with this run's class mix."""
    test_share, train_share = pneumonia_share(inp.audit, "test"), pneumonia_share(inp.audit, "train")
    published = test_share is None or train_share is None
    if published:
        test_share, train_share = PUBLISHED_PNEUMONIA_SHARE["test"], PUBLISHED_PNEUMONIA_SHARE["train"]
    best = inp.results[inp.summary["best"]].sidecar
    rule = best.get("threshold_rule", "youden")
    ratio = f"about {train_share / (1 - train_share):.1f} pneumonia images per normal one" if train_share < 1 else "no normal images"
    limits = [
        "Single hospital: Guangzhou Women and Children's Medical Center; performance elsewhere (other scanners, protocols, populations) is unknown.",
        "Pediatric patients aged 1–5 only; not validated for adults or other ages.",
        f"Test-set shift: the test set is {test_share:.1%} pneumonia vs {train_share:.1%} in training, so accuracy, "
        "precision and calibration on test do not transfer to a population with another prevalence"
        + (" (published figures: this run's audit has no class counts)." if published else "."),
        f"Class imbalance: {ratio} in training; "
        f"the decision threshold is set on validation ({rule}), not on test.",
        "Labels are image-level diagnoses by the dataset's graders; bacterial/viral subtypes come from file names.",
    ]
    if "224" in inp.source:
        limits.append("Images come from a 224-pixel mirror of the data, not the original resolutions; fine detail is lost.")
    items = "".join(f"<li>{_e(x)}</li>" for x in limits)
    return (
        "<div class=card><p><b>Intended use:</b> research and teaching, not for diagnostic use.</p>"
        f"<p><b>Data source:</b> {_e(DATA_SOURCE)}: pediatric chest X-rays, NORMAL vs PNEUMONIA (bacterial, viral).</p>"
        f"<p><b>Model:</b> {_e(inp.summary['best'])} ({_e(best.get('model', '?'))}, {_e(best.get('image_size', '?'))} px), "
        f"selected by {_e(SELECTED_BY)}.</p>"
        f"<p><b>Limitations:</b></p><ul>{items}</ul>"
        f"<p><b>Provenance:</b> git commit {_e(inp.commit)}; machine: {_e(inp.machine)}.</p></div>"
    )


def render_html(inp: ReportInputs) -> str:
    """The whole report as one self-contained HTML page (inline CSS, images as data URIs)."""
    best = inp.summary["best"]
    notes = "".join(f"<p class=note>{_e(n)}</p>" for n in inp.notes)
    audit_notes = _audit_notes(inp.audit)
    figures = "".join(_figure(title, png) for title, png in inp.figures.items())
    why = (f"{_e(best)} has the highest validation ROC AUC ({_num(inp.summary['variants'][best]['val_roc_auc'])}); "
           "ties go to the alphabetically first name. Validation AUC is threshold-free and measured on data the "
           "test set never influenced; test metrics below are reported, not used to choose.")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cxr evaluation report</title><style>{CSS}</style></head>
<body>
<h1>Pneumonia vs normal on pediatric chest X-rays: evaluation report</h1>
<h2>Executive summary</h2>
{executive_summary(inp)}
{notes}
<h2>Data</h2>
{_data_table(inp.audit)}
<p>Split strategy: {_e(split_description(inp.split_strategy, inp.val_fraction))}</p>
{"<p>" + _e("; ".join(audit_notes)) + ".</p>" if audit_notes else ""}
<h2>Results (test set, at each variant's validation threshold)</h2>
{_comparison_table(inp.summary, inp.results)}
<p>Brackets: 95% intervals from a patient-level bootstrap (all images of a resampled child together). ★ = selected.</p>
<h2>Best variant: {_e(best)}</h2>
<p>{why}</p>
<h2>Figures</h2>
{figures or "<p>No figures.</p>"}
<h2>Model card</h2>
{model_card(inp)}
</body></html>
"""
