"""THE forward pass: a model's outputs for a batch of arrays, through one compiled function.

    from cxr.model.forward import predict_arrays     # P(pneumonia) for uint8 images (N, S, S, 1)

Training (per-epoch validation, its threshold, stress figures), evaluation, the OOD stage, the
report, `cxr predict` and `cxr serve` all call `predict_arrays` / `forward_arrays`. It lives apart
from cxr.serving.inference (files, the OOD gate, the exported runtime) so that the training stages depend
on the forward pass only, not on how files are read or gated.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

# model → its compiled inference function (see _forward); dropped with the model
_FORWARD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def forward_arrays(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The model's outputs (N, ...) as float64 for its inputs x (N, ...), in batches through one
    compiled inference function; `predict_arrays` is this for a probability model."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = np.asarray(x)
    expected = tuple(model.inputs[0].shape[1:])
    if x.ndim != len(expected) + 1 or any(e is not None and e != g for e, g in zip(expected, x.shape[1:])):
        raise ValueError(
            f"expected inputs shaped (N, {', '.join('?' if e is None else str(e) for e in expected)}), got {x.shape}"
        )
    if len(x) == 0:
        return np.zeros((0, *model.outputs[0].shape[1:]), dtype=np.float64)
    forward = _forward(model)
    out = [
        np.asarray(forward(x[start : start + batch_size].astype(np.float32)), dtype=np.float64)
        for start in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def predict_arrays(model: Any, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """P(pneumonia) for a model's inputs — uint8 images (N, S, S, 1), or the feature vectors of
    a feature head — as float64 (N,).

    THE forward pass: training's threshold and early stopping, evaluation, the report and
    `cxr predict` all call it. Batches go through one compiled inference function
    (deterministic: inference mode, fixed batch order); an input gets the same probability
    whatever batch it is in.
    """
    out = forward_arrays(model, x, batch_size)
    return out.reshape(len(out), -1)[:, 0] if len(out) else np.zeros((0,), np.float64)


def called_on(nested: Any) -> Any:
    """The outer tensor a nested model (a layer of a functional model) was called on. Its own
    `.input` is its private Input; the graph it sits in fed it through its first inbound node."""
    return nested._inbound_nodes[0].input_tensors[0]
