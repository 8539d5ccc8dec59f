"""THE image path: every input kind decodes to the same grayscale uint8 array."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxr.data import images, pixels
from cxr.data.pixels import ImageError


def gradient(w: int = 90, h: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 2 + yy) % 256).astype(np.uint8)


def test_shapes_dtypes_and_sizes(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(gradient()).save(path)
    out = images.load_resized(path, [32, 48])
    assert set(out) == {32, 48}
    assert out[32].shape == (32, 32, 1) and out[48].shape == (48, 48, 1)
    assert out[32].dtype == np.uint8


def test_squash_and_pad_differ_as_documented(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((40, 120), 200, np.uint8)).save(path)
    squash = images.load_resized(path, [60], "squash")[60][:, :, 0]
    pad = images.load_resized(path, [60], "pad")[60][:, :, 0]
    assert (squash > 190).all()  # stretched to fill the square
    # pad keeps the 3:1 aspect: a 20-px band of image, black bars above and below.
    assert (pad[:18] == 0).all() and (pad[-18:] == 0).all() and (pad[25:35] > 190).all()


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_every_mode_becomes_the_same_grayscale(tmp_path, mode):
    gray = gradient()
    base = Image.fromarray(gray)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
        assert img.mode.startswith("I;16")
    elif mode == "P":
        img = base.convert("RGB").quantize(256)
    else:
        img = base.convert(mode)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    img.save(path, quality=100) if mode == "CMYK" else img.save(path)
    got = images.open_image(path)
    assert got.mode == "L" and got.size == base.size
    if mode == "I;16":  # 16-bit data is stretched over its own range (12-bit X-rays stay visible)
        gray = np.round((gray.astype(float) - gray.min()) * 255 / (gray.max() - gray.min()))
    tolerance = 6 if mode in ("CMYK", "P") else 1
    assert np.abs(np.asarray(got, np.int16) - gray).max() <= tolerance


def test_exif_rotation_is_applied(tmp_path):
    gray = gradient(90, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    Image.fromarray(gray).save(path, exif=exif, quality=100)
    got = np.asarray(images.open_image(path), np.int16)
    assert got.shape == (90, 60)
    expected = np.asarray(Image.fromarray(gray).transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(got - expected).mean() < 3


def test_draft_decoding_is_the_same_whoever_asks(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.tile(gradient(), (20, 20))).save(path, quality=90)  # 1800×1200
    together = images.load_resized(path, [64, 128, 256])
    alone = images.load_resized(path, [64])
    assert np.array_equal(together[64], alone[64])


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty file"), (b"<html>not an image</html>", "cannot decode"), ("truncated", "cannot decode")],
)
def test_bad_files_raise_one_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.jpeg"
    if content == "truncated":
        Image.fromarray(gradient(300, 300)).save(path, quality=90)
        content = path.read_bytes()[:400]
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as err:
        images.load_resized(path, [32])
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_tiny_and_huge_images_are_refused(tmp_path, monkeypatch):
    tiny = tmp_path / "tiny.png"
    Image.new("L", (1, 1)).save(tiny)
    with pytest.raises(ImageError, match="too small"):
        images.open_image(tiny)
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    monkeypatch.setattr(pixels, "MAX_PIXELS", 10_000)
    with pytest.raises(ImageError, match="over 10,000 pixels"):
        images.open_image(big)


def test_bad_arguments():
    with pytest.raises(ValueError, match="resize mode"):
        images.resize(Image.new("L", (10, 10)), 8, "crop")
    with pytest.raises(ValueError, match="size must be positive"):
        images.resize(Image.new("L", (10, 10)), 0)


RAW_SAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw_sample"


def test_pixels_at_a_size_do_not_depend_on_the_other_sizes_requested(require_shared):
    """Preprocess asks for every variant's size at once, `cxr predict` for one: the same file must
    give the same pixels both ways, also above the 256 px draft floor (a DCT scale change)."""
    require_shared(RAW_SAMPLE)
    sizes = [96, 160, 224, 320, 384]
    files = sorted(RAW_SAMPLE.rglob("*.jpeg"))
    assert len(files) >= 8
    for path in files:
        together = images.load_resized(path, sizes)
        for s in sizes:
            alone = images.load_resized(path, [s])[s]
            assert np.array_equal(together[s], alone), f"{path.name} at {s} px differs when decoded with {sizes}"
