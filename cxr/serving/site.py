"""Site calibration: a hospital's own threshold for a model, set on its own labelled images.

    cxr calibrate IMAGES_DIR_OR_CSV --model M [--rule sensitivity:0.97|youden] [--out site.json] [--min-per-class 8]
    cxr predict IMAGES... --model M --site site.json        # cxr serve --model M --site site.json likewise

Input: a folder with NORMAL/ and PNEUMONIA/ (searched recursively), or a CSV with columns
`path,label` (label NORMAL or PNEUMONIA; relative paths from the CSV's folder). Every image goes
through `cxr.serving.inference.predict_files`, the pixels and model of `cxr predict`; images the
OOD gate flags keep their probability and are used (the site chose them as its own cases), and
the site file counts them. The threshold comes from `rule` by the pipeline's own threshold
functions (cxr.evaluation.site_curve.choose_site_threshold); sensitivity and specificity at it
are measured on the same images (in-sample, so optimistic) with a patient-level bootstrap 95%
interval. The site file names the model by its SHA-256 and is refused for any other model. The
model's own files are never written.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr.core.constants import CLASSES, NEGATIVE, POSITIVE
from cxr.core.errors import CxrError
from cxr.core.io import write_json
from cxr.core.provenance import sha256_file
from cxr.evaluation.gate import gate_path
from cxr.evaluation.metrics import binary_metrics, patient_bootstrap
from cxr.evaluation.site_curve import check_site_rule, choose_site_threshold, patient_ids
from cxr.model.sidecar import path_for
from cxr.serving.inference import LoadedModel, SiteThreshold, predict_files
from cxr.serving.runtime import lite_meta_path, lite_path

DEFAULT_RULE = "sensitivity:0.97"  # screening: miss at most 3% of pneumonias on the site's images
DEFAULT_MIN_PER_CLASS = 8
BOOTSTRAP_SAMPLES = 1000
FORMAT = 1  # the site file's layout version


@dataclass(frozen=True)
class SiteCalibration:
    """The site file: which model, which rule, the threshold, and what it did on the site's images."""

    model: str  # the .keras file's stem
    model_sha256: str
    rule: str
    threshold: float
    validation_threshold: float  # the sidecar's, for comparison
    n_normal: int
    n_pneumonia: int
    n_patients: int
    n_out_of_distribution: int  # flagged by the OOD gate; used all the same (see the module docstring)
    sensitivity: float
    sensitivity_ci95: list[float] | None
    specificity: float
    specificity_ci95: list[float] | None
    measured_on: str  # the figures are in-sample: the threshold was chosen on these images
    bootstrap: dict[str, Any]
    source: str  # the folder or CSV calibrated on
    created: str  # UTC, ISO 8601
    format: int = FORMAT


LabelledImages = list[tuple[Path, str]]


def read_labelled(source: Path, find_images: Callable[[Path], list[Path]]) -> LabelledImages:
    """(path, label) per image of a NORMAL/ + PNEUMONIA/ folder or a `path,label` CSV; CxrError
    (one line) for anything else. `find_images(folder)` lists a folder's images (cxr's search)."""
    source = Path(source)
    if source.is_dir():
        return _from_folder(source, find_images)
    if source.is_file():
        return _from_csv(source)
    raise CxrError(f"{source}: not found; pass a folder with NORMAL/ and PNEUMONIA/ or a CSV of path,label")


def _from_folder(folder: Path, find_images: Callable[[Path], list[Path]]) -> LabelledImages:
    items = []
    for path in find_images(folder):
        label = path.relative_to(folder).parts[0]
        if label not in CLASSES:
            raise CxrError(
                f"{path}: not under {folder}/NORMAL or {folder}/PNEUMONIA; every image needs one of the two labels"
            )
        items.append((path, label))
    return items


def _from_csv(table: Path) -> LabelledImages:
    try:
        with open(table, newline="") as fh:
            reader = csv.DictReader(fh)
            header, rows = reader.fieldnames or [], list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CxrError(f"{table}: not a readable CSV ({exc})") from None
    if not rows or not {"path", "label"} <= set(header):
        raise CxrError(f"{table}: needs a header with columns path,label and at least one row")
    items, seen = [], set()
    for line, row in enumerate(rows, start=2):
        label, name = (row.get("label") or "").strip(), (row.get("path") or "").strip()
        if label not in CLASSES:
            raise CxrError(f"{table} line {line}: label {label!r} is not {NEGATIVE} or {POSITIVE}")
        if not name:
            raise CxrError(f"{table} line {line}: empty path")
        path = Path(name) if Path(name).is_absolute() else table.parent / name
        if path in seen:
            raise CxrError(f"{table} line {line}: {name} is listed twice")
        seen.add(path)
        items.append((path, label))
    return items


def check_counts(items: LabelledImages, min_per_class: int, source: Path | str) -> None:
    """CxrError unless every class has at least `min_per_class` images."""
    if min_per_class < 1:
        raise ValueError(f"min_per_class must be at least 1, got {min_per_class}")
    for label in CLASSES:
        n = sum(lab == label for _, lab in items)
        if n < min_per_class:
            raise CxrError(
                f"{source}: {n} {label} image(s), need at least {min_per_class} of each class to set a threshold "
                "(--min-per-class)"
            )


def calibrate(
    items: LabelledImages,
    loaded: LoadedModel,
    rule: str = DEFAULT_RULE,
    min_per_class: int = DEFAULT_MIN_PER_CLASS,
    source: Path | str = "",
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[SiteCalibration, list[Any]]:
    """The site calibration of `loaded` on labelled images, and the predictions it used."""
    check_site_rule(rule)
    if loaded.site is not None or loaded.path is None:
        raise ValueError("calibrate needs the model as loaded from its .keras file, without a site threshold")
    check_counts(items, min_per_class, source)
    preds = predict_files([p for p, _ in items], loaded, batch_size)
    failed = [p for p in preds if not p.ok]
    if failed:
        raise CxrError(f"{len(failed)} of {len(preds)} image(s) could not be read, first: {failed[0].error}")
    y = np.array([lab == POSITIVE for _, lab in items], dtype=np.int32)
    p = np.array([pred.probability for pred in preds])
    patients = patient_ids([str(path) for path, _ in items])
    threshold = choose_site_threshold(rule, y, p)
    point = binary_metrics(y, p, threshold)
    ci = patient_bootstrap(y, p, patients, threshold, BOOTSTRAP_SAMPLES, seed)
    cal = SiteCalibration(
        model=loaded.path.stem,
        model_sha256=sha256_file(loaded.path),
        rule=rule,
        threshold=threshold,
        validation_threshold=loaded.meta.threshold,
        n_normal=int((y == 0).sum()),
        n_pneumonia=int((y == 1).sum()),
        n_patients=len(set(patients)),
        n_out_of_distribution=sum(bool(pred.ood) for pred in preds),
        sensitivity=point["sensitivity"],
        sensitivity_ci95=ci["sensitivity"],
        specificity=point["specificity"],
        specificity_ci95=ci["specificity"],
        measured_on="the calibration images themselves (in-sample: the threshold was chosen on them)",
        bootstrap={"unit": "patient", "samples": BOOTSTRAP_SAMPLES, "seed": seed},
        source=str(source),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return cal, preds


def model_files(model_path: Path) -> set[Path]:
    """The model's own files, which a site file must never replace."""
    model_path = Path(model_path)
    files = {model_path, path_for(model_path), gate_path(model_path), lite_path(model_path), lite_meta_path(model_path)}
    return {f.resolve() for f in files}


def check_out(path: Path | str, model_path: Path | str) -> None:
    """CxrError when `path` is one of the model's own files (e.g. its .json sidecar)."""
    if Path(path).resolve() in model_files(Path(model_path)):
        raise CxrError(f"{path}: that is one of the model's own files; write the site file elsewhere (--out)")


def write_site(cal: SiteCalibration, path: Path | str, model_path: Path | str) -> None:
    """Write the site file atomically (whole or absent); refused over one of the model's own files."""
    check_out(path, model_path)
    write_json(path, asdict(cal))


def read_site(path: Path | str, model_path: Path | str) -> SiteCalibration:
    """The site file at `path`, checked to belong to the model at `model_path` (its SHA-256)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        cal = SiteCalibration(**raw)
    except FileNotFoundError:
        raise CxrError(f"{path}: site file not found; make one with `cxr calibrate`") from None
    except (OSError, ValueError, TypeError) as exc:
        why = " ".join(str(exc).split())[:160]
        raise CxrError(f"{path}: not a site file of `cxr calibrate` ({why}); recalibrate") from None
    if cal.format != FORMAT:
        raise CxrError(f"{path}: site file format {cal.format}, this cxr reads {FORMAT}; recalibrate")
    if not isinstance(cal.threshold, (int, float)) or not math.isfinite(cal.threshold) or not 0 <= cal.threshold <= 1:
        raise CxrError(f"{path}: threshold {cal.threshold!r} is not a number in [0, 1]; recalibrate")
    actual = sha256_file(model_path)
    if actual != cal.model_sha256:
        raise CxrError(
            f"{path} was calibrated for model {cal.model} (sha256 {cal.model_sha256[:12]}), not for {model_path} "
            f"(sha256 {actual[:12]}); run `cxr calibrate` with this model"
        )
    return cal


def apply_site(loaded: LoadedModel, path: Path | str) -> tuple[LoadedModel, SiteCalibration]:
    """`loaded` answering at the site file's threshold (refer band off), and the site file."""
    if loaded.path is None:
        raise ValueError("a site file needs the model's path to check it belongs to the model")
    cal = read_site(path, loaded.path)
    return dataclasses.replace(loaded, site=SiteThreshold(float(cal.threshold), cal.rule, str(path))), cal


def summary(cal: SiteCalibration) -> str:
    """A short table of the calibration for the terminal."""

    def ci(pair: list[float] | None) -> str:
        return "-" if pair is None else f"{100 * pair[0]:.1f}–{100 * pair[1]:.1f}%"

    rows = [
        ("model", f"{cal.model} (sha256 {cal.model_sha256[:12]})"),
        ("images", f"{cal.n_normal} {NEGATIVE}, {cal.n_pneumonia} {POSITIVE}, {cal.n_patients} patient(s)"),
        ("OOD-flagged", f"{cal.n_out_of_distribution} (used all the same)"),
        ("rule", cal.rule),
        ("threshold", f"{cal.threshold:.4f} (validation threshold {cal.validation_threshold:.4f})"),
        ("sensitivity", f"{100 * cal.sensitivity:.1f}% (95% CI {ci(cal.sensitivity_ci95)}, in-sample)"),
        ("specificity", f"{100 * cal.specificity:.1f}% (95% CI {ci(cal.specificity_ci95)}, in-sample)"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + "\n"
