"""THE image path: decode (Pillow; DICOM through cxr.data.dicom) → orient → grayscale → resize.
Preprocess, evaluation and `cxr predict` all call `load_resized`, so a file gives the same
pixels everywhere.

    python -m cxr.data.images FILE SIZE     # print the shape and mean of the cached array for FILE
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from cxr.core.constants import RESIZE_MODES
from cxr.core.errors import run_main
from cxr.data.pixels import ImageError, check_pixels, scale_to_uint8

MIN_SIDE = 8
# Large JPEGs decode at a reduced DCT scale (1/2, 1/4, 1/8) whose sides stay ≥ max(this, size):
# the scale depends on the file and that one size only, never on which other sizes were asked for.
DRAFT_MIN_SIDE = 256
# A DICOM file: a 128-byte preamble, then b"DICM" (PS3.10 7.1); files named so go to pydicom anyway.
DICOM_MAGIC, DICOM_MAGIC_AT = b"DICM", 128
DICOM_SUFFIXES = (".dcm", ".dicom")


# The colourfulness of a file is measured on a thumbnail this size (cheap, and enough for a mean).
FACTS_SIDE = 64


@dataclass(frozen=True)
class ImageFacts:
    """What the grayscale pixels no longer show about a file: its decoded size and colour
    (for cxr.evaluation.gate's image-level checks)."""

    width: int
    height: int
    colourfulness: float  # Hasler & Süsstrunk (2003); 0 for a grayscale file

    @property
    def aspect(self) -> float:
        """Long side / short side (≥ 1)."""
        return max(self.width, self.height) / min(self.width, self.height)


def colourfulness(img: Image.Image) -> float:
    """Hasler & Süsstrunk's colourfulness M of an image (0 for gray; ~15 "slightly colourful",
    ~45 "moderately", >100 "extremely"), measured on a FACTS_SIDE-px thumbnail."""
    if img.mode in ("L", "1", "I;16", "I;16B", "I;16L", "I", "F", "LA"):
        return 0.0
    small = img.convert("RGB")
    small.thumbnail((FACTS_SIDE, FACTS_SIDE), Image.Resampling.BOX)
    rgb = np.asarray(small, dtype=np.float64).reshape(-1, 3)
    rg = rgb[:, 0] - rgb[:, 1]
    yb = 0.5 * (rgb[:, 0] + rgb[:, 1]) - rgb[:, 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def open_image(
    path: Path | str, draft_size: int | None = None, with_facts: bool = False
) -> Image.Image | tuple[Image.Image, ImageFacts]:
    """Decode one file into an 8-bit grayscale ('L') image, upright per its EXIF orientation.

    Handles JPEG (grayscale, RGB, CMYK), PNG (palette, RGBA, 16-bit), what else Pillow reads, and
    DICOM (recognised by its 'DICM' marker or a .dcm/.dicom name; `cxr.data.dicom`, pydicom loads only
    then). `draft_size` lets a large JPEG decode at a reduced scale (≥ that size): 3–5× faster;
    the scale only, never the colour, so `with_facts` can also return the file's `ImageFacts`
    from the same decode.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:  # opened once: the DICOM check and the decoder share it
            if is_dicom(f) or path.suffix.lower() in DICOM_SUFFIXES:
                from cxr.data.dicom import read_dicom

                img = read_dicom(f, path)
            else:
                img = _open_pillow(f, path, draft_size)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{path}: too many pixels (decompression-bomb guard); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = "empty file" if path.exists() and path.stat().st_size == 0 else " ".join(str(exc).split())
        raise ImageError(f"{path}: cannot decode image ({reason})") from None
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{path}: {img.width}x{img.height} is too small to be an X-ray (min side {MIN_SIDE} px)")
    if with_facts:
        return to_grayscale(img), ImageFacts(img.width, img.height, colourfulness(img))
    return to_grayscale(img)


def is_dicom(f: BinaryIO) -> bool:
    """Whether the open file starts like a DICOM file (128-byte preamble, then 'DICM'); rewinds it."""
    head = f.read(DICOM_MAGIC_AT + len(DICOM_MAGIC))
    f.seek(0)
    return head[DICOM_MAGIC_AT:] == DICOM_MAGIC


def _open_pillow(f: BinaryIO, path: Path, draft_size: int | None) -> Image.Image:
    """Pillow's decode of an open file, loaded and upright (EXIF)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(f)
        check_pixels(path, img.width, img.height)
        if draft_size and img.format == "JPEG":
            # draft keeps both sides ≥ the request; the resize below does the rest.
            img.draft(img.mode, (draft_size, draft_size))
        img.load()
    return ImageOps.exif_transpose(img)


def to_grayscale(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit 'L'. 16-bit images are scaled by their own range, not clipped."""
    if img.mode == "L":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(scale_to_uint8(a, float(a.min()), float(a.max())), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent parts become black, like the film background.
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(bg, rgba).convert("L")
    return img.convert("RGB").convert("L") if img.mode in ("CMYK", "YCbCr", "P", "1") else img.convert("L")


def resize(img: Image.Image, size: int, mode: str = "squash") -> np.ndarray:
    """Grayscale image → uint8 array (size, size, 1). squash: stretch; pad: keep aspect, black bars."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if mode == "squash":
        out = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    else:
        scale = size / max(img.size)
        w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
        inner = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        out = Image.new("L", (size, size), 0)
        out.paste(inner, ((size - w) // 2, (size - h) // 2))
    return np.asarray(out, dtype=np.uint8)[:, :, None]


def draft_side(size: int) -> int:
    """The smallest side a JPEG may be decoded at for an output of `size` px."""
    return max(DRAFT_MIN_SIDE, size)


def load_resized(path: Path | str, sizes: list[int] | tuple[int, ...], mode: str = "squash") -> dict[int, np.ndarray]:
    """Decode `path` and return {size: uint8 (size, size, 1)} for every requested size.

    The pixels at a size do not depend on the other sizes requested: each size is decoded at
    the DCT scale it would get alone (`draft_side`). Sizes with the same draft request (all
    sizes ≤ 256 px) share one decode, so the pipeline's usual sizes decode each file once.
    """
    if not sizes:
        raise ValueError("need at least one size")
    decoded: dict[int, Image.Image] = {}
    out: dict[int, np.ndarray] = {}
    for s in sizes:
        side = draft_side(s)
        if side not in decoded:
            decoded[side] = open_image(path, draft_size=side)
        out[s] = resize(decoded[side], s, mode)
    return out


def load_resized_facts(path: Path | str, size: int, mode: str = "squash") -> tuple[np.ndarray, ImageFacts]:
    """`load_resized(path, [size], mode)[size]` and the file's `ImageFacts`, from one decode."""
    img, facts = open_image(path, draft_size=draft_side(size), with_facts=True)
    return resize(img, size, mode), facts


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    arr = load_resized(sys.argv[1], [int(sys.argv[2])])[int(sys.argv[2])]
    print(arr.shape, arr.dtype, float(arr.mean()))
    return 0


if __name__ == "__main__":
    run_main(main)
