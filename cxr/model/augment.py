"""Random image transforms for training: the seed notebook's and the modern variant's lighter,
optionally photometric, family. Keras runs them only in training (predict and evaluate skip them).
Mixup mixes whole batches and lives in cxr.model.training.
"""

from __future__ import annotations

import keras
from keras import layers

AUGMENT_NAME = "augment"


def augmentation(seed: int, kind: str = "seed", strength: float = 1.0, photometric: float = 0.0) -> keras.Sequential:
    """Random image transforms, inside the model before the first layer that learns.

    kind "seed": the seed notebook's ImageDataGenerator settings (rotation 40°, shifts 0.2,
    shear 0.2, zoom 0.2, horizontal flip, nearest fill). ImageDataGenerator's shear_range was
    in degrees (0.2° is next to nothing); RandomShear's 0.2 is a fraction of the image (up to
    about 11°), i.e. stronger than the seed's.
    kind "light": the modern variant's ±10° rotation, 0.05 shift, 0.1 zoom and contrast, all
    scaled by `strength`; no shear and no flip. `photometric` > 0 adds an AugMix-like
    acquisition family (random brightness ±20% and Gaussian blur up to σ 1.5, both scaled by
    it), the kind of shift the stress report measures; mixup lives in cxr.model.training.
    """
    if kind == "seed":
        transforms = [
            layers.RandomRotation(40 / 360, fill_mode="nearest", seed=seed),
            layers.RandomTranslation(0.2, 0.2, fill_mode="nearest", seed=seed + 1),
            # (0, 0.2), not 0.2: Keras 3.15 saves 0.2 as (-0.2, 0.2), which it then refuses to load.
            # The random horizontal flip after it turns half of these shears into negative ones.
            layers.RandomShear(x_factor=(0.0, 0.2), fill_mode="nearest", seed=seed + 2),
            layers.RandomFlip("horizontal", seed=seed + 3),
            layers.RandomZoom(0.2, fill_mode="nearest", seed=seed + 4),
        ]
    elif kind == "light":
        if not 0 < strength <= 5:
            raise ValueError(f"augment_strength must be in (0, 5], got {strength}")
        transforms = [
            layers.RandomRotation(10 / 360 * strength, fill_mode="nearest", seed=seed),
            layers.RandomTranslation(0.05 * strength, 0.05 * strength, fill_mode="nearest", seed=seed + 1),
            layers.RandomZoom(min(0.1 * strength, 0.9), fill_mode="nearest", seed=seed + 2),
            layers.RandomContrast(min(0.1 * strength, 1.0), value_range=(0, 255), seed=seed + 3),
        ]
        if photometric < 0:
            raise ValueError(f"photometric must be >= 0, got {photometric}")
        if photometric > 0:
            transforms += [
                layers.RandomBrightness(min(0.2 * photometric, 1.0), value_range=(0, 255), seed=seed + 4),
                layers.RandomGaussianBlur(
                    factor=(0.0, 1.0),
                    kernel_size=5,
                    sigma=(0.1, 1.5 * photometric),
                    value_range=(0, 255),
                    seed=seed + 5,
                ),
            ]
    else:
        raise ValueError(f"augmentation kind must be 'seed' or 'light', got {kind!r}")
    return keras.Sequential(transforms, name=AUGMENT_NAME)
