"""One presentation of a prediction, for every place a person reads it.

    answer(prediction, val_coverage(loaded))   # → the row of `cxr predict` (table, JSON, CSV) and of POST /predict

`cxr predict` (cxr/serving/cli.py), `POST /predict` and the page (cxr/serving/serve.py and
templates/index.html.j2) all show what this module returns, so they cannot drift: the raw
numbers of `Prediction.as_dict()` plus the texts a person reads (the page puts them on screen
verbatim; the table prints them). An out-of-distribution input gets no finding: its probability
is "not meaningful for this input" and it gets no Grad-CAM caption; its OOD score is shown as a
bounded multiple of the gate's limit (the raw score stays in `ood_score`).
"""

from __future__ import annotations

import math
from typing import Any

from cxr.core.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE, UNCERTAIN
from cxr.serving.inference import VALIDATION, LoadedModel, Prediction

NOT_MEANINGFUL = "not meaningful for this input"
OOD_CAP = 100.0  # OOD scores above this many times the limit are shown as "> 100x the limit"
# Which check of the gate (cxr.evaluation.gate: Gate.reasons keys) caught an input, in words.
DETECTORS = {
    "blank": "the blank-image check",
    "colour": "the colour check",
    "aspect": "the shape check",
    "view": "the view check",
    "layout": "the layout check (the picture against the training X-rays)",
    "features": "the feature check (what the model sees, against the training X-rays)",
}
CAPTIONS = {  # what the Grad-CAM overlay is, for the label shown (none for an input out of distribution)
    POSITIVE: "Grad-CAM: the regions that raised P(pneumonia) for this image. It shows where the model "
    "looked, not a diagnosis.",
    NEGATIVE: "Grad-CAM: what the model looked at. P(pneumonia) is below the threshold, so the highlighted "
    "regions are not evidence of disease.",
    UNCERTAIN: "Grad-CAM: the regions that raised P(pneumonia), but the model does not answer for this image "
    "(refer). The overlay is not evidence either way.",
}
# The fields answer() adds to Prediction.as_dict(), in order (the page, the table and the tests read them).
FIELDS = (
    "finding",
    "shown_probability",
    "shown_threshold",
    "ood_level",
    "refer_band",
    "refer_val_coverage",
    "reason",
    "gradcam_caption",
)


def val_coverage(loaded: LoadedModel) -> float | None:
    """The share of validation X-rays the model answers outside its refer band (the gate's
    `val_coverage`), or None when there is no band (no gate, or a site threshold)."""
    if loaded.gate is None or loaded.site is not None:
        return None
    value = loaded.gate.meta.get("val_coverage")
    return None if value is None else float(value)


def ood_level(score: float | None) -> str:
    """The OOD score as a multiple of the gate's limit, bounded: "0.35x the limit", "> 100x the limit"."""
    if score is None:
        return "no OOD gate"
    if not math.isfinite(score) or score > OOD_CAP:
        return f"> {OOD_CAP:.0f}x the limit"
    return f"{score:.2f}x the limit" if score < 10 else f"{score:.0f}x the limit"


def threshold_words(source: str) -> str:
    """Where the threshold came from: the validation X-rays, or a site file (`site:<file>`)."""
    if source == VALIDATION:
        return "chosen on the validation X-rays"
    if source.startswith("site:"):
        return f"set by the site file {source.removeprefix('site:')} (cxr calibrate)"
    return f"from {source}"


def _band(low: float | None, high: float | None) -> str | None:
    return None if low is None or high is None else f"{low:.4f} to {high:.4f}"


def _reason(p: Prediction, coverage: float | None) -> str:
    if p.error is not None:
        return p.error
    prob, thr, band = p.probability, p.threshold, _band(p.refer_low, p.refer_high)
    source = threshold_words(p.threshold_source)
    if p.label == OUT_OF_DISTRIBUTION:
        what = p.ood_reason or "not a pediatric frontal chest X-ray"
        by = DETECTORS.get(p.ood_detector or "", p.ood_detector or "the OOD gate")
        return (
            f"{what}; caught by {by}, OOD score {ood_level(p.ood_score)}. "
            "P(pneumonia) and Grad-CAM are not meaningful for this input."
        )
    if p.label == UNCERTAIN:
        answered = "" if coverage is None else f" ({coverage:.1%} of the validation X-rays)"
        return (
            f"refer: P(pneumonia) {prob:.4f} is between the low and high edge of the refer band, "
            f"{p.refer_low:.4f} and {p.refer_high:.4f}, around the threshold {thr:.4f} ({source}); "
            f"the model answers only outside the band{answered}."
        )
    side = "at or above" if p.label == POSITIVE else "below"
    text = f"P(pneumonia) {prob:.4f} is {side} the threshold {thr:.4f} ({source})"
    if band is not None:
        text += f", outside the refer band {band}"
    elif p.threshold_source != VALIDATION:
        text += "; no refer band with a site threshold"
    if p.ood is None:
        text += "; no OOD gate beside the model, so nothing checked that this is a chest X-ray"
    return text + "."


def answer(p: Prediction, coverage: float | None = None) -> dict[str, Any]:
    """The answer for one prediction: `p.as_dict()` (raw numbers, JSON's truth) plus what a person reads.

    finding: the probability (and Grad-CAM) say something about this image: True for NORMAL,
        PNEUMONIA and UNCERTAIN, False out of distribution, None for a file that failed;
    shown_probability: "0.9517", or NOT_MEANINGFUL out of distribution, or "-" after an error;
    shown_threshold: "0.4655" (where it came from is in `threshold_source` and the reason);
    ood_level: the OOD score as a bounded multiple of the gate's limit (1× = the limit);
    refer_band: "low to high" with its validation coverage, None without a band;
    refer_val_coverage: the share of validation X-rays answered outside the band (`coverage`; the
        gate's target is `refer_coverage` in its meta);
    reason: one or two sentences saying why this label;
    gradcam_caption: what the overlay shows for this label (None out of distribution or after an error).
    """
    row = p.as_dict()
    finding = None if p.error is not None else p.label != OUT_OF_DISTRIBUTION
    band = _band(p.refer_low, p.refer_high)
    if band is not None and coverage is not None:
        band += f" (outside it the model answers {coverage:.1%} of the validation X-rays)"
    if p.error is not None:
        shown = "-"
    else:
        shown = f"{p.probability:.4f}" if finding else NOT_MEANINGFUL
    row.update(
        finding=finding,
        shown_probability=shown,
        shown_threshold=f"{p.threshold:.4f}",
        ood_level="-" if p.error is not None else ood_level(p.ood_score),
        refer_band=band,
        refer_val_coverage=coverage if band is not None else None,
        reason=_reason(p, coverage),
        gradcam_caption=CAPTIONS.get(p.label or "") if finding else None,
    )
    return row


def answers(predictions: list[Prediction], loaded: LoadedModel) -> list[dict[str, Any]]:
    """`answer` for each prediction of `loaded` (its refer band's validation coverage filled in)."""
    coverage = val_coverage(loaded)
    return [answer(p, coverage) for p in predictions]
