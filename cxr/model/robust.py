"""Robustness options of the modern variant: BatchNorm statistics re-estimated on chest X-rays
before fine-tuning, and test-time augmentation over fixed crop views (variants.<v>.bn_reestimate,
variants.<v>.tta in params.yaml).
"""

from __future__ import annotations

from typing import Any

import keras
from keras import layers

from cxr.core.constants import TTA_OUTPUT
from cxr.model.architectures import all_layers, find_backbone, freeze_batchnorm
from cxr.model.forward import called_on


def reestimate_batchnorm(model: keras.Model, x: Any, batch_size: int = 64) -> int:
    """Replace the backbone's BatchNorm moving statistics (ImageNet's) by those of the images `x`
    (uint8 or float pixels, N × S × S × 1): every BatchNorm runs in training mode over `x` in
    fixed order, its moving averages reset to the running mean over the batches. The layers stay
    frozen afterwards. Returns the number of BatchNorm layers re-estimated.

    Called before fine-tuning (variants.<v>.bn_reestimate), so the frozen statistics the new
    weights adapt to are those of chest X-rays, not of ImageNet photographs.
    """
    base = find_backbone(model)
    norms = [layer for layer in all_layers(base) if isinstance(layer, layers.BatchNormalization)]
    if not norms or len(x) == 0:
        return 0
    # the preprocessing in front of the backbone (the augmentation in it is inactive outside training)
    fed = called_on(base)
    to_backbone = keras.Model(model.inputs[0], fed)
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.trainable = True
    try:
        for k, start in enumerate(range(0, len(x), batch_size)):
            for layer in norms:
                layer.momentum = k / (k + 1)  # moving = running mean of the batches' statistics
            batch = keras.ops.convert_to_tensor(x[start : start + batch_size], dtype="float32")
            base(to_backbone(batch, training=False), training=True)
    finally:
        for layer, momentum in zip(norms, momenta):
            layer.momentum = momentum
        freeze_batchnorm(base)
    return len(norms)


TTA_CROP = 0.075  # share of the side each test-time view crops away before scaling back up


def tta_views(size: int) -> dict[str, tuple[tuple[int, int], tuple[int, int]] | None]:
    """The 6 fixed views of test-time augmentation: the image itself, a centred crop and four
    crops shifted up / down / left / right, each of (1 − TTA_CROP) of the side, scaled back to
    `size`. No flips: the anatomy is lateralised."""
    crop = max(1, round(size * TTA_CROP))
    a, b = crop // 2, crop - crop // 2
    return {
        "identity": None,
        "centre": ((a, b), (a, b)),
        "up": ((0, crop), (a, b)),
        "down": ((crop, 0), (a, b)),
        "left": ((a, b), (0, crop)),
        "right": ((a, b), (crop, 0)),
    }


def tta_model(model: keras.Model) -> keras.Model:
    """`model` averaged over its `tta_views`, as one functional model (Cropping2D + Resizing, no
    Lambda layers), so evaluate, the OOD gate (features of the identity view), the export and
    `cxr predict` use it like any other model."""
    shape = tuple(model.inputs[0].shape[1:])
    size = int(shape[0])
    inputs = keras.Input(shape, dtype="float32", name="pixels")
    outputs = []
    for name, crop in tta_views(size).items():
        x = inputs
        if crop is not None:
            x = layers.Cropping2D(crop, name=f"tta_{name}")(x)
            x = layers.Resizing(size, size, interpolation="bilinear", name=f"tta_{name}_resize")(x)
        outputs.append(model(x))
    return keras.Model(inputs, layers.Average(name=TTA_OUTPUT)(outputs), name=f"{model.name}_tta")
