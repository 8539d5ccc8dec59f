"""cxr.serving.inference: safe model loading with its sidecar, batch prediction, file prediction.

.venv/bin/pytest tests/test_inference.py
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.errors import CxrError
from cxr.data.images import load_resized
from cxr.serving.inference import LoadedModel, Prediction, load_model, predict_arrays, predict_files

SIZE = 32


def probe_model(size: int = SIZE, seed: int = 0):
    """A tiny functional CNN whose output depends strongly on where bright pixels are.

    Fixed convolutions pass the pixels on and fixed random dense weights (not trained) spread
    the probabilities over (0, 1), so two different images give clearly different predictions.
    """
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    x = layers.Rescaling(1.0 / 255)(inputs)
    x = layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(x)
    x = layers.Flatten()(x)
    outputs = layers.Dense(1, activation="sigmoid", name="head")(x)
    model = keras.Model(inputs, outputs, name="probe")
    kernel = np.zeros((3, 3, 1, 2), "float32")
    kernel[1, 1, 0, 0] = 1.0  # channel 0: the pixel itself; channel 1: a 3x3 mean
    kernel[:, :, 0, 1] = 1.0 / 9
    model.get_layer("conv").set_weights([kernel, np.zeros(2, "float32")])
    rng = np.random.default_rng(seed)
    model.get_layer("head").set_weights(
        [rng.normal(0, 0.15, (size * size * 2, 1)).astype("float32"), np.zeros(1, "float32")]
    )
    return model


def sidecar(size: int = SIZE, threshold: float = 0.5, variant: str = "probe") -> dict:
    """A sidecar as design.md describes it (train writes the real one)."""
    return {
        "variant": variant,
        "model": "cnn",
        "image_size": size,
        "resize": "squash",
        "threshold": threshold,
        "threshold_rule": "youden",
        "val": {"roc_auc": 0.5, "accuracy": 0.5, "sensitivity": 0.5, "specificity": 0.5, "n": 10},
        "epochs_run": 1,
        "train_seconds": 0.1,
        "seed": 42,
        "params": {"image_size": size},
    }


def save_model(model, path: Path, meta: dict) -> Path:
    """Save `model` to `path` (.keras) with its sidecar next to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def xray(seed: int = 0, size: tuple[int, int] = (64, 48)) -> np.ndarray:
    """An asymmetric uint8 test picture (H, W): a smooth ramp plus a bright blob off-centre."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.15, 0.4) * h, rng.uniform(0.15, 0.4) * w
    img = 40 + 80 * xx / w + 130 * np.exp(-(((yy - cy) / (0.15 * h)) ** 2 + ((xx - cx) / (0.15 * w)) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return save_model(
        probe_model(), tmp_path_factory.mktemp("models") / "models" / "probe.keras", sidecar(threshold=0.45)
    )


@pytest.fixture(scope="module")
def loaded(saved) -> LoadedModel:
    return load_model(saved)


def reference(paths: list[Path], loaded: LoadedModel) -> np.ndarray:
    """What evaluation computes: the cache's arrays (load_resized) through predict_arrays."""
    x = np.stack([load_resized(p, [loaded.image_size], loaded.resize)[loaded.image_size] for p in paths])
    return predict_arrays(loaded.model, x)


# --- load_model -----------------------------------------------------------------------------


def test_load_model_reads_model_and_sidecar(saved, loaded):
    assert loaded.meta.variant == "probe" and loaded.image_size == SIZE and loaded.threshold == 0.45
    x = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 1), dtype=np.uint8)
    expected = np.asarray(probe_model()(x.astype("float32"))).ravel()
    np.testing.assert_allclose(predict_arrays(loaded.model, x), expected, atol=1e-6)


def test_missing_sidecar_names_it_and_the_fix(tmp_path, saved):
    lone = tmp_path / "models" / "lone.keras"
    lone.parent.mkdir()
    lone.write_bytes(saved.read_bytes())
    with pytest.raises(CxrError, match=r"lone\.json.*dvc repro train@lone"):
        load_model(lone)


def test_missing_model_file(tmp_path):
    with pytest.raises(CxrError, match=r"nothing\.keras: model file not found"):
        load_model(tmp_path / "nothing.keras")


@pytest.mark.parametrize("damage", ["truncated", "text", "foreign_zip", "bit_flip_config"])
def test_tampered_model_file_is_a_clear_error(tmp_path, saved, damage):
    bad = tmp_path / "models" / "bad.keras"
    bad.parent.mkdir()
    data = saved.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        bad.write_text("not a model\n")
    elif damage == "foreign_zip":
        with zipfile.ZipFile(bad, "w") as zf:
            zf.writestr("readme.txt", "hello")
    else:  # a valid archive whose config names a class that does not exist
        with zipfile.ZipFile(saved) as src, zipfile.ZipFile(bad, "w") as dst:
            for item in src.infolist():
                content = src.read(item.filename)
                if item.filename == "config.json":
                    content = content.replace(b'"Conv2D"', b'"EvilConv2D"')
                dst.writestr(item, content)
    bad.with_suffix(".json").write_text(json.dumps(sidecar()))
    with pytest.raises(CxrError, match=r"bad\.keras.*dvc repro train@bad") as info:
        load_model(bad)
    assert "\n" not in str(info.value)


def test_lambda_layer_is_refused_by_safe_mode(tmp_path):
    import keras

    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    path = save_model(keras.Model(inputs, outputs), tmp_path / "lam.keras", sidecar())
    with pytest.raises(CxrError, match=r"lam\.keras: cannot load model"):
        load_model(path)


@pytest.mark.parametrize(
    "meta, pattern",
    [
        ({"image_size": SIZE, "resize": "squash"}, "missing key.*threshold"),
        (sidecar() | {"image_size": 0}, "image_size must be a positive integer"),
        (sidecar() | {"threshold": 1.5}, r"threshold must be a number in \[0, 1\]"),
        (sidecar() | {"threshold": True}, r"threshold must be a number in \[0, 1\]"),
        (sidecar(size=SIZE + 1), "does not match sidecar image_size"),
        (sidecar() | {"resize": "crop"}, "resize must be one of squash, pad"),
        (sidecar() | {"val": {"roc_auc": 0.9}}, "val must hold numbers"),
        (sidecar() | {"weights": {"sha256": 5}}, "weights must map names to strings"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_bad_sidecar(tmp_path, saved, meta, pattern):
    path = tmp_path / "m.keras"
    path.write_bytes(saved.read_bytes())
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CxrError, match=pattern):
        load_model(path)


def test_sidecar_not_json(tmp_path, saved):
    path = tmp_path / "m.keras"
    path.write_bytes(saved.read_bytes())
    path.with_suffix(".json").write_text("{oops")
    with pytest.raises(CxrError, match=r"m\.json: not valid JSON"):
        load_model(path)


# --- predict_arrays -------------------------------------------------------------------------


def test_predict_arrays_is_independent_of_batch_size(loaded):
    x = np.random.default_rng(2).integers(0, 256, (11, SIZE, SIZE, 1), dtype=np.uint8)
    full = predict_arrays(loaded.model, x, batch_size=64)
    assert full.shape == (11,) and full.dtype == np.float64
    assert np.all((full > 0) & (full < 1)) and full.std() > 1e-3  # the probe spreads its outputs
    np.testing.assert_allclose(predict_arrays(loaded.model, x, batch_size=3), full, atol=1e-6)
    np.testing.assert_allclose(predict_arrays(loaded.model, x[5:6]), full[5:6], atol=1e-6)


def test_predict_arrays_edge_cases(loaded):
    assert predict_arrays(loaded.model, np.zeros((0, SIZE, SIZE, 1), np.uint8)).shape == (0,)
    with pytest.raises(ValueError, match="batch_size"):
        predict_arrays(loaded.model, np.zeros((1, SIZE, SIZE, 1), np.uint8), batch_size=0)
    with pytest.raises(ValueError, match=rf"expected inputs shaped \(N, {SIZE}, {SIZE}, 1\)"):
        predict_arrays(loaded.model, np.zeros((1, SIZE, SIZE), np.uint8))


# --- predict_files: every input kind --------------------------------------------------------


def write_variants(folder: Path) -> dict[str, Path]:
    """The same picture in many containers, plus tiny and huge inputs."""
    gray = xray(0)
    gray[0, 0], gray[0, 1] = 0, 255  # full range, so the 16-bit copy scales back exactly
    pil = Image.fromarray(gray)
    files = {}

    def save(name: str, img: Image.Image, **kw) -> None:
        files[name] = folder / name
        img.save(files[name], **kw)

    save("gray.png", pil)
    save("gray.jpg", pil, quality=95)
    save("rgb.png", pil.convert("RGB"))
    save("rgb.jpg", pil.convert("RGB"), quality=95)
    rgba = pil.convert("RGBA")
    rgba.putalpha(255)
    save("rgba.png", rgba)
    save("palette.png", pil.convert("P"))
    wide = gray.astype(np.uint16) * 257
    save("wide16.png", Image.fromarray(wide))  # uint16 → mode I;16
    save("cmyk.jpg", pil.convert("CMYK"), quality=95)
    save("tiny.png", Image.fromarray(xray(1, (9, 9))))
    big = np.asarray(Image.fromarray(gray).resize((2500, 2000), Image.Resampling.BILINEAR))
    save("large.jpg", Image.fromarray(big), quality=90)
    return files


def test_predict_files_handles_every_container(tmp_path, loaded):
    files = write_variants(tmp_path)
    gray16 = np.asarray(Image.open(files["wide16.png"]))
    assert gray16.dtype != np.uint8  # really a 16-bit file
    paths = list(files.values())
    preds = predict_files(paths, loaded, batch_size=4)
    assert [p.path for p in preds] == [str(p) for p in paths]
    assert all(p.ok and p.error is None for p in preds), [p.error for p in preds if p.error]
    probs = np.array([p.probability for p in preds])
    np.testing.assert_allclose(probs, reference(paths, loaded), atol=1e-6)
    for p in preds:
        assert p.label == ("PNEUMONIA" if p.probability >= 0.45 else "NORMAL") and p.threshold == 0.45
    by = {name: pred.probability for name, pred in zip(files, preds)}
    # lossless containers of the same picture give the same answer; lossy ones nearly
    for name in ("rgb.png", "rgba.png", "palette.png", "wide16.png"):
        assert by[name] == pytest.approx(by["gray.png"], abs=1e-6), name
    for name in ("gray.jpg", "rgb.jpg", "cmyk.jpg", "large.jpg"):
        assert by[name] == pytest.approx(by["gray.png"], abs=0.03), name
    assert abs(by["tiny.png"] - by["gray.png"]) > 1e-3  # a different picture is told apart


def test_exif_rotated_jpeg_is_predicted_upright(tmp_path, loaded):
    pil = Image.fromarray(xray(3))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    tagged, upright, raw = tmp_path / "tagged.jpg", tmp_path / "upright.jpg", tmp_path / "raw.jpg"
    pil.save(tagged, quality=100, exif=exif.tobytes())
    pil.transpose(Image.Transpose.ROTATE_270).save(upright, quality=100)
    pil.save(raw, quality=100)
    p_tagged, p_upright, p_raw = (p.probability for p in predict_files([tagged, upright, raw], loaded))
    assert p_tagged == pytest.approx(p_upright, abs=5e-3)
    assert abs(p_tagged - p_raw) > 0.02  # ignoring the tag would have been caught


def test_bad_files_fail_alone(tmp_path, loaded):
    good1, good2 = tmp_path / "a.png", tmp_path / "d.png"
    Image.fromarray(xray(4)).save(good1)
    Image.fromarray(xray(5)).save(good2)
    corrupt, empty, missing, small = tmp_path / "b.jpg", tmp_path / "c.jpeg", tmp_path / "gone.png", tmp_path / "s.png"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    empty.write_bytes(b"")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(small)
    paths = [good1, corrupt, empty, missing, small, good2]
    preds = predict_files(paths, loaded, batch_size=2)
    assert [p.ok for p in preds] == [True, False, False, False, False, True]
    assert "b.jpg: cannot decode image" in preds[1].error
    assert "c.jpeg: cannot decode image (empty file)" in preds[2].error
    assert "gone.png: no such file" in preds[3].error
    assert "too small" in preds[4].error
    assert all(p.probability is None and p.label is None for p in preds[1:5])
    np.testing.assert_allclose(
        [preds[0].probability, preds[5].probability], reference([good1, good2], loaded), atol=1e-6
    )


def test_prediction_as_dict_round_trips_json():
    p = Prediction("x.png", 0.25, "NORMAL", 0.5)
    assert json.loads(json.dumps(p.as_dict())) == {
        "path": "x.png",
        "probability": 0.25,
        "label": "NORMAL",
        "threshold": 0.5,
        "threshold_source": "validation",
        "ood_score": None,
        "ood": None,
        "ood_reason": None,
        "ood_detector": None,
        "refer_low": None,
        "refer_high": None,
        "error": None,
    }
