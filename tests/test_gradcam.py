"""cxr.evaluation.gradcam: target discovery (also inside nested backbones), heatmaps, overlays, grids.

.venv/bin/pytest tests/test_gradcam.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.errors import CxrError
from cxr.evaluation.gradcam import GradCam, gradcam, gradcam_grid, overlay

SIZE = 32


def positive_head():
    """A sigmoid unit with positive weights: every feature counts for pneumonia, so the map of
    a ReLU feature map is non-empty by construction, not by a lucky random initialisation."""
    import keras

    return keras.layers.Dense(
        1, activation="sigmoid", kernel_initializer=keras.initializers.RandomUniform(0.01, 0.1, seed=1)
    )


def _backbone(channels: int, pool_inside: bool, size: int = SIZE):
    """A small functional 'backbone' taking RGB, like the keras.applications ones."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(channels, 3, padding="same", activation="relu")(x)
    if pool_inside:
        x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="backbone")


def nested_model(pool_inside: bool, size: int = SIZE):
    """Input → Rescaling → gray to RGB → nested backbone → (pool) → Dropout → sigmoid."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    x = layers.Rescaling(1.0 / 127.5, offset=-1)(inputs)
    x = layers.Concatenate()([x, x, x])
    x = _backbone(6, pool_inside, size)(x)
    if not pool_inside:
        x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, positive_head()(x), name=f"nested_{'pool' if pool_inside else 'map'}")


def sequential_model(size: int = SIZE):
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input((size, size, 1)),
            layers.Rescaling(1.0 / 255),
            layers.Conv2D(4, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Conv2D(8, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            positive_head(),
        ],
        name="plain",
    )


def spot_model(sign: float, nested: bool, size: int = SIZE):
    """score = sigmoid(sign · max over pixels of x/255): all evidence sits at the brightest pixel."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 1))
    x = layers.Rescaling(1.0 / 255)(inputs)
    conv = layers.Conv2D(1, 1, activation="relu", name="pass")
    if nested:
        inner_in = keras.Input((size, size, 1))
        x = keras.Model(inner_in, conv(inner_in), name="inner")(x)
    else:
        x = conv(x)
    x = layers.GlobalMaxPooling2D()(x)
    head = layers.Dense(1, activation="sigmoid", name="head")
    model = keras.Model(inputs, head(x))
    conv.set_weights([np.ones((1, 1, 1, 1), "float32"), np.zeros(1, "float32")])
    head.set_weights([np.full((1, 1), sign, "float32"), np.zeros(1, "float32")])
    return model


def image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, size, size, 1), dtype=np.uint8)


def roundtrip(model, tmp_path: Path):
    """Save and reload as the pipeline does (a loaded Sequential has several graphs per layer)."""
    import keras

    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    return keras.saving.load_model(path, safe_mode=True, compile=False)


@pytest.fixture(autouse=True, scope="module")
def _seed():
    import keras

    keras.utils.set_random_seed(7)


@pytest.mark.parametrize(
    "build",
    [lambda: nested_model(False), lambda: nested_model(True), sequential_model],
    ids=["nested_map", "nested_pool", "sequential"],
)
def test_heatmap_shape_range_and_not_constant(build, tmp_path):
    model = build()
    for m in (model, roundtrip(model, tmp_path)):
        heat = gradcam(m, image())
        assert heat.shape == (SIZE, SIZE) and heat.dtype == np.float32
        assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
        assert heat.std() > 0.01


def test_loaded_model_gives_the_same_heatmap(tmp_path):
    model = nested_model(True)
    np.testing.assert_allclose(gradcam(roundtrip(model, tmp_path), image(3)), gradcam(model, image(3)), atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_heatmap_points_at_the_evidence(nested):
    x = np.full((1, SIZE, SIZE, 1), 30, np.uint8)
    x[0, 5, 22, 0] = 250  # the one pixel the score depends on
    heat = gradcam(spot_model(+1.0, nested), x)
    assert np.unravel_index(np.argmax(heat), heat.shape) == (5, 22)
    assert heat[5, 22] == pytest.approx(1.0) and heat[20, 5] < 0.2


def test_evidence_against_pneumonia_gives_an_empty_map():
    x = np.full((1, SIZE, SIZE, 1), 30, np.uint8)
    x[0, 5, 22, 0] = 250
    model = spot_model(-1.0, nested=False)
    heat = gradcam(model, x)
    assert heat.shape == (SIZE, SIZE) and not heat.any()
    normal = gradcam(model, x, target="normal")  # the same spot is evidence for NORMAL
    assert np.unravel_index(np.argmax(normal), normal.shape) == (5, 22)
    with pytest.raises(ValueError, match="target"):
        gradcam(model, x, target="virus")


def test_gradients_choose_the_channels():
    """Two channels, x and its negative; the head likes the first, dislikes the second.
    Plain activations would sum to a constant; Grad-CAM keeps only the bright half."""
    import keras
    from keras import layers

    inputs = keras.Input((SIZE, SIZE, 1))
    conv = layers.Conv2D(2, 1, activation="relu")
    x = layers.GlobalAveragePooling2D()(conv(layers.Rescaling(1.0 / 255)(inputs)))
    head = layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, head(x))
    conv.set_weights([np.array([1.0, -1.0], "float32").reshape(1, 1, 1, 2), np.array([0.0, 1.0], "float32")])
    head.set_weights([np.array([[1.0], [-1.0]], "float32"), np.zeros(1, "float32")])
    img = np.full((1, SIZE, SIZE, 1), 20, np.uint8)
    img[:, :, : SIZE // 2] = 230  # bright left half
    heat = gradcam(model, img)
    assert heat[:, : SIZE // 2 - 2].min() > 0.9 and heat[:, SIZE // 2 + 2 :].max() == 0.0


def test_mobilenet_v2_backbone_with_pooling_inside():
    """The transfer variants' architecture (random weights: no download)."""
    import keras
    from keras import layers

    backbone = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), alpha=0.35, include_top=False, weights=None, pooling="avg"
    )
    inputs = keras.Input((64, 64, 1))
    x = layers.Rescaling(1.0 / 127.5, offset=-1)(inputs)
    x = backbone(layers.Concatenate()([x, x, x]))
    model = keras.Model(inputs, positive_head()(x))
    heat = GradCam(model)(image(1, 64)[0])  # (S, S, 1) is accepted too
    assert heat.shape == (64, 64) and 0.0 <= heat.min() and heat.max() == pytest.approx(1.0) and heat.std() > 0.01


def test_model_without_convolutions_is_refused():
    import keras
    from keras import layers

    dense = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            layers.Rescaling(1.0 / 255),
            layers.Flatten(),
            layers.Dense(1, activation="sigmoid"),
        ],
        name="dense_only",
    )
    with pytest.raises(CxrError, match="dense_only.*no convolution layer"):
        GradCam(dense)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(1, S, S, 1\)"):
        gradcam(sequential_model(), np.zeros((2, SIZE, SIZE, 1), np.uint8))


def test_overlay_blends_jet_over_gray():
    from matplotlib import colormaps

    gray = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8)
    heat = np.linspace(0, 1, SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE)
    rgb = overlay(gray, heat)
    assert rgb.shape == (SIZE, SIZE, 3) and rgb.dtype == np.uint8
    jet = colormaps["jet"](heat[7, 9])[:3]
    expected = np.round(0.6 * gray[7, 9, 0] + 0.4 * 255 * np.array(jet))
    np.testing.assert_allclose(rgb[7, 9], expected, atol=1)
    np.testing.assert_array_equal(overlay(gray[..., 0], heat, alpha=0.0), np.repeat(gray, 3, axis=-1))
    with pytest.raises(ValueError, match="same"):
        overlay(gray, heat[:-1])


def test_gradcam_grid_writes_a_png(tmp_path):
    images = [image(i)[0] for i in range(5)]
    out = gradcam_grid(
        sequential_model(), images, [f"TP {i}" for i in range(5)], tmp_path / "figs" / "grid.png", ncols=3
    )
    assert out == tmp_path / "figs" / "grid.png"
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > png.height  # 3 columns by 2 rows
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]  # no temporary files left
    with pytest.raises(ValueError, match="titles"):
        gradcam_grid(sequential_model(), images, ["only one"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="targets"):
        gradcam_grid(sequential_model(), images, ["t"] * 5, tmp_path / "x.png", targets=["normal"])
    with pytest.raises(ValueError, match="at least one"):
        gradcam_grid(sequential_model(), [], [], tmp_path / "x.png")
