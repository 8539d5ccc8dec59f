"""The linear probe: a logistic regression on a frozen EfficientNet-Lite's pooled features.

.venv/bin/pytest -q tests/model/test_linear_probe.py
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from cxr.core import params as cxr_params
from cxr.core.errors import CxrError
from cxr.evaluation.gate import penultimate
from cxr.model.architectures import build_model, find_backbone, last_conv_layer, pooled_features
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.model.training import train_variant
from tests.model.conftest import tiny_raw_params, tiny_split

SIZE = 64


def probe_params(backbone: str = "efficientnet_lite0", weights: str = "imagenet", **extra) -> cxr_params.Params:
    raw = tiny_raw_params(SIZE)
    raw["transfer"]["weights"] = weights
    raw["variants"]["probe"] = {
        "model": "linear_probe",
        "image_size": SIZE,
        "init_from": cxr_params.FRESH,
        "shared": "transfer",
        "optimizer": "adam",
        "learning_rate": 0.001,
        "batch_size": 8,
        "epochs": 1,
        "backbone": backbone,
        **extra,
    }
    return cxr_params.parse(raw)


def test_probe_is_the_logistic_regression_it_fitted_folded_into_one_sigmoid_unit():
    params = probe_params(c_values=[0.01, 1.0])
    variant = params.variant("probe")
    train, val = tiny_split(24, SIZE, seed=1), tiny_split(12, SIZE, seed=2)
    result = train_variant(variant, params, train, val, verbose=0)
    # the model is pixels -> frozen Lite0 -> 1280 pooled features -> one sigmoid unit
    assert find_backbone(result.model).name == "backbone" and not find_backbone(result.model).trainable
    assert last_conv_layer(find_backbone(result.model)).name == "top_conv"
    assert penultimate(result.model).output.shape[-1] == 1280
    # the same fit by hand on the same features gives the same probabilities
    features = pooled_features(variant, variant.backbone(params.transfer))
    f_train = forward_arrays(features, train.x).astype(np.float64)
    f_val = forward_arrays(features, val.x).astype(np.float64)
    mean, scale = f_train.mean(0), f_train.std(0) + 1e-6
    best_c = [0.01, 1.0][int(np.argmax(result.history["val_roc_auc"]))]
    fit = LogisticRegression(C=best_c, class_weight="balanced", max_iter=5000).fit((f_train - mean) / scale, train.y)
    expected = fit.predict_proba((f_val - mean) / scale)[:, 1]
    np.testing.assert_allclose(predict_arrays(result.model, val.x), expected, atol=1e-4)
    assert result.history["C"] == [0.01, 1.0] and len(result.history["val_roc_auc"]) == 2
    # it learned the tiny task (bright blob = pneumonia) from ImageNet features alone
    assert result.meta.val.roc_auc > 0.8


def test_probe_is_deterministic():
    params = probe_params(c_values=[0.1])
    variant = params.variant("probe")
    train, val = tiny_split(16, SIZE, seed=3), tiny_split(8, SIZE, seed=4)
    a = train_variant(variant, params, train, val, verbose=0)
    b = train_variant(variant, params, train, val, verbose=0)
    np.testing.assert_array_equal(a.val_prob, b.val_prob)


def test_lite_backbones_build_at_the_variant_size_with_imagenet_weights():
    params = probe_params(backbone="efficientnet_lite2")
    model = build_model(params.variant("probe"), params)
    assert model.input_shape == (None, SIZE, SIZE, 1) and model.output_shape == (None, 1)
    assert find_backbone(model).count_params() > 4_000_000


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"c_values": []}, "c_values: must be a non-empty list of positive numbers"),
        ({"c_values": [0.1, -1]}, "c_values: must be a non-empty list of positive numbers"),
        ({"backbone": "resnet50"}, "backbone"),
        ({"dropout": 0.2}, "unknown key"),
    ],
)
def test_bad_probe_params_are_refused_before_tensorflow(extra, message):
    with pytest.raises(CxrError, match=message):
        probe_params(**extra)


def test_lite_backbone_takes_a_keras_weights_file_and_refuses_one_that_does_not_fit(tmp_path):
    params = probe_params(weights="none")
    variant = params.variant("probe")
    original = find_backbone(build_model(variant, params))
    saved = tmp_path / "lite0.weights.h5"
    original.save_weights(saved)
    loaded = find_backbone(build_model(variant, probe_params(weights=str(saved))))
    for a, b in zip(original.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = probe_params(backbone="efficientnet_lite2", weights=str(saved))
    with pytest.raises(CxrError, match=r"transfer.weights: .*lite0.weights.h5 does not fit efficientnet_lite2"):
        build_model(other.variant("probe"), other)
