"""The LiteRT export and runtime (cxr/serving/export.py, cxr/serving/runtime.py, `cxr predict --runtime`).

.venv/bin/pytest -q tests/test_runtime.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.constants import OUT_OF_DISTRIBUTION
from cxr.core.errors import CxrError
from cxr.evaluation import gate as ood
from cxr.serving import runtime
from cxr.serving.export import export_litert, write_export
from cxr.serving.inference import load_model, predict_files
from test_inference import SIZE, probe_model, save_model, sidecar, xray


def images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE, 1)).astype(np.uint8)


def gate_for(loaded, seed: int = 1) -> ood.Gate:
    """A gate fitted on the probe model's own features of random images (logic, not reality)."""
    from cxr.model.forward import forward_arrays

    feats = ood.penultimate(loaded.model)
    tr, va = images(120, seed), images(80, seed + 1)
    f = [ood.flatten(forward_arrays(feats, a)) for a in (tr, va)]
    checks = ood.Checks(min_std=6.0, max_colourfulness=12.0, max_aspect=2.5)
    return ood.fit_gate(f[0], tr, f[1], va, np.linspace(0.01, 0.99, 80), 0.5, 0.99, 0.9, checks)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A probe model with its gate and its LiteRT export, as export@<v> leaves them."""
    folder = tmp_path_factory.mktemp("export")
    path = save_model(probe_model(), folder / "probe.keras", sidecar())
    gate_for(load_model(path, runtime="keras")).save(ood.gate_path(path))
    blob, record, parity = export_litert(load_model(path, runtime="keras"), images(64, 5))
    write_export(path, blob, record)
    assert parity["max_abs_probability_diff"] <= 1e-4 and parity["label_agreement"] == 1.0 and parity["gate"]
    return path


def test_litert_gives_keras_probabilities_features_and_labels(exported, tmp_path):
    keras_model, lite = load_model(exported, runtime="keras"), load_model(exported, runtime="litert")
    assert (keras_model.runtime, lite.runtime, lite.model) == ("keras", "litert", None)
    x = images(50, 9)
    (pk, fk), (pl, fl) = keras_model.outputs(x, 16), lite.outputs(x, 7)  # different batch sizes on purpose
    np.testing.assert_allclose(pl, pk, atol=1e-4)
    np.testing.assert_allclose(fl, fk, atol=1e-4 * np.abs(fk).max())
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(xray(i)).save(paths[-1])
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "black.png")
    paths.append(tmp_path / "black.png")
    a, b = predict_files(paths, keras_model), predict_files(paths, lite)
    assert [r.label for r in a] == [r.label for r in b] and b[-1].label == OUT_OF_DISTRIBUTION
    np.testing.assert_allclose([r.probability for r in b], [r.probability for r in a], atol=1e-4)
    np.testing.assert_allclose([r.ood_score for r in b], [r.ood_score for r in a], rtol=1e-3)


def test_a_batch_with_no_readable_image_is_answered_not_raised(exported, tmp_path):
    """A batch whose every file fails (the service answers each upload alone) gives error rows."""
    lite = load_model(exported, runtime="litert")
    probs, feats = lite.outputs(images(0))
    assert probs.shape == (0,) and feats.shape == (0, len(lite.gate.features.mean))
    (tmp_path / "notes.png").write_text("not an image")
    rows = predict_files([tmp_path / "notes.png"], lite)
    assert rows[0].error is not None and rows[0].probability is None


def test_auto_takes_the_export_and_falls_back_to_keras(exported, tmp_path):
    assert load_model(exported, runtime="auto").runtime == "litert"
    bare = save_model(probe_model(), tmp_path / "bare.keras", sidecar())
    assert load_model(bare, runtime="auto").runtime == "keras"
    with pytest.raises(CxrError, match=r"bare.tflite: no exported model; run `dvc repro export@bare`"):
        load_model(bare, runtime="litert")
    with pytest.raises(ValueError, match="runtime must be one of"):
        load_model(bare, runtime="onnx")


def test_a_stale_or_broken_export_is_a_clear_error(exported, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    for suffix in (".keras", ".json", ".tflite", ".tflite.json", ".ood.npz"):
        (folder / f"probe{suffix}").write_bytes(exported.with_name(f"probe{suffix}").read_bytes())
    path = folder / "probe.keras"
    save_model(probe_model(seed=3), path, sidecar())  # retrained, export not rerun
    with pytest.raises(
        CxrError, match=r"probe.tflite: exported from another probe.keras .*stale export.*dvc repro export@probe"
    ):
        load_model(path, runtime="litert")
    save_model(probe_model(), path, sidecar())
    (folder / "probe.tflite.json").write_text("{")
    with pytest.raises(CxrError, match=r"probe.tflite.json: cannot read the export record"):
        load_model(path, runtime="litert")


def test_export_refuses_a_model_it_cannot_reproduce(exported, monkeypatch):
    import cxr.serving.export

    loaded = load_model(exported, runtime="keras")
    real = cxr.serving.export.keras_outputs
    monkeypatch.setattr(cxr.serving.export, "keras_outputs", lambda m, x: (real(m, x)[0] + 1e-3, real(m, x)[1]))
    with pytest.raises(
        CxrError,
        match=(
            r"the LiteRT export differs from Keras \(max \|dp\| 1.00e-03, "
            r"\d+ class disagreements on 8 images\); nothing written"
        ),
    ):
        export_litert(loaded, images(8))


def test_cxr_predict_with_the_export_never_imports_tensorflow(exported, tmp_path):
    """The cold-start path: `cxr predict` on the export loads neither TensorFlow nor Keras."""
    image = tmp_path / "one.png"
    Image.fromarray(xray(1)).save(image)
    code = (
        "import sys, json; from cxr.serving.cli import cli; status = "
        "cli(['predict', sys.argv[1], '--model', sys.argv[2], '--format', 'json']);"
        "print(json.dumps({'status': status, 'tf': [m for m in "
        "('tensorflow', 'keras') if m in sys.modules]}), file=sys.stderr)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(image), str(exported)], capture_output=True, text=True, check=True
    )
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"status": 0, "tf": []}
    row = json.loads(done.stdout)[0]
    ref = predict_files([image], load_model(exported, runtime="keras"))[0]
    assert row["label"] == ref.label and abs(row["probability"] - ref.probability) <= 1e-4
    keras_run = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.serving.cli",
            "predict",
            str(image),
            "--model",
            str(exported),
            "--runtime",
            "keras",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert abs(json.loads(keras_run.stdout)[0]["probability"] - ref.probability) <= 1e-9


def test_runtime_path_names():
    assert runtime.lite_path("models/a.keras") == Path("models/a.tflite")
    assert runtime.lite_meta_path("models/a_cv.keras") == Path("models/a_cv.tflite.json")


def test_export_counts_a_class_flip_at_the_threshold_within_tolerance(exported, monkeypatch):
    """An image whose probability sits on the threshold may change class by float rounding alone:
    counted, not refused; the same flip farther from the threshold than the tolerance is refused."""
    import dataclasses

    import cxr.serving.export

    loaded = load_model(exported, runtime="keras")
    x = images(8)
    real = cxr.serving.export.keras_outputs
    p = real(loaded.model, x)[0]
    assert np.ptp(p) > 1e-3  # the images' probabilities differ, so only image 0 sits on the threshold
    shift = np.where(np.arange(len(x)) == 0, 2e-6, 0.0)
    monkeypatch.setattr(cxr.serving.export, "keras_outputs", lambda m, x: (real(m, x)[0] - shift, real(m, x)[1]))
    # LiteRT above the threshold, "Keras" below it
    on_edge = dataclasses.replace(loaded, meta=dataclasses.replace(loaded.meta, threshold=float(p[0]) - 1e-6))
    _, _, parity = export_litert(on_edge, x)
    assert parity["borderline_class_flips"] == 1 and parity["class_agreement"] == 7 / 8
    with pytest.raises(CxrError, match=r"1 class disagreements on 8 images"):
        export_litert(on_edge, x, tolerance=5e-6 / 10)
