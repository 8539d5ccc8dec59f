"""EfficientNet-Lite port: the torch-free legacy .pth reader, logits against the PyTorch reference
(tests/fixtures/make_efficientnet_lite_reference.py), ImageNet classes of three photos, the headless
features and a .keras round trip."""

from __future__ import annotations

import functools
import pickle
import struct
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from cxr.model.efficientnet_lite import SPECS, build_efficientnet_lite, preprocess, read_legacy_torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# Measured (keras 3.15.1, TF 2.21 CPU vs torch 2.13.0 CPU): max |logit difference| 5.7e-6 (lite0), 4.1e-6 (lite2),
# logits up to 9.2; a wrong normalisation such as (x - 127.5) / 127.5 already moves them by 2.5e-2.
LOGIT_TOLERANCE = 1e-4
# ImageNet class indices that count as right for each photo.
EXPECTED = {
    "chelsea": {281: "tabby", 282: "tiger cat", 285: "Egyptian cat"},
    "coffee": {967: "espresso", 968: "cup", 504: "coffee mug"},
    "rocket": {657: "missile", 744: "projectile", 812: "space shuttle"},
}


@functools.cache
def reference() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "efficientnet_lite_reference.npz") as npz:
        return dict(npz)


@functools.cache
def imagenet_model(name: str) -> keras.Model:
    return build_efficientnet_lite(name, include_top=True, weights="imagenet")


def run(model: keras.Model, x: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


# --- a legacy torch file written opcode by opcode, without torch ------------------------------------


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(s: str) -> bytes:
    return b"X" + struct.pack("<I", len(s.encode())) + s.encode()


def _int(i: int) -> bytes:
    return b"J" + struct.pack("<i", i)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(storage_type: str, key: str, numel: int, offset: int, shape: tuple, stride: tuple) -> bytes:
    """torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())"""
    storage = _tuple(_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"), _int(numel), b"N") + b"Q"
    hooks = _global("collections", "OrderedDict") + b")R"
    args = _tuple(storage, _int(offset), _tuple(*map(_int, shape)), _tuple(*map(_int, stride)), b"\x89", hooks)
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def write_legacy(
    path: Path, container: tuple[str, str] = ("collections", "OrderedDict"), floats_stored: int = 8
) -> None:
    """A state dict of a transposed (3, 2) view at offset 2 of 8 floats and a 0-d int64, as torch < 1.6 saves it."""
    items = (
        _str("w")
        + _tensor("FloatStorage", "0", 8, 2, (3, 2), (1, 3))
        + _str("n")
        + _tensor("LongStorage", "1", 1, 0, (), ())
    )
    state = b"\x80\x02" + _global(*container) + b")R(" + items + b"u."
    head = b"".join(
        pickle.dumps(v, protocol=2)
        for v in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    floats = struct.pack("<q", 8) + np.arange(floats_stored, dtype="<f4").tobytes()
    longs = struct.pack("<q", 1) + struct.pack("<q", 42)
    path.write_bytes(head + state + pickle.dumps(["0", "1"], protocol=2) + floats + longs)


def test_legacy_reader_reads_a_handmade_file(tmp_path):
    write_legacy(tmp_path / "ok.pth")
    state = read_legacy_torch(tmp_path / "ok.pth")
    assert list(state) == ["w", "n"]
    np.testing.assert_array_equal(state["w"], np.arange(2, 8, dtype=np.float32).reshape(2, 3).T)
    assert (
        state["w"].dtype == np.float32 and state["n"].dtype == np.int64 and state["n"].shape == () and state["n"] == 42
    )


def test_legacy_reader_refuses_unknown_globals_and_short_storages(tmp_path):
    write_legacy(tmp_path / "evil.pth", container=("os", "system"))
    with pytest.raises(pickle.UnpicklingError, match="refusing the global os.system"):
        read_legacy_torch(tmp_path / "evil.pth")
    write_legacy(tmp_path / "short.pth", floats_stored=7)
    with pytest.raises(ValueError, match="storage"):
        read_legacy_torch(tmp_path / "short.pth")


# --- the port against the PyTorch reference --------------------------------------------------------


@pytest.mark.parametrize("name", ["lite0", "lite2"])
def test_logits_match_the_pytorch_reference(name):
    ref = reference()
    logits = run(imagenet_model(name), preprocess(ref[f"{name}_inputs"]))
    diff = np.abs(logits - ref[f"{name}_logits"]).max()
    assert diff <= LOGIT_TOLERANCE, f"{name}: max |logit difference| {diff:.2e}"
    np.testing.assert_array_equal(logits.argmax(axis=1), ref[f"{name}_logits"].argmax(axis=1))


@pytest.mark.parametrize("name", ["lite0", "lite2"])
def test_imagenet_top5_of_known_photos(name):
    size = SPECS[name][2]
    photos = [
        Image.open(FIXTURES / "photos" / f"{p}.jpg").convert("RGB").resize((size, size), Image.BILINEAR)
        for p in EXPECTED
    ]
    logits = run(imagenet_model(name), preprocess(np.stack([np.asarray(p) for p in photos])))
    for (photo, expected), row in zip(EXPECTED.items(), logits):
        top5 = [int(i) for i in np.argsort(-row)[:5]]
        assert expected.keys() & set(top5), f"{name} {photo}: top-5 {top5}, expected one of {expected}"


def test_headless_features_and_keras_round_trip(tmp_path):
    ref = reference()
    model = build_efficientnet_lite(
        "lite0", include_top=False, pooling="avg", weights="imagenet", include_preprocessing=True
    )
    assert model.output_shape == (None, 1280)
    images = ref["lite0_inputs"].astype(np.float32)  # include_preprocessing: raw [0, 255] RGB in
    features = run(model, images)
    np.testing.assert_allclose(features, ref["lite0_features"], atol=1e-4)
    model.save(tmp_path / "lite0.keras")
    reloaded = keras.saving.load_model(tmp_path / "lite0.keras", safe_mode=True)
    np.testing.assert_allclose(run(reloaded, images), features, atol=1e-6)


def test_shapes_without_weights_and_bad_arguments():
    assert build_efficientnet_lite("lite2").output_shape == (None, 9, 9, 1280)  # 260 px, SAME padding: ceil(260 / 32)
    assert build_efficientnet_lite("lite0", input_shape=(96, 96, 3), pooling="avg").output_shape == (None, 1280)
    with pytest.raises(ValueError, match="lite1"):
        build_efficientnet_lite("lite1")
    with pytest.raises(ValueError, match="pooling"):
        build_efficientnet_lite("lite0", pooling="max")
