"""Convert a trained Keras model to LiteRT (TensorFlow Lite) with the OOD features as a second output.

    python stages/export.py VARIANT     # dvc repro export@VARIANT → models/VARIANT.tflite (+ .tflite.json)

Why LiteRT and not ONNX: TensorFlow converts Keras models itself (no tf2onnx, whose releases
trail TensorFlow's), the runtime wheel (ai-edge-litert) imports in under 0.1 s, and its XNNPACK
kernels ran the `modern` MobileNetV2 at 1.5 ms an image on one core here, with probabilities
within 2e-6 of Keras. Float32 throughout: no quantisation, so parity holds to 1e-4.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cxr.core.errors import CxrError
from cxr.core.io import atomic_file, write_json
from cxr.core.provenance import sha256_file
from cxr.evaluation.gate import flatten, penultimate
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.serving import runtime


def to_litert(model: Any) -> bytes:
    """A float32 LiteRT flatbuffer of `model` with two outputs: P(pneumonia) (N, 1) and its
    penultimate features (N, D), for any batch size N."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    features = penultimate(model)
    both = keras.Model(
        model.inputs,
        [model.outputs[0], keras.layers.Flatten(name="ood_features")(features.outputs[0])],
        name=f"{model.name}_export",
    )
    spec = tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="image")

    @tf.function(input_signature=[spec], autograph=False)
    def call(x: Any) -> Any:
        probability, feats = both(x, training=False)
        return {"probability": probability, "features": feats}

    # weights frozen into constants: left as resource variables, the interpreter reads them
    # uninitialised (NaN out) for any model whose weights were assigned after it was built
    frozen = convert_variables_to_constants_v2(call.get_concrete_function())
    return tf.lite.TFLiteConverter.from_concrete_functions([frozen]).convert()


def output_names(interpreter: Any, x: np.ndarray, probability: np.ndarray) -> dict[str, str]:
    """Which output tensor of a loaded LiteRT interpreter is the probability and which the
    features, found by running it on `x` and matching Keras's `probability` (N,)."""
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(np.float32))
    interpreter.invoke()
    names: dict[str, str] = {}
    for d in interpreter.get_output_details():
        out = interpreter.get_tensor(d["index"]).reshape(len(x), -1)
        key = "probability" if out.shape[1] == 1 and np.allclose(out[:, 0], probability, atol=1e-3) else "features"
        if key in names:
            raise CxrError(
                "cannot tell the exported model's outputs apart "
                f"({', '.join(d['name'] for d in interpreter.get_output_details())})"
            )
        names[key] = d["name"]
    return names


def keras_outputs(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keras's probability and penultimate features for `x`: what the export must reproduce."""
    return predict_arrays(model, x), flatten(forward_arrays(penultimate(model), x))


def final_labels(loaded: Any, probs: np.ndarray, feats: np.ndarray, x: np.ndarray) -> list[str]:
    """The label `cxr predict` gives arrays: with the gate OOD / UNCERTAIN / the class, else the class."""
    from cxr.serving.inference import label_of

    if loaded.gate is None:
        return [label_of(float(p), loaded.threshold) for p in probs]
    _, reasons = loaded.gate.reasons(feats, x, [None] * len(x))
    return [loaded.gate.label(float(p), loaded.threshold, why) for p, why in zip(probs, reasons)]


def export_litert(loaded: Any, x: np.ndarray, tolerance: float = 1e-4) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """Convert a Keras `LoadedModel` and check it on the images `x` through the runtime's own
    loader: (flatbuffer, the .tflite.json record, parity figures). CxrError when any probability
    differs by more than `tolerance` (params.yaml export.tolerance) or any class at the threshold differs, except for
    images whose probability lies within `tolerance` of the threshold (counted). The gate's final
    labels are compared and reported, not enforced: where the penultimate features are nearly
    constant (an untrained or collapsed model) the Mahalanobis score is float32 noise, and no
    runtime reproduces noise."""
    if len(x) == 0:
        raise CxrError("no images to check the export on; rerun `dvc repro split preprocess`")
    start = time.perf_counter()
    blob = to_litert(loaded.model)
    convert_s = time.perf_counter() - start
    keras_p, keras_f = keras_outputs(loaded.model, x)
    with tempfile.TemporaryDirectory(prefix="cxr-export-") as tmp:
        from ai_edge_litert.interpreter import Interpreter

        probe = Path(tmp) / "m.tflite"
        probe.write_bytes(blob)
        outputs = output_names(Interpreter(model_path=str(probe)), x[:2], keras_p[:2])
        record = {
            "format": runtime.FORMAT,
            "source": loaded.path.name,
            "source_sha256": sha256_file(loaded.path),
            "outputs": outputs,
        }
        (Path(tmp) / "m.tflite.json").write_text(json.dumps(record))
        lite_p, lite_f = runtime.LiteModel.load(Path(tmp) / "m.keras", loaded.image_size).run(x)
    diff = np.abs(lite_p - keras_p)
    same_class = (lite_p >= loaded.threshold) == (keras_p >= loaded.threshold)
    # A probability within `tolerance` of the threshold may cross it by float rounding alone: such
    # a flip is recorded, not refused (|dp| of a few 1e-6 is what float32 kernels differ by).
    borderline = np.abs(keras_p - loaded.threshold) <= tolerance
    same_label = np.array(
        [a == b for a, b in zip(final_labels(loaded, keras_p, keras_f, x), final_labels(loaded, lite_p, lite_f, x))]
    )
    parity = {
        "format": runtime.FORMAT,
        "n_images": int(len(x)),
        "max_abs_probability_diff": float(diff.max()),
        "max_rel_feature_diff": float(np.max(np.abs(lite_f - keras_f)) / max(1e-12, float(np.max(np.abs(keras_f))))),
        "class_agreement": float(same_class.mean()),
        "borderline_class_flips": int((~same_class & borderline).sum()),
        "label_agreement": float(same_label.mean()),
        "tolerance": tolerance,
        "gate": loaded.gate is not None,
        "size_mb": round(len(blob) / 1e6, 3),
        "convert_s": round(convert_s, 2),
    }
    flips = ~same_class & ~borderline
    if diff.max() > tolerance or flips.any():
        raise CxrError(
            f"{loaded.path}: the LiteRT export differs from Keras (max |dp| {diff.max():.2e}, {int(flips.sum())} class "
            f"disagreements on {len(x)} images); nothing written"
        )
    return blob, {**record, "parity": parity}, parity


def write_export(model_path: Path | str, blob: bytes, record: dict[str, Any]) -> None:
    """models/<v>.tflite and models/<v>.tflite.json (the record last: a half-written export fails its hash check)."""
    with atomic_file(runtime.lite_path(model_path), "wb") as fh:
        fh.write(blob)
    write_json(runtime.lite_meta_path(model_path), record)
