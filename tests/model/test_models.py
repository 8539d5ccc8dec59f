"""Model builders: every variant trains, saves and reloads safely; backbones, preprocessing,
fine-tuning's trainable set, ImageNet weights offline, and clear errors for bad params."""

from __future__ import annotations

from dataclasses import replace

import keras
import numpy as np
import pytest

from cxr.core.errors import CxrError
from cxr.model.architectures import (
    backbone_preprocessing,
    build_model,
    find_backbone,
    freeze_batchnorm,
    last_conv_layer,
    make_backbone,
)
from cxr.model.training import save_result, train_variant
from cxr.serving.inference import predict_arrays as predict

from .conftest import SHARED_KERAS, SIZE, tiny_params, tiny_split

# transfer_features is covered by test_training's sidecar test, transfer_frozen by the fine-tuning test.
VARIANTS = ["dense_baseline", "cnn_baseline", "cnn_augmented", "modern"]


def train_save_reload(variant, params, splits, tmp_path):
    train, val = splits
    result = train_variant(variant, params, train, val, verbose=0)
    path = tmp_path / f"{variant.name}.keras"
    save_result(result, path, tmp_path / f"{variant.name}.json")
    reloaded = keras.saving.load_model(path, safe_mode=True)
    return result, reloaded


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_trains_saves_and_reloads_safely(name, tmp_path):
    size = SIZE if name.startswith("cnn") else 32  # the 4-block cnn needs more than 32 px
    params = tiny_params(size=size)
    splits = tiny_split(8, size=size, seed=1), tiny_split(6, size=size, seed=2)
    result, reloaded = train_save_reload(params.variant(name), params, splits, tmp_path)
    x = splits[1].x
    before = predict(result.model, x)
    assert before.shape == (len(x),) and np.all((before >= 0) & (before <= 1))
    np.testing.assert_allclose(predict(reloaded, x), before, rtol=1e-5, atol=1e-6)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in reloaded.layers)
    assert reloaded.input_shape == (None, size, size, 1)
    if name == "modern":  # BatchNorm stayed in inference mode: moving means still at their initial 0
        bns = [
            layer for layer in find_backbone(result.model).layers if isinstance(layer, keras.layers.BatchNormalization)
        ]
        assert bns and all(not np.any(layer.moving_mean.numpy()) for layer in bns)


@pytest.mark.parametrize("backbone, last_conv", [("mobilenet_v2", "Conv_1"), ("vgg19", "block5_conv4")])
def test_transfer_finetuned_unfreezes_only_last_conv_and_head(backbone, last_conv, tmp_path):
    params = tiny_params(size=32, backbone=backbone)
    splits = tiny_split(8, size=32, seed=1), tiny_split(6, size=32, seed=2)
    if backbone == "mobilenet_v2":  # transfer_frozen trains, saves and reloads like the others
        _, frozen = train_save_reload(params.variant("transfer_frozen"), params, splits, tmp_path)
    else:
        frozen = build_model(params.variant("transfer_frozen"), params)
        frozen.save(tmp_path / "transfer_frozen.keras")
    variant = replace(params.variant("transfer_finetuned"), init_from=str(tmp_path / "transfer_frozen.keras"))
    model = build_model(variant, params)
    last = last_conv_layer(find_backbone(model))
    assert last.name == last_conv
    head = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    expected = {id(w) for layer in [last, *head] for w in layer.trainable_weights}
    assert len(head) == 2 and last.trainable_weights
    assert {id(w) for w in model.trainable_weights} == expected
    x = tiny_split(4, size=32).x
    np.testing.assert_allclose(predict(model, x), predict(frozen, x), rtol=1e-5, atol=1e-6)  # starts where frozen ended
    if backbone == "mobilenet_v2":  # and trains, saves and reloads like the others
        result, again = train_save_reload(variant, params, splits, tmp_path)
        assert result.meta.model == "transfer_finetuned"
        np.testing.assert_allclose(predict(again, x), predict(result.model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "backbone, alpha, last_conv",
    [
        ("vgg19", 1.0, "block5_conv4"),
        ("vgg16", 1.0, "block5_conv3"),
        ("mobilenet", 0.25, "conv_pw_13"),
        ("densenet121", 1.0, "conv5_block16_2_conv"),
    ],
)
def test_backbones_build_small_and_predict(backbone, alpha, last_conv):
    params = tiny_params(size=32, backbone=backbone, alpha=alpha)
    model = build_model(params.variant("transfer_frozen"), params)
    assert last_conv_layer(find_backbone(model)).name == last_conv
    assert {w.name for w in model.trainable_weights} == {"kernel", "bias"}  # only the head's two Dense layers
    assert len(model.trainable_weights) == 4
    prob = model.predict(tiny_split(4, size=32).x.astype("float32"), verbose=0)
    assert prob.shape == (4, 1) and np.all((prob >= 0) & (prob <= 1))


@pytest.mark.parametrize(
    "backbone, module",
    [
        ("vgg19", keras.applications.vgg19),
        ("mobilenet_v2", keras.applications.mobilenet_v2),
        ("densenet121", keras.applications.densenet),
    ],
)
def test_backbone_preprocessing_matches_keras(backbone, module):
    gray = tiny_split(2, size=8).x.astype("float32")
    inputs = keras.Input((8, 8, 1))
    ours = keras.Model(inputs, backbone_preprocessing(backbone, inputs)).predict(gray, verbose=0)
    theirs = module.preprocess_input(np.repeat(gray, 3, axis=-1))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_modern_unfreezes_from_trainable_from_except_batchnorm():
    params = tiny_params(size=32)
    backbone = find_backbone(build_model(params.variant("modern"), params))
    names = [layer.name for layer in backbone.layers]
    start = names.index("block_15_expand")
    for i, layer in enumerate(backbone.layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (i >= start and not is_bn), layer.name
    assert backbone.get_layer("block_15_expand").trainable_weights


def test_freeze_batchnorm_reaches_nested_layers():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization()(inner_in), name="backbone")
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, keras.layers.Dense(1)(inner(outer_in)))
    freeze_batchnorm(outer)
    assert not inner.layers[1].trainable and outer.layers[-1].trainable


def test_imagenet_mobilenet_v2_loads_offline_at_96(require_shared):
    require_shared(SHARED_KERAS / "models")
    params = tiny_params(size=96, weights="imagenet", alpha=0.35)
    variant = params.variant("transfer_frozen")
    imagenet = make_backbone(variant, params.transfer)
    h5 = SHARED_KERAS / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    from_file = make_backbone(variant, replace(params.transfer, weights=str(h5)))
    random = make_backbone(variant, replace(params.transfer, weights="none"))
    for a, b in zip(imagenet.get_weights(), from_file.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(imagenet.get_layer("Conv_1").kernel.numpy(), random.get_layer("Conv_1").kernel.numpy())


def _variant(params, name="cnn_baseline", **changes):
    return replace(params.variant(name), **changes)


@pytest.mark.parametrize(
    "name, changes, transfer, expected",
    [
        ("cnn_baseline", {"image_size": 16}, {}, "variants.cnn_baseline.image_size: 16 px is too small"),
        (
            "transfer_frozen",
            {},
            {"weights": "missing/weights.h5"},
            "transfer.weights: 'missing/weights.h5' is not an existing .h5 file",
        ),
        (
            "transfer_frozen",
            {},
            {"weights": "imagenet", "alpha": 0.6},
            "transfer.alpha: no ImageNet weights for mobilenet_v2 with alpha 0.6",
        ),
        (
            "modern",
            {"extra": {"trainable_from": "no_such_layer"}},
            {},
            "variants.modern.trainable_from: 'no_such_layer'",
        ),
        (
            "transfer_finetuned",
            {"init_from": "nowhere/transfer_frozen.keras"},
            {},
            "init_from: nowhere/transfer_frozen.keras not found; run `dvc repro train@transfer_frozen` first",
        ),
    ],
)
def test_bad_params_give_clear_errors(params, name, changes, transfer, expected):
    """What only building the model can find; names and ranges are checked by cxr.core.params (tests/test_params.py)."""
    variant = replace(params.variant(name), **changes)
    with pytest.raises(CxrError, match="params.yaml") as info:
        build_model(variant, replace(params, transfer=replace(params.transfer, **transfer)))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_backbone_too_small_names_image_size(params):
    variant = replace(params.variant("transfer_frozen"), image_size=20)
    with pytest.raises(CxrError, match=r"variants.transfer_frozen.image_size: 20 px is too small .*use a larger size"):
        build_model(variant, params)


def test_training_errors_name_the_parameter(params, splits):
    train, val = splits
    cases = [
        (_variant(params, epochs=0), "variants.cnn_baseline.epochs: must be a positive integer"),
        (
            _variant(params, batch_size=9),
            "variants.cnn_baseline.batch_size: 9 is larger than the training set (8 images)",
        ),
        (_variant(params, image_size=64), "variants.cnn_baseline.image_size is 64; rerun `dvc repro preprocess`"),
        (
            _variant(params, "transfer_features", augment=True),
            "variants.transfer_features.augment: transfer_features computes",
        ),
    ]
    for variant, expected in cases:
        with pytest.raises(CxrError) as info:
            train_variant(variant, params, train, val, verbose=0)
        assert expected in str(info.value)
    one_class = replace(val, y=np.zeros_like(val.y))
    with pytest.raises(CxrError, match="val split needs both NORMAL and PNEUMONIA"):
        train_variant(params.variant("cnn_baseline"), params, train, one_class, verbose=0)
