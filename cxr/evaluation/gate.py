"""Know when not to answer: the out-of-distribution gate.

    python stages/ood.py VARIANT     # (dvc repro ood@VARIANT) fits both → models/VARIANT.ood.npz

A prediction is OUT_OF_DISTRIBUTION when the file fails a cheap image-level check (near-constant
pixels, a colour photo, an aspect ratio no chest film has) or when its OOD score is above a
threshold that keeps `ood.keep_val` of held-out X-rays in distribution. Three detectors,
each fitted on the TRAINING images only, make the score:
- a Mahalanobis distance (Lee et al. 2018, Ledoit-Wolf shrunk covariance) on the model's
  penultimate features (the input of its last Dense unit): what the classifier sees;
- a Mahalanobis distance on a 16×16 thumbnail of the input pixels: the layout of a chest film;
- a view check: a logistic regression on the same thumbnails, trained to tell the training
  X-rays from copies of them rotated (90°, 180°, 270°), flipped upside down, inverted in grey
  level or cropped to a corner (self-supervised, as in Hendrycks et al. 2019's rotation-prediction
  OOD detector). The Mahalanobis distances missed half of the upside-down, inverted and cropped
  X-rays: their thumbnails stay close to the mean film in distance while their layout is wrong.
Each detector's score is divided by its own held-out quantile at 1 − (1 − keep_val)/3 (so
their false flags add up to at most 1 − keep_val) and the OOD score is the largest of the three,
thresholded by one of two rules (fit_gate): `worst_group`, used whenever the training images
carry patient-grouped CV folds (split.folds ≥ 2), keeps ≥ keep_val of every held-out group —
validation and each fold, scored by detectors refitted without it — so the threshold carries the
spread between groups as its margin, set without a test image; `validation` keeps ≥ keep_val of
validation alone.
The gate file also carries the refer band (cxr.evaluation.selective) set on the same validation
predictions, so one file tells `cxr predict` when not to answer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr.core.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE, UNCERTAIN
from cxr.core.errors import CxrError
from cxr.core.io import atomic_file
from cxr.core.paths import gate_path as gate_path  # re-exported: cxr.serving.inference finds the gate by it
from cxr.data.images import ImageFacts
from cxr.evaluation.selective import answered, refer_band

THUMB_SIDE = 16  # pixel detectors: the input image box-averaged to 16×16 (256 values)
DETECTORS = ("features", "layout", "view")  # the OOD score's parts, in Gate.parts order
# Why an input is out of distribution, by what caught it, in words for the person reading the
# answer (the image checks first, then the three detectors); numbers stay in the JSON.
OOD_REASONS = {
    "blank": "not a chest X-ray: the image is (nearly) blank",
    "colour": "not a chest X-ray: a colour image",
    "aspect": "not a chest X-ray: too long and narrow for a chest film",
    "view": "not an upright frontal chest film (rotated, flipped, inverted or cropped?)",
    "layout": "unlike the training X-rays (the picture's layout differs)",
    "features": "unlike the training X-rays (the model's view of the image differs)",
}
_CLIP = 50.0  # the view check's logit margin is clipped before exp (no overflow)


# --- the pieces: Mahalanobis distance, thumbnails, image checks ------------------------------


@dataclass(frozen=True)
class Mahalanobis:
    """Squared Mahalanobis distance to one Gaussian (mean, Ledoit-Wolf shrunk precision)."""

    mean: np.ndarray
    precision: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Mahalanobis:
        from sklearn.covariance import LedoitWolf

        x = np.asarray(x, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 feature vectors (N, D) to fit, got shape {x.shape}")
        lw = LedoitWolf().fit(x)
        return cls(lw.location_, lw.precision_)

    def distance(self, x: np.ndarray) -> np.ndarray:
        d = np.asarray(x, np.float64) - self.mean
        # (d P) · d row by row: the matrix product goes through BLAS (a three-operand einsum
        # does not, and took 0.28 s for 200 images × 1,280 features, more than the model)
        return np.einsum("ij,ij->i", d @ self.precision, d)


def thumbnails(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, S, S, 1) → their THUMB_SIDE² box averages in [0, 1], (N, THUMB_SIDE²)."""
    out = [
        np.asarray(
            Image.fromarray(img[:, :, 0]).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), np.float64
        ).ravel()
        for img in x
    ]
    return np.stack(out) / 255.0 if out else np.zeros((0, THUMB_SIDE * THUMB_SIDE))


def view_negatives(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One wrongly presented copy of each uint8 image (N, S, S, 1): rotated 90°/180°/270°,
    flipped upside down, inverted (also upside down), or a corner of 15-50% of the side scaled
    back to S. Horizontal flips are not among them: a mirrored film is still a chest film."""
    side = x.shape[1] if len(x) else 0
    out = []
    for img, kind in zip(x[:, :, :, 0], rng.integers(0, 7, len(x))):
        if kind < 3:
            out.append(np.rot90(img, kind + 1))
        elif kind == 3:
            out.append(img[::-1])
        elif kind == 4:
            out.append(255 - img)
        elif kind == 5:
            out.append(255 - img[::-1])
        else:
            crop = max(2, int(side * rng.uniform(0.15, 0.5)))
            corner = int(rng.integers(4))
            top, left = (0 if corner < 2 else side - crop), (0 if corner % 2 == 0 else side - crop)
            patch = Image.fromarray(np.ascontiguousarray(img[top : top + crop, left : left + crop]))
            out.append(np.asarray(patch.resize((side, side), Image.Resampling.BILINEAR)))
    return np.stack(out)[..., None] if out else np.zeros_like(x)


@dataclass(frozen=True)
class ViewCheck:
    """Logistic regression on standardised thumbnails: the logit that an image is a rotated,
    flipped, inverted or cropped chest film rather than an upright, whole one."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @classmethod
    def fit(cls, x: np.ndarray, rng: np.random.Generator) -> ViewCheck:
        from sklearn.linear_model import LogisticRegression

        if len(x) < 2:
            raise ValueError(f"need at least 2 images to fit the view check, got {len(x)}")
        t = np.r_[thumbnails(x), thumbnails(view_negatives(x, rng))]
        y = np.r_[np.zeros(len(x)), np.ones(len(x))]
        mean, scale = t.mean(axis=0), t.std(axis=0) + 1e-6
        clf = LogisticRegression(C=1.0, max_iter=5000).fit((t - mean) / scale, y)
        return cls(mean, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))

    def logit(self, thumbs: np.ndarray) -> np.ndarray:
        return ((np.asarray(thumbs, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept


@dataclass(frozen=True)
class Checks:
    """The image-level checks' limits (params.yaml `ood`)."""

    min_std: float  # grey-level standard deviation at the input size, 0..255
    max_colourfulness: float
    max_aspect: float


def image_check(pixels: np.ndarray, facts: ImageFacts | None, checks: Checks) -> str | None:
    """Which cheap check says a file is not a chest X-ray ("blank", "colour", "aspect"), or None.
    `facts` is None for an array with no file behind it (only the pixel check runs)."""
    if float(np.std(pixels)) < checks.min_std:
        return "blank"
    if facts is not None and facts.colourfulness > checks.max_colourfulness:
        return "colour"
    if facts is not None and facts.aspect > checks.max_aspect:
        return "aspect"
    return None


# --- the fitted gate ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Gate:
    """What `stages/ood.py` fits and `cxr predict` applies (saved as models/<v>.ood.npz)."""

    features: Mahalanobis
    pixels: Mahalanobis
    view: ViewCheck
    feature_scale: float  # each detector's validation quantile at 1 − (1 − keep_val)/3
    pixel_scale: float
    view_scale: float  # (a logit)
    threshold: float  # on the combined score; keeps ≥ keep_val of validation in distribution
    checks: Checks
    refer_low: float
    refer_high: float
    meta: dict[str, Any]  # keep_val, refer_coverage, validation figures: for the reader

    def parts(self, features: np.ndarray, x: np.ndarray) -> np.ndarray:
        """(N, 3): each detector's score over its validation quantile (DETECTORS order)."""
        thumbs = thumbnails(x)
        view = np.exp(np.clip(self.view.logit(thumbs) - self.view_scale, -_CLIP, _CLIP))
        return np.stack(
            [
                self.features.distance(features) / self.feature_scale,
                self.pixels.distance(thumbs) / self.pixel_scale,
                view,
            ],
            axis=1,
        )

    def raw_scores(self, features: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The largest of the three scaled detector scores."""
        return self.parts(features, x).max(axis=1)

    def scores(self, features: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The OOD score of each input: > 1 is out of distribution (1 = the threshold)."""
        return self.raw_scores(features, x) / self.threshold

    def reasons(
        self, features: np.ndarray, x: np.ndarray, facts: list[ImageFacts | None]
    ) -> tuple[np.ndarray, list[str | None]]:
        """Scores and, per input, what caught it (an OOD_REASONS key: image check first) or None."""
        parts = self.parts(features, x)
        s = parts.max(axis=1) / self.threshold
        out = []
        for score, row, pixels, fact in zip(s, parts, x, facts):
            why = image_check(pixels, fact, self.checks)
            if why is None and score > 1:
                why = DETECTORS[int(np.argmax(row))]
            out.append(why)
        return s, out

    def label(self, probability: float, threshold: float, ood_detector: str | None) -> str:
        """OUT_OF_DISTRIBUTION, else UNCERTAIN inside the refer band, else the class."""
        if ood_detector is not None:
            return OUT_OF_DISTRIBUTION
        if not answered(np.array([probability]), self.refer_low, self.refer_high)[0]:
            return UNCERTAIN
        return POSITIVE if probability >= threshold else NEGATIVE

    def save(self, path: Path | str) -> None:
        header = {
            "feature_scale": self.feature_scale,
            "pixel_scale": self.pixel_scale,
            "view_scale": self.view_scale,
            "view_intercept": self.view.intercept,
            "threshold": self.threshold,
            "checks": asdict(self.checks),
            "refer_low": self.refer_low,
            "refer_high": self.refer_high,
            "meta": self.meta,
        }
        arrays = {
            "feature_mean": self.features.mean.astype(np.float32),
            "feature_precision": self.features.precision.astype(np.float32),
            "pixel_mean": self.pixels.mean,
            "pixel_precision": self.pixels.precision,
            "view_mean": self.view.mean,
            "view_scale": self.view.scale,
            "view_coef": self.view.coef,
            "header": np.array(json.dumps(header)),
        }
        with atomic_file(Path(path), "wb") as fh:
            np.savez_compressed(fh, **arrays)

    @classmethod
    def load(cls, path: Path | str) -> Gate:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                h = json.loads(str(npz["header"]))
                return cls(
                    features=Mahalanobis(
                        npz["feature_mean"].astype(np.float64), npz["feature_precision"].astype(np.float64)
                    ),
                    pixels=Mahalanobis(npz["pixel_mean"], npz["pixel_precision"]),
                    view=ViewCheck(npz["view_mean"], npz["view_scale"], npz["view_coef"], float(h["view_intercept"])),
                    feature_scale=float(h["feature_scale"]),
                    pixel_scale=float(h["pixel_scale"]),
                    view_scale=float(h["view_scale"]),
                    threshold=float(h["threshold"]),
                    checks=Checks(**h["checks"]),
                    refer_low=float(h["refer_low"]),
                    refer_high=float(h["refer_high"]),
                    meta=dict(h["meta"]),
                )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CxrError(
                f"{path}: cannot read the OOD gate "
                f"({' '.join(str(exc).split())[:160]}); rerun `dvc repro ood@<variant>`"
            ) from None


def held_out_scores(
    train_features: np.ndarray,
    train_thumbs: np.ndarray,
    train_x: np.ndarray,
    train_groups: np.ndarray,
    seed: int,
) -> list[np.ndarray]:
    """(n, 3) raw detector scores of each training fold, from detectors refitted without it."""
    out = []
    for k, g in enumerate(np.unique(train_groups)):
        held, rest = train_groups == g, train_groups != g
        f = Mahalanobis.fit(train_features[rest])
        p = Mahalanobis.fit(train_thumbs[rest])
        v = ViewCheck.fit(train_x[rest], np.random.default_rng(seed + 1 + k))
        out.append(
            np.stack(
                [f.distance(train_features[held]), p.distance(train_thumbs[held]), v.logit(train_thumbs[held])], axis=1
            )
        )
    return out


def combined(raw: np.ndarray, feature_scale: float, pixel_scale: float, view_scale: float) -> np.ndarray:
    """Raw (n, 3) detector scores → the OOD score before the threshold (as Gate.raw_scores)."""
    view = np.exp(np.clip(raw[:, 2] - view_scale, -_CLIP, _CLIP))
    return np.maximum(np.maximum(raw[:, 0] / feature_scale, raw[:, 1] / pixel_scale), view)


def fit_gate(
    train_features: np.ndarray,
    train_x: np.ndarray,
    val_features: np.ndarray,
    val_x: np.ndarray,
    val_p: np.ndarray,
    threshold: float,
    keep_val: float,
    refer_coverage: float,
    checks: Checks,
    seed: int = 0,
    train_groups: np.ndarray | None = None,
) -> Gate:
    """Fit the three detectors on the training images, scale and threshold them on held-out
    images, and set the refer band on the validation probabilities `val_p`. `seed` draws the view
    check's transformed training copies.

    Without `train_groups` (rule "validation") the held-out images are the validation split: each
    detector is scaled by its quantile at 1 − (1 − keep_val)/3 and the threshold is the combined
    score's `keep_val` quantile. With them (rule "worst_group", the patient-grouped CV folds of the
    training images) every fold is one more held-out group, scored by detectors refitted without
    it; the pixel detectors are scaled on all groups pooled, the feature detector on validation
    only (the classifier was trained on every training image, so its features of them are
    tighter), and the threshold is the largest of the groups' `keep_val` quantiles: every
    held-out group keeps ≥ keep_val, so the margin over one group's quantile is the spread
    between groups, measured without a test image. `meta["held_out"]` says how each group fares
    under the threshold set without it (leave one group out)."""
    if not 0 < keep_val <= 1:
        raise ValueError(f"keep_val must be in (0, 1], got {keep_val}")
    if len(val_x) == 0:
        raise CxrError(
            "the validation split is empty, so the OOD threshold cannot be set; rerun `dvc repro split preprocess`"
        )
    train_thumbs = thumbnails(train_x)
    features, pixels = Mahalanobis.fit(train_features), Mahalanobis.fit(train_thumbs)
    view = ViewCheck.fit(train_x, np.random.default_rng(seed))
    val_thumbs = thumbnails(val_x)
    groups = [np.stack([features.distance(val_features), pixels.distance(val_thumbs), view.logit(val_thumbs)], axis=1)]
    if train_groups is not None:
        if len(np.unique(train_groups)) < 2:
            raise CxrError(
                "the worst_group OOD threshold needs the training images in at least 2 CV folds; "
                "set split.folds >= 2 in params.yaml and rerun `dvc repro split`"
            )
        groups += held_out_scores(train_features, train_thumbs, train_x, np.asarray(train_groups), seed)
    level = 1 - (1 - keep_val) / len(DETECTORS)
    q = lambda v: float(np.quantile(v, level))  # noqa: E731  (interpolated: no score ties at exactly 1)
    pooled = np.concatenate(groups)
    feature_scale = q(groups[0][:, 0]) or 1.0
    pixel_scale = q(pooled[:, 1]) or 1.0
    view_scale = q(pooled[:, 2])
    scores = [combined(g, feature_scale, pixel_scale, view_scale) for g in groups]
    cuts = [float(np.quantile(c, keep_val, method="higher")) for c in scores]
    cut = max(cuts)
    low, high = refer_band(val_p, threshold, refer_coverage)
    meta: dict[str, Any] = {
        "keep_val": keep_val,
        "threshold_rule": "validation" if train_groups is None else "worst_group",
        "refer_coverage": refer_coverage,
        "val_in_distribution": float(np.mean(scores[0] <= cut)),
        "val_coverage": float(answered(val_p, low, high).mean()),
    }
    if len(scores) > 1:
        # Each group judged by the threshold the rule sets without it: what a new group of
        # X-rays (another hospital's week, another CPU's model) may expect.
        loo = [float(np.mean(c > max(cuts[:i] + cuts[i + 1 :]))) for i, c in enumerate(scores)]
        meta["held_out"] = {
            "groups": ["validation"] + [f"train fold {g}" for g in np.unique(train_groups)],
            "n": [len(c) for c in scores],
            "in_distribution": [float(np.mean(c <= cut)) for c in scores],
            "leave_one_out_false_flag": loo,
            "leave_one_out_false_flag_max": max(loo),
        }
    return Gate(features, pixels, view, feature_scale, pixel_scale, view_scale, cut, checks, low, high, meta)


def penultimate(model: Any) -> Any:
    """A Keras model giving `model`'s penultimate features: the input of its last Dense layer
    (found through nested models, e.g. a feature extractor composed with a trained head). For a
    k-fold ensemble (its last layer averages member models) the members' features side by side."""
    import keras

    from cxr.model.forward import called_on

    last = model.layers[-1]
    if isinstance(last, keras.layers.Average):
        members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        feats = [keras.layers.Flatten()(penultimate(m)(model.inputs[0])) for m in members]
        return keras.Model(
            model.inputs, keras.layers.Concatenate(name="members")(feats), name=f"{model.name}_penultimate"
        )
    if isinstance(last, keras.Model):
        inner = penultimate(last)
        return keras.Model(model.inputs, inner(called_on(last)), name=f"{model.name}_penultimate")
    if not isinstance(last, keras.layers.Dense):
        raise CxrError(
            f"model {model.name}: its last layer is {type(last).__name__}, "
            "not Dense, so it has no penultimate features for the OOD gate"
        )
    return keras.Model(model.inputs, last.input, name=f"{model.name}_penultimate")


def flatten(features: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, D)."""
    return np.asarray(features).reshape(len(features), -1)
