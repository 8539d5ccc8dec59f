"""The preprocessed image cache: write it once, read it as arrays or `tf.data` pipelines.

Layout, one folder per input size (written by stages/preprocess.py):

    data/processed/<size>/<split>.npy   uint8 (N, size, size, 1) grayscale, memory-mappable
    data/processed/<size>/<split>.csv   the manifest rows in the same order (path,label,...)

`split` is train, val or test. Labels are 1 for PNEUMONIA, 0 for NORMAL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.core.constants import POSITIVE, SPLITS
from cxr.core.errors import CxrError
from cxr.core.io import atomic_file, atomic_path


@dataclass
class CachedSplit:
    """One split at one size: images, labels and the manifest rows they came from."""

    x: np.ndarray  # uint8 (N, S, S, 1)
    y: np.ndarray  # int32 (N,), 1 = pneumonia
    rows: pd.DataFrame

    def __len__(self) -> int:
        return len(self.y)


def labels_of(rows: pd.DataFrame) -> np.ndarray:
    return (rows["label"].to_numpy() == POSITIVE).astype(np.int32)


def write_split(folder: Path | str, split: str, x: np.ndarray, rows: pd.DataFrame) -> None:
    """Write one split's images and rows (atomically, each file whole or absent)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 1 or len(x) != len(rows):
        raise ValueError(f"expected uint8 (N,S,S,1) images matching {len(rows)} rows, got {x.dtype} {x.shape}")
    folder = Path(folder)
    with atomic_path(folder / f"{split}.npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, x)
    with atomic_file(folder / f"{split}.csv") as fh:
        rows.to_csv(fh, index=False)


def load_split(folder: Path | str, split: str, mmap: bool = True) -> CachedSplit:
    """Read one split of the cache; a clear error if preprocess has not produced it."""
    folder = Path(folder)
    npy, csv = folder / f"{split}.npy", folder / f"{split}.csv"
    if not npy.exists() or not csv.exists():
        raise CxrError(f"no preprocessed '{split}' split in {folder}; run `dvc repro preprocess` first")
    x = np.load(npy, mmap_mode="r" if mmap else None)
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if len(rows) != len(x):
        raise CxrError(f"{npy} holds {len(x)} images but {csv} lists {len(rows)}; rerun `dvc repro preprocess`")
    return CachedSplit(x=x, y=labels_of(rows), rows=rows)


def cache_dir(root: Path | str, size: int) -> Path:
    return Path(root) / str(size)


def official_train(folder: Path | str) -> CachedSplit:
    """Every cached image of the official train folder that has a cross-validation fold (our
    train and val splits together, rows with fold ≥ 0), for k-fold training."""
    parts = [load_split(folder, split) for split in ("train", "val")]
    if any("fold" not in p.rows.columns for p in parts):
        raise CxrError(f"{folder} has no fold column; set split.folds ≥ 2 and rerun `dvc repro split preprocess`")
    keep = [p.rows["fold"].astype(int).to_numpy() >= 0 for p in parts]
    x = np.concatenate([p.x[k] for p, k in zip(parts, keep)])
    rows = pd.concat([p.rows[k] for p, k in zip(parts, keep)], ignore_index=True)
    return CachedSplit(x=x, y=labels_of(rows), rows=rows)


def fold_split(data: CachedSplit, fold: int) -> tuple[CachedSplit, CachedSplit]:
    """(the other folds, fold `fold`): what a fold model trains on and what it is validated on."""
    folds = data.rows["fold"].astype(int).to_numpy()
    if not np.any(folds == fold):
        raise CxrError(
            f"no cached image is in fold {fold} (folds present: "
            f"{sorted(set(folds.tolist()))}); check cv.folds against split.folds"
        )
    parts = []
    for keep in (folds != fold, folds == fold):
        rows = data.rows[keep].reset_index(drop=True)
        parts.append(CachedSplit(x=data.x[keep], y=data.y[keep], rows=rows))
    return parts[0], parts[1]
