"""Know when not to answer: the out-of-distribution gate and the refer band.

    python stages/ood.py VARIANT     # (dvc repro ood@VARIANT) fits both → models/VARIANT.ood.npz

A prediction is OUT_OF_DISTRIBUTION when the file fails a cheap image-level check (near-constant
pixels, a colour photo, an aspect ratio no chest film has) or when its OOD score is above a
threshold that keeps `ood.keep_val` of the validation X-rays in distribution. Three detectors,
each fitted on the TRAINING images only, make the score:
- a Mahalanobis distance (Lee et al. 2018, Ledoit-Wolf shrunk covariance) on the model's
  penultimate features (the input of its last Dense unit): what the classifier sees;
- a Mahalanobis distance on a 16×16 thumbnail of the input pixels: the layout of a chest film;
- a view check: a logistic regression on the same thumbnails, trained to tell the training
  X-rays from copies of them rotated (90°, 180°, 270°), flipped upside down, inverted in grey
  level or cropped to a corner (self-supervised, as in Hendrycks et al. 2019's rotation-prediction
  OOD detector). The Mahalanobis distances missed half of the upside-down, inverted and cropped
  X-rays: their thumbnails stay close to the mean film in distance while their layout is wrong.
Each detector's score is divided by its own validation quantile at 1 − (1 − keep_val)/3 (so
their false flags add up to at most 1 − keep_val) and the OOD score is the largest of the three,
thresholded at its `keep_val` quantile on validation.
An answer whose probability lies strictly inside the refer band (`refer_low`, `refer_high`)
around the threshold is UNCERTAIN (refer to a radiologist); the band is the narrowest one, in
logit distance from the threshold, that leaves `predict.refer_coverage` of the validation
predictions answered.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxr.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE, UNCERTAIN
from cxr.errors import CxrError
from cxr.images import ImageFacts
from cxr.io import atomic_file

THUMB_SIDE = 16  # pixel detectors: the input image box-averaged to 16×16 (256 values)
DETECTORS = ("features", "layout", "view")  # the OOD score's parts, in Gate.parts order
_CLIP = 50.0  # the view check's logit margin is clipped before exp (no overflow)
_EPS = 1e-12  # probabilities are clipped to [eps, 1 − eps] before the logit


def gate_path(model_path: Path | str) -> Path:
    """models/<v>.keras → models/<v>.ood.npz (the gate and refer band beside the model)."""
    return Path(model_path).with_suffix(".ood.npz")


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
    out = [np.asarray(Image.fromarray(img[:, :, 0]).resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), np.float64).ravel() for img in x]
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
    """Why a file is not a chest X-ray by the cheap checks, or None. `facts` is None for an
    array with no file behind it (only the pixel check runs)."""
    std = float(np.std(pixels))
    if std < checks.min_std:
        return f"near-constant image (grey-level std {std:.1f} < {checks.min_std:g})"
    if facts is not None and facts.colourfulness > checks.max_colourfulness:
        return f"colour image (colourfulness {facts.colourfulness:.1f} > {checks.max_colourfulness:g})"
    if facts is not None and facts.aspect > checks.max_aspect:
        return f"aspect ratio {facts.aspect:.2f} > {checks.max_aspect:g}"
    return None


# --- the refer band and the risk–coverage curve ------------------------------------------------


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def margin(p: np.ndarray, threshold: float) -> np.ndarray:
    """How far each probability is from the threshold, in logits (0 = on it)."""
    return np.abs(logit(p) - logit(threshold))


def refer_band(p: np.ndarray, threshold: float, coverage: float) -> tuple[float, float]:
    """(low, high): the narrowest band around `threshold`, symmetric in logits, that leaves at
    least `coverage` of the probabilities `p` answered (outside it: p ≤ low or p ≥ high)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    p = np.asarray(p, np.float64)
    if len(p) == 0:
        raise ValueError("need at least one probability to set the refer band")
    if coverage == 1:
        return float(threshold), float(threshold)
    # the k-th smallest margin with k = n - ceil(coverage n): the ceil(coverage n) larger ones stay answered
    m = np.sort(margin(p, threshold))
    width = float(m[len(m) - math.ceil(coverage * len(m) - 1e-9)])
    centre = float(logit(threshold))
    return 1 / (1 + math.exp(-(centre - width))), 1 / (1 + math.exp(-(centre + width)))


def answered(p: np.ndarray, low: float, high: float) -> np.ndarray:
    """True where a probability is outside the refer band (an answer is given)."""
    p = np.asarray(p, np.float64)
    return (p <= low) | (p >= high)


def _rates(y: np.ndarray, pred: np.ndarray) -> dict[str, float | None]:
    pos, neg = y == 1, y == 0
    return {
        "accuracy": float(np.mean(pred == y)) if len(y) else None,
        "sensitivity": float(np.mean(pred[pos] == 1)) if pos.any() else None,
        "specificity": float(np.mean(pred[neg] == 0)) if neg.any() else None,
    }


def answered_metrics(y: np.ndarray, p: np.ndarray, threshold: float, keep: np.ndarray) -> dict[str, Any]:
    """Coverage and accuracy / sensitivity / specificity of the answered cases (`keep`)."""
    y, p, keep = np.asarray(y), np.asarray(p, np.float64), np.asarray(keep, bool)
    pred = (p >= threshold).astype(int)
    return {"coverage": float(keep.mean()) if len(keep) else None, "n_answered": int(keep.sum()), **_rates(y[keep], pred[keep])}


def risk_coverage(y: np.ndarray, p: np.ndarray, threshold: float) -> list[dict[str, Any]]:
    """The risk–coverage curve: answering the k most confident cases (largest margin first),
    for k = 1..n, the coverage k/n and the answered cases' accuracy, sensitivity, specificity."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    order = np.argsort(-margin(p, threshold), kind="stable")
    ys, pred = y[order], (p[order] >= threshold).astype(int)
    n = len(y)
    k = np.arange(1, n + 1)
    correct, tp, tn = np.cumsum(pred == ys), np.cumsum((pred == 1) & (ys == 1)), np.cumsum((pred == 0) & (ys == 0))
    pos, neg = np.cumsum(ys == 1), np.cumsum(ys == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens, spec = tp / pos, tn / neg
    return [
        {
            "coverage": float(k[i] / n),
            "accuracy": float(correct[i] / k[i]),
            "sensitivity": None if pos[i] == 0 else float(sens[i]),
            "specificity": None if neg[i] == 0 else float(spec[i]),
        }
        for i in range(n)
    ]


def at_coverage(y: np.ndarray, p: np.ndarray, threshold: float, coverage: float) -> dict[str, Any]:
    """The answered cases' figures when the ceil(coverage·n) most confident are answered."""
    n = len(y)
    k = max(1, math.ceil(coverage * n - 1e-9))
    keep = np.zeros(n, bool)
    keep[np.argsort(-margin(p, threshold), kind="stable")[:k]] = True
    return answered_metrics(y, p, threshold, keep)


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
        return np.stack([self.features.distance(features) / self.feature_scale, self.pixels.distance(thumbs) / self.pixel_scale, view], axis=1)

    def raw_scores(self, features: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The largest of the three scaled detector scores."""
        return self.parts(features, x).max(axis=1)

    def scores(self, features: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The OOD score of each input: > 1 is out of distribution (1 = the threshold)."""
        return self.raw_scores(features, x) / self.threshold

    def reasons(self, features: np.ndarray, x: np.ndarray, facts: list[ImageFacts | None]) -> tuple[np.ndarray, list[str | None]]:
        """Scores and, per input, why it is out of distribution (image check first) or None."""
        parts = self.parts(features, x)
        s = parts.max(axis=1) / self.threshold
        why_part = {
            "features": "unlike the training X-rays to the model",
            "layout": "unlike the training X-rays in layout",
            "view": "not an upright, whole chest film (rotated, flipped, inverted or cropped?)",
        }
        out = []
        for score, row, pixels, fact in zip(s, parts, x, facts):
            why = image_check(pixels, fact, self.checks)
            if why is None and score > 1:
                why = f"{why_part[DETECTORS[int(np.argmax(row))]]} (OOD score {score:.2f} > 1)"
            out.append(why)
        return s, out

    def label(self, probability: float, threshold: float, ood_reason: str | None) -> str:
        """OUT_OF_DISTRIBUTION, else UNCERTAIN inside the refer band, else the class."""
        if ood_reason is not None:
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
                    features=Mahalanobis(npz["feature_mean"].astype(np.float64), npz["feature_precision"].astype(np.float64)),
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
            raise CxrError(f"{path}: cannot read the OOD gate ({' '.join(str(exc).split())[:160]}); rerun `dvc repro ood@<variant>`") from None


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
) -> Gate:
    """Fit the three detectors on the training images, scale each by its validation quantile at
    1 − (1 − keep_val)/3, threshold their maximum at its `keep_val` quantile (so ≥ keep_val of
    validation is in), and set the refer band on the validation probabilities `val_p`. `seed`
    draws the view check's transformed training copies."""
    if not 0 < keep_val <= 1:
        raise ValueError(f"keep_val must be in (0, 1], got {keep_val}")
    if len(val_x) == 0:
        raise CxrError("the validation split is empty, so the OOD threshold cannot be set; rerun `dvc repro split preprocess`")
    features, pixels = Mahalanobis.fit(train_features), Mahalanobis.fit(thumbnails(train_x))
    view = ViewCheck.fit(train_x, np.random.default_rng(seed))
    val_thumbs = thumbnails(val_x)
    level = 1 - (1 - keep_val) / len(DETECTORS)
    q = lambda v: float(np.quantile(v, level))  # noqa: E731  (interpolated: no score ties at exactly 1)
    feature_scale = q(features.distance(val_features)) or 1.0
    pixel_scale = q(pixels.distance(val_thumbs)) or 1.0
    view_scale = q(view.logit(val_thumbs))
    low, high = refer_band(val_p, threshold, refer_coverage)
    gate = Gate(features, pixels, view, feature_scale, pixel_scale, view_scale, 1.0, checks, low, high, {})
    raw = gate.raw_scores(val_features, val_x)
    cut = float(np.quantile(raw, keep_val, method="higher"))
    val_answered = float(answered(val_p, low, high).mean())
    meta = {"keep_val": keep_val, "refer_coverage": refer_coverage, "val_in_distribution": float(np.mean(raw <= cut)), "val_coverage": val_answered}
    return Gate(features, pixels, view, feature_scale, pixel_scale, view_scale, cut, checks, low, high, meta)


def penultimate(model: Any) -> Any:
    """A Keras model giving `model`'s penultimate features: the input of its last Dense layer
    (found through nested models, e.g. a feature extractor composed with a trained head). For a
    k-fold ensemble (its last layer averages member models) the members' features side by side."""
    import keras

    last = model.layers[-1]
    if isinstance(last, keras.layers.Average):
        members = [layer for layer in model.layers if isinstance(layer, keras.Model)]
        feats = [keras.layers.Flatten()(penultimate(m)(model.inputs[0])) for m in members]
        return keras.Model(model.inputs, keras.layers.Concatenate(name="members")(feats), name=f"{model.name}_penultimate")
    if isinstance(last, keras.Model):
        inner = penultimate(last)
        # a nested model's `.input` is its own Input; the outer tensor it was called on is its first inbound node's
        fed = last._inbound_nodes[0].input_tensors[0]
        return keras.Model(model.inputs, inner(fed), name=f"{model.name}_penultimate")
    if not isinstance(last, keras.layers.Dense):
        raise CxrError(f"model {model.name}: its last layer is {type(last).__name__}, not Dense, so it has no penultimate features for the OOD gate")
    return keras.Model(model.inputs, last.input, name=f"{model.name}_penultimate")


def flatten(features: np.ndarray) -> np.ndarray:
    """(N, ...) → (N, D)."""
    return np.asarray(features).reshape(len(features), -1)


# --- test sets of things that are not pediatric frontal chest X-rays ---------------------------


def _oct_bscan(rng: np.random.Generator, width: int = 512, height: int = 496) -> np.ndarray:
    """A synthetic retinal OCT B-scan: dark vitreous, bright layered retina along a curve with a
    foveal pit, speckle noise (the Mendeley archive's other half looks like this)."""
    x = np.arange(width)
    top = height * rng.uniform(0.3, 0.45) + rng.uniform(5, 25) * np.sin(x / width * np.pi * rng.uniform(0.5, 1.5))
    top -= rng.uniform(15, 40) * np.exp(-(((x - width * rng.uniform(0.4, 0.6)) / (width * 0.06)) ** 2))  # the fovea
    depth = np.arange(height)[:, None] - top[None, :]
    layers = np.zeros((height, width))
    for offset, thickness, level in ((0, 8, 220), (15, 20, 120), (40, 10, 90), (60, 12, 200), (75, 25, 150)):
        layers += level * np.exp(-(((depth - offset) / thickness) ** 2))
    speckle = rng.rayleigh(0.6, size=layers.shape)
    return np.clip(layers * speckle + rng.normal(12, 6, size=layers.shape), 0, 255).astype(np.uint8)


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg, flower.jpg: 427×640 RGB, bundled with scikit-learn


def _photo_crops(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    photos, out = _sample_photos(), []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(h // 3, h + 1)) if i >= len(photos) else None
        if side is None:
            out.append(img)
            continue
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(img[top : top + side, left : left + side])
    return out


def synthetic_families(rng: np.random.Generator, n: int) -> dict[str, list[np.ndarray]]:
    """Seeded images (uint8, grayscale (H, W) or RGB (H, W, 3)) of each non-X-ray family."""
    sides = lambda: (int(rng.integers(256, 1025)), int(rng.integers(256, 1025)))  # noqa: E731
    constant = [np.full(sides(), level, np.uint8) for level in rng.integers(0, 256, n)]
    constant[:2] = [np.zeros((512, 512), np.uint8), np.full((512, 512), 255, np.uint8)]  # the all-black and all-white
    near = []
    for _ in range(n):
        h, w = sides()
        ramp = np.linspace(0, rng.uniform(0, 4), w)[None, :]
        near.append(np.clip(rng.uniform(10, 245) + ramp + rng.normal(0, rng.uniform(0.3, 1.5), (h, w)), 0, 255).astype(np.uint8))
    noise = []
    for i in range(n):
        h, w = sides()
        kind = i % 3
        if kind == 0:
            noise.append(rng.integers(0, 256, (h, w), dtype=np.uint8))
        elif kind == 1:
            noise.append(np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(20, 60), (h, w)), 0, 255).astype(np.uint8))
        else:
            noise.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    photos = _photo_crops(rng, n)
    return {
        "constant": constant,
        "near_constant": near,
        "noise": noise,
        "photos": photos,
        "photos_gray": [np.asarray(Image.fromarray(p).convert("L")) for p in photos],
        "oct": [_oct_bscan(rng) for _ in range(n)],
    }


def xray_families(x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Transformed real X-rays (uint8 (N, S, S, 1)): rotated 90° and 180°, grey levels inverted,
    and the top-left corner (a quarter of each side)."""
    imgs = [img[:, :, 0] for img in x]
    corner = max(8, x.shape[1] // 4) if len(x) else 8
    return {
        "rotated_90": [np.rot90(i).copy() for i in imgs],
        "rotated_180": [np.rot90(i, 2).copy() for i in imgs],
        "inverted": [255 - i for i in imgs],
        "corner_crop": [i[:corner, :corner].copy() for i in imgs],
    }


def write_family(images: list[np.ndarray], folder: Path, fmt: str = "png") -> list[Path]:
    """Write each image as a file, as a user would hand it to `cxr predict`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:04d}.{fmt}"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
