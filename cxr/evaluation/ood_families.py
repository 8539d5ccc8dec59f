"""Test sets of things that are not pediatric frontal chest X-rays, for measuring the OOD gate.

    python stages/ood.py VARIANT     # scores every family below against the gate of VARIANT

Synthetic families (constant and near-constant images, noise, colour and gray photographs,
retinal OCT B-scans, seeded) and X-ray families (validation X-rays rotated, flipped, inverted or
cropped to a corner) with the helper that writes them to files, so they go through the same
file path as `cxr predict`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _oct_bscan(rng: np.random.Generator, width: int = 512, height: int = 496) -> np.ndarray:
    """A synthetic retinal OCT B-scan: dark vitreous, bright layered retina along a curve with a
    foveal pit, speckle noise (the Mendeley archive's other half looks like this)."""
    x = np.arange(width)
    top = height * rng.uniform(0.3, 0.45) + rng.uniform(5, 25) * np.sin(x / width * np.pi * rng.uniform(0.5, 1.5))
    top -= rng.uniform(15, 40) * np.exp(-(((x - width * rng.uniform(0.4, 0.6)) / (width * 0.06)) ** 2))  # the fovea
    depth = np.arange(height)[:, None] - top[None, :]
    layers = np.zeros((height, width))
    for offset, thickness, level in ((0, 8, 220), (15, 20, 120), (40, 10, 90), (60, 12, 200), (75, 25, 150)):
        layers += level * np.exp(-(((depth - offset) / thickness) ** 2))
    speckle = rng.rayleigh(0.6, size=layers.shape)
    return np.clip(layers * speckle + rng.normal(12, 6, size=layers.shape), 0, 255).astype(np.uint8)


def _sample_photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images

    return list(load_sample_images().images)  # china.jpg, flower.jpg: 427×640 RGB, bundled with scikit-learn


def _photo_crops(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    photos, out = _sample_photos(), []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        side = int(rng.integers(h // 3, h + 1)) if i >= len(photos) else None
        if side is None:
            out.append(img)
            continue
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(img[top : top + side, left : left + side])
    return out


def synthetic_families(rng: np.random.Generator, n: int) -> dict[str, list[np.ndarray]]:
    """Seeded images (uint8, grayscale (H, W) or RGB (H, W, 3)) of each non-X-ray family."""
    sides = lambda: (int(rng.integers(256, 1025)), int(rng.integers(256, 1025)))  # noqa: E731
    constant = [np.full(sides(), level, np.uint8) for level in rng.integers(0, 256, n)]
    constant[:2] = [
        np.zeros((512, 512), np.uint8),
        np.full((512, 512), 255, np.uint8),
    ]  # the all-black and all-white
    near = []
    for _ in range(n):
        h, w = sides()
        ramp = np.linspace(0, rng.uniform(0, 4), w)[None, :]
        near.append(
            np.clip(rng.uniform(10, 245) + ramp + rng.normal(0, rng.uniform(0.3, 1.5), (h, w)), 0, 255).astype(np.uint8)
        )
    noise = []
    for i in range(n):
        h, w = sides()
        kind = i % 3
        if kind == 0:
            noise.append(rng.integers(0, 256, (h, w), dtype=np.uint8))
        elif kind == 1:
            noise.append(
                np.clip(rng.normal(rng.uniform(60, 200), rng.uniform(20, 60), (h, w)), 0, 255).astype(np.uint8)
            )
        else:
            noise.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    photos = _photo_crops(rng, n)
    return {
        "constant": constant,
        "near_constant": near,
        "noise": noise,
        "photos": photos,
        "photos_gray": [np.asarray(Image.fromarray(p).convert("L")) for p in photos],
        "oct": [_oct_bscan(rng) for _ in range(n)],
    }


def xray_families(x: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Transformed real X-rays (uint8 (N, S, S, 1)): rotated 90° and 180°, grey levels inverted,
    and the top-left corner (a quarter of each side)."""
    imgs = [img[:, :, 0] for img in x]
    corner = max(8, x.shape[1] // 4) if len(x) else 8
    return {
        "rotated_90": [np.rot90(i).copy() for i in imgs],
        "rotated_180": [np.rot90(i, 2).copy() for i in imgs],
        "inverted": [255 - i for i in imgs],
        "corner_crop": [i[:corner, :corner].copy() for i in imgs],
    }


def write_family(images: list[np.ndarray], folder: Path, fmt: str = "png") -> list[Path]:
    """Write each image as a file, as a user would hand it to `cxr predict`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:04d}.{fmt}"
        Image.fromarray(img).save(path)
        paths.append(path)
    return paths
