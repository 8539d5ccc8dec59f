"""An untrained backbone whose features still tell images apart, for the tiny pipeline.

    python -m testkit.backbone OUT.weights.h5 ALPHA SIZE      # testkit.pipeline (transfer.weights)

With `transfer.weights: none` a MobileNetV2's BatchNorm layers hold the statistics of a fresh
layer (mean 0, variance 1) while the activations of random convolutions shrink by about 10x per
block: at 48 px its last block outputs ~1e-10 for every image, so the transfer variants' heads
see a constant and answer one probability for every image (that probability is then the
threshold, and any float difference of an export flips classes). Here the random backbone's
BatchNorm statistics are re-estimated on synthetic X-rays, as `cxr.model.robust` does for
ImageNet ones, so each block's output keeps unit scale and differs between images. Seeded:
the same file on every machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_backbone_weights(out: Path, alpha: float, size: int, n_images: int = 64) -> Path:
    import keras

    from cxr.core import params as cxr_params
    from cxr.model.architectures import build_transfer_frozen, find_backbone
    from cxr.model.robust import reestimate_batchnorm
    from testkit.synth import make_xray

    keras.utils.set_random_seed(0)
    variant = cxr_params.VariantParams(
        name="backbone",
        model="transfer_frozen",
        image_size=size,
        epochs=1,
        batch_size=8,
        optimizer="adam",
        learning_rate=1e-3,
    )
    transfer = cxr_params.TransferParams(backbone="mobilenet_v2", alpha=alpha, weights="none")
    model = build_transfer_frozen(variant, transfer, seed=0)
    labels = ("NORMAL", "PNEUMONIA")
    x = np.stack([np.asarray(make_xray(labels[i % 2], i, (size, size))) for i in range(n_images)])[..., None]
    reestimate_batchnorm(model, x)
    find_backbone(model).save_weights(out)
    return out


if __name__ == "__main__":
    write_backbone_weights(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))
