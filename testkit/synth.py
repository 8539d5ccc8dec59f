"""Tiny synthetic chest-X-ray archives in the real layouts, for tests and benchmarks.

Images are small grayscale JPEGs whose content depends on the class (pneumonia images carry a
bright blurred patch), so a model can learn something in a few steps. Several images share a
patient, as in the real data, so patient-grouped splitting is exercised.
"""

from __future__ import annotations

import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Counts:
    """Patients per class and subtype, and images per patient, for one official split."""

    normal: int = 6
    bacteria: int = 6
    virus: int = 4
    images_per_patient: int = 2


def make_xray(label: str, seed: int, size: tuple[int, int] = (72, 64)) -> Image.Image:
    """A fake 8-bit grayscale X-ray: noisy ribcage-like bands, plus a bright patch if pneumonia."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 40 * np.sin(yy / 3.0) ** 2 + rng.normal(0, 12, (h, w))
    if label == "PNEUMONIA":
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.25, 0.75) * w
        img += 110 * np.exp(-(((yy - cy) / (0.18 * h)) ** 2 + ((xx - cx) / (0.18 * w)) ** 2))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L")
    return pil.filter(ImageFilter.GaussianBlur(0.6))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def file_names(split: str, counts: Counts, naming: str = "kaggle") -> list[tuple[str, str]]:
    """(class folder, file name) pairs for one split in the given naming scheme."""
    out: list[tuple[str, str]] = []
    base = 1000 if split == "test" else 0  # patients of the official test set are different people
    n = 0
    for subtype, patients in (("normal", counts.normal), ("bacteria", counts.bacteria), ("virus", counts.virus)):
        for p in range(patients):
            pid = base + p + 1 + (100 if subtype == "virus" else 0)
            for k in range(counts.images_per_patient):
                n += 1
                if naming == "kaggle":
                    if subtype == "normal":
                        name = (
                            f"IM-{pid:04d}-{k + 1:04d}.jpeg" if p % 2 == 0 else f"NORMAL2-IM-{pid:04d}-{k + 1:04d}.jpeg"
                        )
                    else:
                        name = f"person{pid}_{subtype}_{n}.jpeg"
                else:  # Mendeley v3 names
                    name = f"{subtype.upper()}-{pid + 90000}-{k + 1:04d}.jpeg"
                out.append(("NORMAL" if subtype == "normal" else "PNEUMONIA", name))
    return out


def write_tree(
    root: Path,
    counts: dict[str, Counts] | None = None,
    naming: str = "kaggle",
    size: tuple[int, int] = (72, 64),
    seed: int = 0,
) -> list[Path]:
    """Write `{train,test}/{NORMAL,PNEUMONIA}/*.jpeg` under root; returns the files written."""
    counts = counts or {"train": Counts(), "test": Counts(normal=3, bacteria=2, virus=2)}
    written = []
    i = seed * 100_000
    for split, c in counts.items():
        for label, name in file_names(split, c, naming):
            i += 1
            path = root / split / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(make_xray(label, i, size)))
            written.append(path)
    return written


def make_archive(
    zip_path: Path,
    layout: str = "v3",
    counts: dict[str, Counts] | None = None,
    naming: str = "kaggle",
    size: tuple[int, int] = (72, 64),
    oct_bytes: int = 20_000,
    seed: int = 0,
    compression: int = zipfile.ZIP_DEFLATED,
) -> Path:
    """Build a zip in one of the real layouts.

    layout "v3": CellData/chest_xray/... plus a CellData/OCT part of about `oct_bytes` (stored, so
    it really takes that room) and macOS junk; "kaggle": chest_xray/... plus the nested
    chest_xray/chest_xray duplicate, a val/ folder and junk, as in the Kaggle copy.
    """
    counts = counts or {"train": Counts(), "test": Counts(normal=3, bacteria=2, virus=2)}
    rng = random.Random(seed)
    prefix = {"v3": "CellData/chest_xray/", "kaggle": "chest_xray/"}[layout]
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    i = seed * 100_000
    with zipfile.ZipFile(zip_path, "w", compression=compression) as zf:
        if layout == "v3":
            # OCT scans come first in the real archive; random bytes do not compress.
            per = max(1, oct_bytes // 8)
            for split in ("train", "test"):
                for cls in ("CNV", "DME", "DRUSEN", "NORMAL"):
                    zf.writestr(
                        f"CellData/OCT/{split}/{cls}/{cls}-1-1.jpeg",
                        rng.randbytes(per),
                        compress_type=zipfile.ZIP_STORED,
                    )
        for split, c in counts.items():
            for label, name in file_names(split, c, naming):
                i += 1
                data = jpeg_bytes(make_xray(label, i, size))
                zf.writestr(f"{prefix}{split}/{label}/{name}", data)
                if layout == "kaggle":
                    zf.writestr(f"chest_xray/chest_xray/{split}/{label}/{name}", data)
                    zf.writestr(f"__MACOSX/{prefix}{split}/{label}/._{name}", b"\x00\x05\x16\x07junk")
        zf.writestr(f"{prefix}.DS_Store", b"junk")
        if layout == "kaggle":
            zf.writestr("chest_xray/val/NORMAL/NORMAL2-IM-9999-0001.jpeg", jpeg_bytes(make_xray("NORMAL", 1)))
    return zip_path
