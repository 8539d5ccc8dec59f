"""Stress validation: the validation images under a fixed, seeded family of acquisition shifts.

    python stages/train.py VARIANT     # writes metrics/VARIANT_stress.json (the ensemble stage: VARIANT_cv_stress.json)

Validation drawn from the official train set is nearly separable (AUC ≈ 0.999), so it cannot
rank models or place a threshold that survives the shift to the official test set. Scoring the
same images after the changes a different scanner, exposure or export would make gives a
signal that is not saturated, without looking at the test set. Each shift works on the cached
uint8 (S, S, 1) images, so every variant sees the same shifted pixels at its own size.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from cxr.evaluation.metrics import binary_metrics

Shift = Callable[[Image.Image, np.random.Generator], Image.Image]


def _levels(fn: Callable[[np.ndarray], np.ndarray]) -> Shift:
    """A shift defined on float pixel values in [0, 255]."""

    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        out = fn(np.asarray(img, dtype=np.float64))
        return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), mode="L")

    return shift


def _noise(sigma: float) -> Shift:
    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        a = np.asarray(img, dtype=np.float64) + rng.normal(0.0, sigma, (img.height, img.width))
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), mode="L")

    return shift


def _zoom(factor: float) -> Shift:
    """> 1: crop the centre and enlarge (tighter collimation); < 1: shrink into a black border."""

    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        s = img.width
        inner = max(1, round(s * factor))
        scaled = img.resize((inner, inner), Image.Resampling.BILINEAR)
        out = Image.new("L", (s, s), 0)
        offset = (s - inner) // 2
        if factor >= 1:
            return scaled.crop((-offset, -offset, -offset + s, -offset + s))
        out.paste(scaled, (offset, offset))
        return out

    return shift


def _rotate(degrees: float) -> Shift:
    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return img.rotate(degrees, resample=Image.Resampling.BILINEAR, fillcolor=0)

    return shift


def _jpeg(quality: int) -> Shift:
    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("L")

    return shift


def _pad_aspect(width_ratio: float) -> Shift:
    """What `preprocess.resize: pad` does to a film that is narrower than tall: the same image
    squeezed sideways into black side bars."""

    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        s = img.width
        w = max(1, round(s * width_ratio))
        out = Image.new("L", (s, s), 0)
        out.paste(img.resize((w, s), Image.Resampling.BILINEAR), ((s - w) // 2, 0))
        return out

    return shift


def _blur(radius: float) -> Shift:
    def shift(img: Image.Image, rng: np.random.Generator) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius))

    return shift


# The family, fixed before any test figure is seen: name → shift. Strengths are what another
# scanner or export plausibly does to a chest film, not adversarial.
SHIFTS: dict[str, Shift] = {
    "exposure_dark": _levels(lambda a: a * 0.8),
    "exposure_bright": _levels(lambda a: a * 1.2 + 10),
    "contrast_low": _levels(lambda a: (a - a.mean()) * 0.7 + a.mean()),
    "contrast_high": _levels(lambda a: (a - a.mean()) * 1.3 + a.mean()),
    "gamma_0.7": _levels(lambda a: 255 * (a / 255) ** 0.7),
    "gamma_1.5": _levels(lambda a: 255 * (a / 255) ** 1.5),
    "blur": _blur(1.5),
    "noise": _noise(8.0),
    "zoom_in": _zoom(1.15),
    "zoom_out": _zoom(0.85),
    "rotate_+7": _rotate(7.0),
    "rotate_-7": _rotate(-7.0),
    "jpeg_q25": _jpeg(25),
    "pad_aspect": _pad_aspect(0.8),
}


def shifted(x: np.ndarray, name: str, seed: int) -> np.ndarray:
    """uint8 images (N, S, S, 1) under shift `name`; image i's randomness depends on (seed, i) only."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    fn = SHIFTS[name]
    out = np.empty_like(np.asarray(x, dtype=np.uint8))
    for i in range(len(x)):
        img = Image.fromarray(np.asarray(x[i, :, :, 0], dtype=np.uint8), mode="L")
        out[i, :, :, 0] = np.asarray(fn(img, np.random.default_rng([seed, i])), dtype=np.uint8)
    return out


def stress_probabilities(model: Any, x: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """P(pneumonia) of every image under each shift (through THE forward pass)."""
    from cxr.model.forward import predict_arrays

    return {name: predict_arrays(model, shifted(x, name, seed)) for name in SHIFTS}


def stress_summary(y: Any, clean: np.ndarray, probs: dict[str, np.ndarray], threshold: float) -> dict[str, Any]:
    """Per shift (and clean) the ROC AUC, sensitivity and specificity at `threshold`; plus the
    mean and worst over the shifts, the figures `report.select_by` may rank by."""
    keys = ("roc_auc", "accuracy", "sensitivity", "specificity")
    per = {"clean": {k: binary_metrics(y, clean, threshold)[k] for k in keys}}
    for name, p in probs.items():
        m = binary_metrics(y, p, threshold)
        per[name] = {k: m[k] for k in keys}
    shifts = [per[n] for n in probs]
    return {
        "threshold": threshold,
        "n": int(len(clean)),
        "mean": {k: float(np.mean([s[k] for s in shifts])) for k in keys},
        "worst": {k: float(np.min([s[k] for s in shifts])) for k in keys},
        "shifts": per,
    }
