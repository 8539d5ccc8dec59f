"""The exported model on LiteRT (TensorFlow Lite): P(pneumonia) and the OOD features without TensorFlow.

    cxr predict IMAGE          # uses models/<v>.tflite when stage export@<v> wrote it, else Keras

`stages/export.py` converts `models/<v>.keras` into `models/<v>.tflite` with two outputs, the
probability and the penultimate features the OOD gate scores (one pass gives both), and writes
`models/<v>.tflite.json`: which output is which, the SHA-256 of the .keras it came from, and the
largest probability difference from Keras it measured on the validation images. The threshold,
input size and resize mode stay in the model's sidecar (`models/<v>.json`), as for Keras.
Importing this module and loading a model costs tens of milliseconds; TensorFlow costs seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxr.core.errors import CxrError
from cxr.core.paths import lite_meta_path, lite_path
from cxr.core.provenance import sha256_file

FORMAT = "litert"


def available() -> bool:
    """True when the LiteRT interpreter (pip package ai-edge-litert) can be imported."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the runtime's C++ "INFO: Created TensorFlow Lite XNNPACK
    delegate" line on every load); Python exceptions still carry the reason."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@dataclass
class LiteModel:
    """A LiteRT interpreter over one exported model; `run` is serialised (an interpreter is not thread-safe)."""

    path: Path
    interpreter: Any
    input_index: int
    probability_index: int
    features_index: int
    image_size: int
    lock: threading.Lock
    shape: tuple[int, ...] | None = None  # the input shape tensors are allocated for

    @classmethod
    def load(cls, model_path: Path | str, image_size: int) -> LiteModel:
        """Load `models/<v>.tflite` beside `model_path` (a .keras path); CxrError when it is
        unusable or was exported from another .keras than the one beside it."""
        from ai_edge_litert.interpreter import Interpreter

        model_path = Path(model_path)
        path, meta_path = lite_path(model_path), lite_meta_path(model_path)
        hint = f"rerun `dvc repro export@{model_path.stem}`"
        try:
            meta = json.loads(meta_path.read_text())
            outputs = meta["outputs"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CxrError(
                f"{meta_path}: cannot read the export record ({' '.join(str(exc).split())[:120]}); {hint}"
            ) from None
        if model_path.is_file() and meta.get("source_sha256") != sha256_file(model_path):
            raise CxrError(
                f"{path}: exported from another {model_path.name} than the one beside it (stale export); {hint}"
            )
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=max(1, os.cpu_count() or 1))
        except (ValueError, RuntimeError, OSError) as exc:
            raise CxrError(
                f"{path}: cannot load the LiteRT model ({' '.join(str(exc).split())[:160]}); {hint}"
            ) from None
        by_name = {d["name"]: d["index"] for d in interpreter.get_output_details()}
        if set(outputs.values()) - set(by_name) or {"probability", "features"} - set(outputs):
            raise CxrError(f"{path}: its outputs {sorted(by_name)} do not match {meta_path.name}; {hint}")
        inp = interpreter.get_input_details()[0]
        if tuple(inp["shape"][1:]) != (image_size, image_size, 1):
            raise CxrError(
                f"{path}: input {tuple(inp['shape'][1:])} does not match the sidecar's image_size {image_size}; {hint}"
            )
        return cls(
            path,
            interpreter,
            inp["index"],
            by_name[outputs["probability"]],
            by_name[outputs["features"]],
            image_size,
            threading.Lock(),
        )

    def features_width(self) -> int:
        shape = next(d["shape"] for d in self.interpreter.get_output_details() if d["index"] == self.features_index)
        return int(np.prod(shape[1:]))

    def run(self, x: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(P(pneumonia) (N,), features (N, D)) as float64 for uint8 images (N, S, S, 1)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1:] != (self.image_size, self.image_size, 1):
            raise ValueError(f"expected inputs shaped (N, {self.image_size}, {self.image_size}, 1), got {x.shape}")
        probs, feats = [], []
        with self.lock:
            it = self.interpreter
            for start in range(0, len(x), batch_size):
                batch = np.ascontiguousarray(x[start : start + batch_size], np.float32)
                if self.shape != batch.shape:  # a new batch size: reallocate (once per size)
                    it.resize_tensor_input(self.input_index, list(batch.shape))
                    with (
                        _quiet_stderr() if self.shape is None else contextlib.nullcontext()
                    ):  # the delegate's line comes with the first
                        it.allocate_tensors()
                    self.shape = batch.shape
                it.set_tensor(self.input_index, batch)
                it.invoke()
                probs.append(
                    np.asarray(it.get_tensor(self.probability_index), np.float64).reshape(len(batch), -1)[:, 0]
                )
                feats.append(np.asarray(it.get_tensor(self.features_index), np.float64).reshape(len(batch), -1))
        if not probs:  # no image (e.g. every file of a batch unreadable): empty, with the features' width
            return np.zeros((0,), np.float64), np.zeros((0, self.features_width()), np.float64)
        return np.concatenate(probs), np.concatenate(feats)
