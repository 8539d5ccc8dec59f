"""Load a trained model with its sidecar and predict P(pneumonia) for arrays or image files.

    python -m cxr.serving.cli predict IMAGE_OR_FOLDER...     # the command-line front end (cxr/serving/cli.py)

`load_model` refuses anything it cannot load safely (`safe_mode=True`: no Lambda layers, no
pickled code) and needs `models/<v>.json` next to `models/<v>.keras`, because the input size,
resize mode and decision threshold live there. Files go through `cxr.data.images.load_resized`, the
same decoder preprocess uses, so a file gets the same probability here as in evaluation.
With `models/<v>.ood.npz` beside the model (stage `ood@<v>`, cxr.evaluation.gate) each prediction also gets
an OOD score and flag, and the label OUT_OF_DISTRIBUTION or UNCERTAIN where it applies.
With `runtime="auto"` (`cxr predict`, `cxr serve`) the exported `models/<v>.tflite` (stage
`export@<v>`, cxr.serving.runtime) runs instead of Keras when it is there, and TensorFlow is never imported.
A site file (`cxr calibrate`, cxr.serving.site) replaces the sidecar's threshold and turns the refer band off.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.core.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE
from cxr.core.errors import CxrError
from cxr.data.images import ImageFacts, load_resized_facts
from cxr.data.pixels import ImageError
from cxr.evaluation.gate import OOD_REASONS, Gate, flatten, gate_path, penultimate
from cxr.model import sidecar
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.serving.runtime import LiteModel, lite_meta_path, lite_path

RUNTIMES = ("auto", "keras", "litert")
VALIDATION = "validation"  # threshold_source without a site file: the sidecar's threshold, chosen on validation


@dataclass(frozen=True)
class SiteThreshold:
    """A site's own threshold (cxr.serving.site, `cxr calibrate`): it replaces the sidecar's, and
    the refer band is off, since the band was fitted around the validation threshold."""

    threshold: float
    rule: str
    file: str  # the site file, named in every answer's threshold_source


@dataclass(frozen=True)
class LoadedModel:
    """A model (Keras, or its LiteRT export) and its sidecar (`models/<v>.json`)."""

    model: Any  # keras.Model; None when `lite` runs instead
    meta: sidecar.Sidecar
    path: Path | None = None
    gate: Gate | None = None  # models/<v>.ood.npz when present
    features: Any = None  # keras.Model: the penultimate features the gate scores
    lite: LiteModel | None = None  # models/<v>.tflite: probability and features in one pass
    site: SiteThreshold | None = None  # cxr.serving.site.apply_site

    @property
    def runtime(self) -> str:
        return "litert" if self.lite is not None else "keras"

    def outputs(self, x: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray | None]:
        """P(pneumonia) (N,) and, when there is a gate, the features it scores (N, D)."""
        if self.lite is not None:
            probs, feats = self.lite.run(x, batch_size)
            return probs, (feats if self.gate is not None else None)
        probs = predict_arrays(self.model, x, batch_size)
        return probs, (flatten(forward_arrays(self.features, x, batch_size)) if self.gate is not None else None)

    @property
    def image_size(self) -> int:
        return self.meta.image_size

    @property
    def resize(self) -> str:
        return self.meta.resize

    @property
    def threshold(self) -> float:
        return self.meta.threshold if self.site is None else self.site.threshold

    @property
    def threshold_source(self) -> str:
        return VALIDATION if self.site is None else f"site:{self.site.file}"


@dataclass(frozen=True)
class Prediction:
    """One file's result; `error` is a one-line reason when the file could not be used."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None
    ood_score: float | None = None  # > 1: out of distribution (None: no gate beside the model)
    ood: bool | None = None
    ood_reason: str | None = None  # in words (gate.OOD_REASONS)
    ood_detector: str | None = None  # what caught it: an OOD_REASONS key
    refer_low: float | None = None  # the UNCERTAIN band: refer_low < probability < refer_high
    refer_high: float | None = None
    threshold_source: str = VALIDATION  # or site:<file> (cxr.serving.site)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "probability": self.probability,
            "label": self.label,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "ood_score": self.ood_score,
            "ood": self.ood,
            "ood_reason": self.ood_reason,
            "ood_detector": self.ood_detector,
            "refer_low": self.refer_low,
            "refer_high": self.refer_high,
            "error": self.error,
        }


def load_model(path: Path | str, with_gate: bool = True, runtime: str = "keras") -> LoadedModel:
    """Load `models/<v>.keras` safely (no compile), its sidecar and, when present and
    `with_gate`, its OOD gate (`models/<v>.ood.npz`); CxrError if any is unusable.

    `runtime`: "keras"; "litert" (the export `models/<v>.tflite`, an error when it is missing);
    "auto" (the export when it is there and the ai-edge-litert package is installed, else Keras).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    path = Path(path)
    runtime = _choose_runtime(path, runtime)
    meta = sidecar.read(path)
    gate = Gate.load(gate_path(path)) if with_gate and gate_path(path).is_file() else None
    if runtime == "litert":
        return _load_litert(path, meta, gate)
    return _load_keras(path, meta, gate)


def _choose_runtime(path: Path, runtime: str) -> str:
    """The runtime to load, "keras" or "litert" ("auto" resolved), once the files it needs are known to be there."""
    if path.suffix != ".keras":
        raise CxrError(f"{path}: not a .keras model file; pass models/<variant>.keras")
    exported = lite_path(path).is_file() and lite_meta_path(path).is_file()
    if runtime == "litert" and not exported:
        raise CxrError(
            f"{lite_path(path)}: no exported model; run `dvc repro export@{path.stem}` or use the Keras runtime"
        )
    if runtime == "auto":
        from cxr.serving import runtime as lite_runtime

        runtime = "litert" if exported and lite_runtime.available() else "keras"
    if runtime == "keras" and not path.is_file():
        raise CxrError(f"{path}: model file not found; {sidecar.fix_hint(path)}")
    return runtime


def _load_litert(path: Path, meta: sidecar.Sidecar, gate: Gate | None) -> LoadedModel:
    """The LiteRT export; TensorFlow is never imported."""
    lite = LiteModel.load(path, meta.image_size)
    width = lite.features_width()
    if gate is not None and width != len(gate.features.mean):
        raise CxrError(
            f"{gate_path(path)}: fitted on {len(gate.features.mean)} features, the "
            f"export has {width}; rerun `dvc repro ood@{path.stem} export@{path.stem}`"
        )
    return LoadedModel(model=None, meta=meta, path=path, gate=gate, lite=lite)


def _load_keras(path: Path, meta: sidecar.Sidecar, gate: Gate | None) -> LoadedModel:
    """The Keras model, checked against its sidecar's input size and its gate's feature width."""
    import keras

    hint = sidecar.fix_hint(path)
    if not zipfile.is_zipfile(path):
        raise CxrError(f"{path}: not a Keras archive (damaged or tampered); {hint}")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many types (ValueError, KeyError, OSError, TypeError) for bad archives
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CxrError(f"{path}: cannot load model ({reason}); {hint}") from None
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    size = meta.image_size
    if shape is not None and tuple(shape[1:]) not in ((size, size, 1), (None, None, 1)):
        raise CxrError(f"{path}: model input {shape[1:]} does not match sidecar image_size {size}; {hint}")
    if gate is None:
        return LoadedModel(model=model, meta=meta, path=path)
    features = penultimate(model)
    width = int(np.prod(features.outputs[0].shape[1:]))
    if width != len(gate.features.mean):
        raise CxrError(
            f"{gate_path(path)}: fitted on {len(gate.features.mean)} features, "
            f"the model has {width}; rerun `dvc repro ood@{path.stem}`"
        )
    return LoadedModel(model=model, meta=meta, path=path, gate=gate, features=features)


def label_of(probability: float, threshold: float) -> str:
    """PNEUMONIA at or above the threshold (as evaluation counts a positive), else NORMAL."""
    return POSITIVE if probability >= threshold else NEGATIVE


def decode(path: Path | str, size: int, resize: str) -> tuple[np.ndarray, ImageFacts] | str:
    """One file → (uint8 (size, size, 1), its ImageFacts), or a one-line reason why it cannot be used."""
    try:
        return load_resized_facts(path, size, resize)
    except ImageError as exc:
        return " ".join(str(exc).split())
    except OSError as exc:  # e.g. a permission error or a folder given as a file
        return f"{path}: {' '.join(str(exc).split())}"


def _stack(
    decoded: list[tuple[np.ndarray, ImageFacts] | str], size: int
) -> tuple[np.ndarray, list[ImageFacts], list[str | None]]:
    good = [d for d in decoded if not isinstance(d, str)]
    x = np.stack([pixels for pixels, _ in good]) if good else np.zeros((0, size, size, 1), np.uint8)
    return x, [facts for _, facts in good], [d if isinstance(d, str) else None for d in decoded]


def _workers() -> int:
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    return max(1, min(8, os.cpu_count() or 1))


def load_images(
    paths: list[Path | str], size: int, resize: str
) -> tuple[np.ndarray, list[ImageFacts], list[str | None]]:
    """Decode every file (in parallel threads); returns the good images stacked (in order),
    their ImageFacts and, per path, None or the error."""
    with ThreadPoolExecutor(_workers()) as pool:
        return _stack(list(pool.map(lambda p: decode(p, size, resize), paths)), size)


def predict_files(
    paths: list[Path | str],
    loaded: LoadedModel,
    batch_size: int = 64,
    on_image: Callable[[int, np.ndarray], None] | None = None,
) -> list[Prediction]:
    """Predict each file; a file that cannot be decoded gets `error` and the others still run.

    Files are decoded one batch ahead in worker threads while the model runs on the current
    batch, so decoding and inference overlap and memory stays bounded for any number of files.
    `on_image(i, image)` is called with each decoded image (uint8 (S, S, 1), `paths[i]`), so a
    caller needing the pixels too (Grad-CAM) does not decode the file a second time.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    size, resize, threshold, gate = loaded.image_size, loaded.resize, loaded.threshold, loaded.gate
    band = (
        {"refer_low": gate.refer_low, "refer_high": gate.refer_high} if gate is not None and loaded.site is None else {}
    )
    band["threshold_source"] = loaded.threshold_source  # every row says where its threshold came from
    chunks = [list(range(i, min(i + batch_size, len(paths)))) for i in range(0, len(paths), batch_size)]
    out: list[Prediction] = []
    with ThreadPoolExecutor(_workers()) as pool:
        submit = lambda chunk: [pool.submit(decode, paths[i], size, resize) for i in chunk]  # noqa: E731
        pending = submit(chunks[0]) if chunks else []
        for n, chunk in enumerate(chunks):
            x, facts, errors = _stack([f.result() for f in pending], size)
            pending = submit(chunks[n + 1]) if n + 1 < len(chunks) else []
            probs, feats = loaded.outputs(x, batch_size)
            if gate is not None:
                scores, reasons = gate.reasons(feats, x, facts)
            good = 0
            for i, err in zip(chunk, errors):
                if err is not None:
                    out.append(Prediction(str(paths[i]), None, None, threshold, err, **band))
                    continue
                prob = float(probs[good])
                if gate is None:
                    out.append(Prediction(str(paths[i]), prob, label_of(prob, threshold), threshold, **band))
                else:
                    why = reasons[good]
                    if loaded.site is None:
                        label = gate.label(prob, threshold, why)
                    else:  # a site threshold: no refer band (SiteThreshold)
                        label = OUT_OF_DISTRIBUTION if why is not None else label_of(prob, threshold)
                    out.append(
                        Prediction(
                            str(paths[i]),
                            prob,
                            label,
                            threshold,
                            None,
                            float(scores[good]),
                            why is not None,
                            None if why is None else OOD_REASONS[why],
                            why,
                            **band,
                        )
                    )
                if on_image is not None:
                    on_image(i, x[good])
                good += 1
    return out
