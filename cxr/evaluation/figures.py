"""The report's figures: test ROC curves, metric comparison, confusion matrices, training curves, Grad-CAM.

    python stages/report.py       # (dvc repro report) → plots/figures/*.png, embedded in plots/report.html

Every figure draws what evaluate and train wrote (cxr.evaluation.report.VariantResult: plots/<v>/roc.csv,
metrics/<v>.json, DVCLive logs); only the Grad-CAM grid runs a model, the selected one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on build machines
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import ConfusionMatrixDisplay

from cxr.core import paths
from cxr.core.constants import CLASSES, POSITIVE
from cxr.core.errors import CxrError
from cxr.evaluation.report import VariantResult

OUTCOMES = ("TP", "FP", "TN", "FN")
COMPARED = (
    ("accuracy", "Accuracy"),
    ("sensitivity", "Sensitivity"),
    ("specificity", "Specificity"),
    ("roc_auc", "ROC AUC"),
)
DPI = 100


def plot_roc_all(results: dict[str, VariantResult], out_png: Path) -> None:
    """Test ROC curves of all variants (plots/<v>/roc.csv), each with its operating point at the validation
    threshold."""
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for name, r in results.items():
        if r.roc.empty:  # evaluate writes no curve when the test set has one class
            continue
        auc = r.metrics.get("roc_auc")
        (line,) = ax.plot(r.roc["fpr"], r.roc["tpr"], label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
        sens, spec = r.metrics.get("sensitivity"), r.metrics.get("specificity")
        if sens is not None and spec is not None:
            ax.plot([1 - spec], [sens], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(
        xlabel="False positive rate (1 − specificity)",
        ylabel="True positive rate (sensitivity)",
        title="Test ROC (dots: validation threshold)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
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
        errors = np.array([_error_bar(v, (m.get("ci95") or {}).get(key)) for v, (key, _) in zip(values, COMPARED)]).T
        ax.bar(
            x + (i - (len(names) - 1) / 2) * width,
            [v if v is not None else 0 for v in values],
            width,
            yerr=errors,
            capsize=2,
            label=name,
        )
    ax.set_xticks(x, [label for _, label in COMPARED])
    ax.set(
        ylim=(0, 1.05),
        ylabel="Test value (95% CI, patient bootstrap)",
        title="Test metrics at each variant's validation threshold",
    )
    ax.legend(fontsize=8, ncol=min(len(names), 3), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    _save(fig, out_png)


def confusion_array(metrics: dict[str, Any]) -> np.ndarray:
    """evaluate's confusion counts (metrics/<v>.json `confusion`) as a 2×2 array: rows actual, columns predicted."""
    c = metrics["confusion"]
    return np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])


def plot_confusions(results: dict[str, VariantResult], out_png: Path) -> None:
    """One test confusion matrix per variant (rows actual, columns predicted)."""
    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, r) in zip(axes.ravel(), results.items()):
        ConfusionMatrixDisplay(confusion_array(r.metrics), display_labels=list(CLASSES)).plot(
            ax=ax, colorbar=False, cmap="Blues"
        )
        ax.set_title(name, fontsize=10)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.suptitle("Test confusion matrices at the validation threshold")
    _save(fig, out_png)


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


def make_figures(
    results: dict[str, VariantResult], curves: dict[str, dict[str, pd.DataFrame]], folder: Path
) -> tuple[dict[str, Path], list[str]]:
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


def plot_risk_coverage(name: str, curve: pd.DataFrame, ood: dict[str, Any], out_png: Path) -> None:
    """Accuracy and specificity of the answered test cases against the share answered (most
    confident first), with the refer band's own operating point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("accuracy", "-"), ("specificity", "--"), ("sensitivity", ":")):
        ax.plot(curve["coverage"], curve[key], style, label=key)
    band = ood["refer_band"]["test"]
    if band.get("coverage") is not None and band.get("accuracy") is not None:
        ax.plot(
            [band["coverage"]],
            [band["accuracy"]],
            "ko",
            label=f"refer band (accuracy, {band['coverage']:.0%} answered)",
        )
    ax.set(
        xlabel="coverage (share of test images answered)",
        ylabel="among the answered",
        xlim=(0, 1.01),
        title=f"Risk-coverage of {name} (test)",
    )
    ax.set_ylim(max(0.0, float(np.nanmin(curve[["accuracy", "specificity"]].to_numpy(dtype=float))) - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, out_png)


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
    actual_pos = predictions["actual"] == POSITIVE
    pred_pos = predictions["predicted"] == POSITIVE
    masks = {
        "TP": actual_pos & pred_pos,
        "FP": ~actual_pos & pred_pos,
        "TN": ~actual_pos & ~pred_pos,
        "FN": actual_pos & ~pred_pos,
    }
    picked = []
    for outcome in OUTCOMES:
        confidence = predictions["probability"] if outcome in ("TP", "FP") else -predictions["probability"]
        part = predictions[masks[outcome]].assign(outcome=outcome, _key=confidence[masks[outcome]])
        picked.append(part.sort_values(["_key", "path"], ascending=[False, True], kind="stable").head(per_outcome))
    return pd.concat(picked, ignore_index=True).drop(columns="_key")


def make_gradcam(
    name: str,
    predictions: pd.DataFrame,
    per_outcome: int,
    out_png: Path,
    processed: Path = paths.PROCESSED,
    models: Path = paths.MODELS,
) -> str | None:
    """Grad-CAM grid of the best variant; returns None on success or why it was skipped."""
    if per_outcome == 0:
        return "Grad-CAM disabled (report.gradcam_per_outcome = 0)"
    try:
        from cxr.evaluation.gradcam import gradcam_grid
    except ImportError as exc:
        return f"Grad-CAM unavailable (cxr.evaluation.gradcam cannot be imported: {exc})"
    from cxr.data.cache import cache_dir, load_split
    from cxr.serving.inference import load_model

    picked = gradcam_examples(predictions, per_outcome)
    if picked.empty:
        return "Grad-CAM skipped: no test predictions"
    loaded = load_model(models / f"{name}.keras")
    test = load_split(cache_dir(processed, loaded.image_size), "test")
    index = {path: i for i, path in enumerate(test.rows["path"])}
    absent = [p for p in picked["path"] if p not in index]
    if absent:
        raise CxrError(
            f"plots/{name}/predictions.csv names {absent[0]}, not in the test cache; rerun `dvc repro evaluate@{name}`"
        )
    images = np.stack([test.x[index[p]] for p in picked["path"]])
    titles = [
        f"{o} p={p:.2f} {Path(path).name}"
        for o, p, path in zip(picked["outcome"], picked["probability"], picked["path"])
    ]
    try:
        gradcam_grid(loaded.model, images, titles, out_png, ncols=per_outcome)  # one row per outcome, when full
    except CxrError as exc:  # e.g. the dense variant: no convolution layer
        return f"Grad-CAM unavailable for {name}: {' '.join(str(exc).split())}"
    except Exception as exc:  # an explanation figure must not sink the whole report; the note says why
        return f"Grad-CAM failed for {name} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
    return None
