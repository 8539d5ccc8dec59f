"""What both decoders (Pillow in cxr.data.images, pydicom in cxr.data.dicom) share: the error
of an unusable image, the size limit checked before decoding, and linear scaling to 8 bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr.core.errors import CxrError

# Pillow refuses images above ~179 MP by default; a real chest X-ray is under 10 MP.
MAX_PIXELS = 50_000_000


class ImageError(CxrError):
    """An image that cannot be used; the message names the file and why."""


def check_pixels(path: Path | str, width: int, height: int) -> None:
    """Refuse an image over MAX_PIXELS before its pixels are decoded."""
    if width * height > MAX_PIXELS:
        raise ImageError(f"{path}: {width}x{height} is over {MAX_PIXELS:,} pixels; downscale it first")


def scale_to_uint8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map `lo` → 0 and `hi` → 255 linearly (either may be the larger), clip, round; all 0 if lo == hi."""
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return np.round(np.clip((a - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)
