"""Every file and folder the pipeline reads or writes, relative to the project root (DVC runs each
stage there), said once; dvc.yaml declares the same paths (tests/test_paths.py compares them).

    from cxr.core import paths
    paths.model_path("modern")                  # models/modern.keras
    paths.gate_path(paths.model_path("modern"))  # models/modern.ood.npz
    paths.metrics_path("modern", "ood")          # metrics/modern_ood.json

`name` is a variant or a k-fold ensemble `<v>_cv`. The files that sit beside a model (its
sidecar, gate and LiteRT export) follow from the model's own path, wherever that lies, so that
`cxr predict --model elsewhere/x.keras` finds them too. `root` is where the project root lies
(a training worker that is not the chief writes into a scratch root).
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(".")

RAW = Path("data/raw")
RAW_IMAGES = RAW / "chest_xray"
RAW_HASHES = RAW / "sha256.csv"  # written by fetch, so split need not hash the files again

SPLIT = Path("data/split")
MANIFEST = SPLIT / "manifest.csv"
AUDIT = SPLIT / "audit.json"

PROCESSED = Path("data/processed")  # one folder per image size (cxr.data.cache.cache_dir)

MODELS = Path("models")
METRICS = Path("metrics")
PLOTS = Path("plots")
DVCLIVE = Path("dvclive")

SUMMARY = METRICS / "summary.json"
REPORT_PAGE = PLOTS / "report.html"
FIGURES = PLOTS / "figures"


def model_path(name: str, root: Path = HERE) -> Path:
    """models/<name>.keras."""
    return root / MODELS / f"{name}.keras"


def sidecar_path(model: Path | str) -> Path:
    """models/<v>.keras → models/<v>.json (cxr.model.sidecar)."""
    return Path(model).with_suffix(".json")


def gate_path(model: Path | str) -> Path:
    """models/<v>.keras → models/<v>.ood.npz (the gate and refer band beside the model)."""
    return Path(model).with_suffix(".ood.npz")


def lite_path(model: Path | str) -> Path:
    """models/<v>.keras → models/<v>.tflite."""
    return Path(model).with_suffix(".tflite")


def lite_meta_path(model: Path | str) -> Path:
    """models/<v>.keras → models/<v>.tflite.json (output names, source hash, measured parity)."""
    return Path(model).with_suffix(".tflite.json")


def fold_paths(name: str, fold: int, root: Path = HERE) -> tuple[Path, Path, Path]:
    """models/cv/<v>/fold<k>.keras, its sidecar and its out-of-fold probabilities (.oof.csv)."""
    base = root / MODELS / "cv" / name / f"fold{fold}"
    return base.with_suffix(".keras"), base.with_suffix(".json"), base.with_suffix(".oof.csv")


def metrics_path(name: str, kind: str = "", root: Path = HERE) -> Path:
    """metrics/<name>.json (evaluate's), or metrics/<name>_<kind>.json (stress, oof, ood, export)."""
    return root / METRICS / (f"{name}_{kind}.json" if kind else f"{name}.json")


def plots_dir(name: str, root: Path = HERE) -> Path:
    """plots/<name>/: evaluate's curves and predictions, ood's risk-coverage table."""
    return root / PLOTS / name


def live_dir(name: str, root: Path = HERE) -> Path:
    """dvclive/<name>/: a variant's training curves."""
    return root / DVCLIVE / name
