"""The robustness options of the modern variant: BatchNorm re-estimation, test-time
augmentation, mixup and the photometric augmentation family (all off by default)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from cxr.core import params as cxr_params
from cxr.core.errors import CxrError
from cxr.evaluation.gate import penultimate
from cxr.model.architectures import build_model, find_backbone
from cxr.model.forward import predict_arrays
from cxr.model.robust import reestimate_batchnorm, tta_model, tta_views
from cxr.model.training import epoch_batches, train_variant

from .conftest import tiny_params, tiny_raw_params, tiny_split


def modern_with(**extra):
    raw = tiny_raw_params()
    raw["variants"]["modern"].update(extra)
    return cxr_params.parse(raw)


def test_batchnorm_reestimated_to_the_images_statistics():
    import keras

    params = tiny_params()
    model = build_model(params.variant("modern"), params)
    base = find_backbone(model)
    first = base.get_layer("bn_Conv1")
    assert np.allclose(first.moving_mean.numpy(), 0.0)  # weights: none → initial statistics
    x = tiny_split(n=12).x
    count = reestimate_batchnorm(model, x, batch_size=4)  # three equal batches
    assert count == sum(isinstance(layer, keras.layers.BatchNormalization) for layer in base.layers)
    # the first BatchNorm's input does not depend on any other: its statistics are exact
    pre = keras.Model(model.inputs, base._inbound_nodes[0].input_tensors[0])
    # training=False: Keras's random augmentation layers default to training mode when called
    conv = keras.Model(base.inputs, base.get_layer("Conv1").output)(pre(x.astype("float32"), training=False)).numpy()
    np.testing.assert_allclose(first.moving_mean.numpy(), conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    batch_vars = [conv[i : i + 4].var(axis=(0, 1, 2)) for i in (0, 4, 8)]
    np.testing.assert_allclose(first.moving_variance.numpy(), np.mean(batch_vars, axis=0), rtol=1e-3, atol=1e-5)
    assert not any(layer.trainable for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization))


def test_tta_averages_the_fixed_views_and_keeps_the_identity_features(tmp_path):
    import keras

    params = tiny_params()
    model = build_model(params.variant("modern"), params)
    x = tiny_split(n=4).x
    reestimate_batchnorm(model, x)  # untrained statistics would leave every output at 0.5
    dense = model.get_layer("pneumonia")
    dense.set_weights(
        [np.random.default_rng(0).normal(0, 1, dense.kernel.shape).astype("float32"), np.zeros(1, "float32")]
    )
    wrapped = tta_model(model)
    size = x.shape[1]
    by_hand = []
    for crop in tta_views(size).values():
        view = x.astype("float32")
        if crop is not None:
            (top, bottom), (left, right) = crop
            view = tf.image.resize(
                view[:, top : size - bottom, left : size - right], (size, size), method="bilinear"
            ).numpy()
        by_hand.append(predict_arrays(model, view))
    np.testing.assert_allclose(predict_arrays(wrapped, x), np.mean(by_hand, axis=0), atol=1e-6)
    assert not np.allclose(by_hand[0], by_hand[1])  # the views differ, so the test can fail
    # the OOD gate's features are those of the un-augmented image
    features = [penultimate(m)(x.astype("float32"), training=False).numpy() for m in (wrapped, model)]
    np.testing.assert_allclose(features[0], features[1], atol=1e-6)
    wrapped.save(tmp_path / "tta.keras")
    loaded = keras.saving.load_model(tmp_path / "tta.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(predict_arrays(loaded, x), predict_arrays(wrapped, x), atol=1e-7)


def test_mixup_mixes_images_labels_and_weights_alike_and_repeats():
    n = 16
    y = np.arange(n) % 2
    x = np.broadcast_to((y * 255).astype(np.uint8)[:, None, None, None], (n, 4, 4, 1)).copy()

    def batches(seed):
        ds = epoch_batches(x, y, batch_size=8, seed=seed, epochs=2, weights={0: 1.0, 1: 3.0}, mixup=0.4)
        return [tuple(t.numpy() for t in b) for b in ds]

    first = batches(7)
    for xb, yb, wb in first:
        np.testing.assert_allclose(xb[:, 0, 0, 0] / 255, yb, atol=1e-5)  # image and label mixed by one λ
        np.testing.assert_allclose(wb, 1 + 2 * yb, atol=1e-5)  # and the class weight too
    assert any(np.any((yb > 0.01) & (yb < 0.99)) for _, yb, _ in first)  # something was mixed
    again = batches(7)
    assert all(np.array_equal(a, b) for one, two in zip(first, again) for a, b in zip(one, two))
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(first, batches(8)))
    with pytest.raises(ValueError, match="class weights"):
        epoch_batches(x, y, batch_size=8, seed=0, epochs=1, mixup=0.4)


def test_modern_trains_with_every_option_on_and_saves(tmp_path):
    import keras

    params = modern_with(photometric=1.0, mixup=0.2, bn_reestimate=True, tta=True)
    train, val = tiny_split(n=16, seed=1), tiny_split(n=8, seed=2)
    result = train_variant(params.variant("modern"), params, train, val, verbose=0)
    assert result.model.layers[-1].name == "tta_mean"
    assert np.all(np.isfinite(result.val_prob)) and 0 <= result.meta.threshold <= 1
    np.testing.assert_allclose(result.val_prob, predict_arrays(result.model, val.x), atol=1e-7)
    result.model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False, safe_mode=True)
    np.testing.assert_allclose(predict_arrays(loaded, val.x), result.val_prob, atol=1e-6)
    assert result.meta.params["tta"] is True and result.meta.params["mixup"] == 0.2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mixup": -0.1}, "variants.modern.mixup"),
        ({"photometric": 6}, "variants.modern.photometric"),
        ({"tta": "yes"}, "variants.modern.tta: must be true or false"),
        ({"bn_reestimate": 1}, "variants.modern.bn_reestimate: must be true or false"),
    ],
)
def test_bad_robustness_options_fail_cleanly(extra, message):
    with pytest.raises(CxrError, match=message):
        modern_with(**extra)


def test_gradcam_explains_a_tta_model_through_its_identity_view():
    from cxr.evaluation.gradcam import gradcam

    params = tiny_params()
    model = build_model(params.variant("modern"), params)
    x = tiny_split(n=1).x.astype("float32")
    np.testing.assert_allclose(gradcam(tta_model(model), x), gradcam(model, x))
