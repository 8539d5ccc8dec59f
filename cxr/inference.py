"""Load a trained model with its sidecar and predict P(pneumonia) for arrays or image files.

    python -m cxr.cli predict IMAGE_OR_FOLDER...     # the command-line front end (cxr/cli.py)

`load_model` refuses anything it cannot load safely (`safe_mode=True`: no Lambda layers, no
pickled code) and needs `models/<v>.json` next to `models/<v>.keras`, because the input size,
resize mode and decision threshold live there. Files go through `cxr.images.load_resized`, the
same decoder preprocess uses, so a file gets the same probability here as in evaluation.
"""

from __future__ import annotations

import json
import os
import weakref
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.errors import CxrError
from cxr.images import RESIZE_MODES, ImageError, load_resized

POSITIVE, NEGATIVE = "PNEUMONIA", "NORMAL"
# Keys of the sidecar that inference needs (design.md lists the full sidecar).
REQUIRED_META = ("image_size", "resize", "threshold")
# model → its compiled inference function (see _forward); dropped with the model
_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LoadedModel:
    """A Keras model and its sidecar metadata (`models/<v>.json`)."""

    model: Any  # keras.Model
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def resize(self) -> str:
        return str(self.meta["resize"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])


@dataclass(frozen=True)
class Prediction:
    """One file's result; `error` is a one-line reason when the file could not be used."""

    path: str
    probability: float | None
    label: str | None
    threshold: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "probability": self.probability, "label": self.label, "threshold": self.threshold, "error": self.error}


def _fix_hint(path: Path) -> str:
    if path.parent.name == "models":  # a pipeline output: DVC can rebuild or fetch it
        return f"rerun `dvc repro train@{path.stem}` or `dvc pull {path}`"
    return "pass a model written by `dvc repro train@<variant>` (models/<variant>.keras with its .json)"


def sidecar_path(model_path: Path | str) -> Path:
    """`models/<v>.keras` → `models/<v>.json`."""
    return Path(model_path).with_suffix(".json")


def read_meta(model_path: Path | str) -> dict[str, Any]:
    """Read and check the sidecar next to `model_path`."""
    model_path = Path(model_path)
    side = sidecar_path(model_path)
    if not side.is_file():
        raise CxrError(f"{side}: sidecar of {model_path} not found; {_fix_hint(model_path)}")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise CxrError(f"{side}: not valid JSON ({reason}); {_fix_hint(model_path)}") from None
    if not isinstance(meta, dict):
        raise CxrError(f"{side}: expected a JSON object; {_fix_hint(model_path)}")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CxrError(f"{side}: missing key(s) {', '.join(missing)}; {_fix_hint(model_path)}")
    size, threshold = meta["image_size"], meta["threshold"]
    if meta["resize"] not in RESIZE_MODES:
        raise CxrError(f"{side}: resize must be one of {', '.join(RESIZE_MODES)}, got {meta['resize']!r}; {_fix_hint(model_path)}")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CxrError(f"{side}: image_size must be a positive integer, got {size!r}; {_fix_hint(model_path)}")
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise CxrError(f"{side}: threshold must be a number in [0, 1], got {threshold!r}; {_fix_hint(model_path)}")
    return meta


def load_model(path: Path | str) -> LoadedModel:
    """Load `models/<v>.keras` safely (no compile) and its sidecar; CxrError if either is unusable."""
    import keras

    path = Path(path)
    if not path.is_file():
        raise CxrError(f"{path}: model file not found; {_fix_hint(path)}")
    if path.suffix != ".keras":
        raise CxrError(f"{path}: not a .keras model file; pass models/<variant>.keras")
    meta = read_meta(path)
    if not zipfile.is_zipfile(path):
        raise CxrError(f"{path}: not a Keras archive (damaged or tampered); {_fix_hint(path)}")
    try:
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as exc:  # Keras raises many types (ValueError, KeyError, OSError, TypeError) for bad archives
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CxrError(f"{path}: cannot load model ({reason}); {_fix_hint(path)}") from None
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    size = int(meta["image_size"])
    if shape is not None and tuple(shape[1:]) not in ((size, size, 1), (None, None, 1)):
        raise CxrError(f"{path}: model input {shape[1:]} does not match sidecar image_size {size}; {_fix_hint(path)}")
    return LoadedModel(model=model, meta=meta, path=path)


def _forward(model: Any) -> Callable[[Any], Any]:
    """The model's inference call compiled once for any batch size (one trace per model).

    Eager calls cost ~0.1-0.2 s of Python overhead each for a MobileNetV2 (single images far
    over budget); Keras's own predict_on_batch retraces when the batch size first changes.
    """
    fn = _FORWARD.get(model)
    if fn is None:
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)
        ref = weakref.ref(model)  # a strong reference here would keep the cache entry alive forever

        def call(x: Any) -> Any:
            return ref()(x, training=False)

        fn = tf.function(call, input_signature=[spec], autograph=False, reduce_retracing=True)
        _FORWARD[model] = fn
    return fn


def predict_arrays(model: Any, x_uint8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(pneumonia) for uint8 images (N, S, S, 1), as float64 (N,).

    Batches go through one compiled inference function (deterministic: inference mode, fixed
    batch order); a file gets the same probability whatever batch it is in.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = np.asarray(x_uint8)
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"expected images shaped (N, S, S, 1), got {x.shape}")
    if len(x) == 0:
        return np.zeros((0,), dtype=np.float64)
    forward = _forward(model)
    out = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size].astype(np.float32)
        probs = np.asarray(forward(batch), dtype=np.float64)
        out.append(probs.reshape(len(batch), -1)[:, 0])
    return np.concatenate(out)


def label_of(probability: float, threshold: float) -> str:
    """PNEUMONIA at or above the threshold (as evaluation counts a positive), else NORMAL."""
    return POSITIVE if probability >= threshold else NEGATIVE


def decode(path: Path | str, size: int, resize: str) -> np.ndarray | str:
    """One file → uint8 (size, size, 1), or a one-line reason why it cannot be used."""
    try:
        return load_resized(path, [size], resize)[size]
    except ImageError as exc:
        return " ".join(str(exc).split())
    except OSError as exc:  # e.g. a permission error or a folder given as a file
        return f"{path}: {' '.join(str(exc).split())}"


def _stack(decoded: list[np.ndarray | str], size: int) -> tuple[np.ndarray, list[str | None]]:
    good = [d for d in decoded if not isinstance(d, str)]
    x = np.stack(good) if good else np.zeros((0, size, size, 1), np.uint8)
    return x, [d if isinstance(d, str) else None for d in decoded]


def _workers() -> int:
    # Pillow releases the GIL while decoding and resizing, so threads use every core.
    return max(1, min(8, os.cpu_count() or 1))


def load_images(paths: list[Path | str], size: int, resize: str) -> tuple[np.ndarray, list[str | None]]:
    """Decode every file (in parallel threads); returns the good images stacked (in order)
    and, per path, None or the error."""
    with ThreadPoolExecutor(_workers()) as pool:
        return _stack(list(pool.map(lambda p: decode(p, size, resize), paths)), size)


def predict_files(paths: list[Path | str], loaded: LoadedModel, batch_size: int = 64) -> list[Prediction]:
    """Predict each file; a file that cannot be decoded gets `error` and the others still run.

    Files are decoded one batch ahead in worker threads while the model runs on the current
    batch, so decoding and inference overlap and memory stays bounded for any number of files.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    size, resize, threshold = loaded.image_size, loaded.resize, loaded.threshold
    chunks = [list(paths[i : i + batch_size]) for i in range(0, len(paths), batch_size)]
    out: list[Prediction] = []
    with ThreadPoolExecutor(_workers()) as pool:
        submit = lambda chunk: [pool.submit(decode, p, size, resize) for p in chunk]  # noqa: E731
        pending = submit(chunks[0]) if chunks else []
        for i, chunk in enumerate(chunks):
            x, errors = _stack([f.result() for f in pending], size)
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else []
            probs = iter(predict_arrays(loaded.model, x, batch_size))
            for p, err in zip(chunk, errors):
                if err is not None:
                    out.append(Prediction(str(p), None, None, threshold, err))
                else:
                    prob = float(next(probs))
                    out.append(Prediction(str(p), prob, label_of(prob, threshold), threshold))
    return out
