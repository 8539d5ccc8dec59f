"""Stage `preprocess`: decode every manifest image once into a uint8 cache per input size.

    python stages/preprocess.py   # (dvc repro preprocess) → data/processed/<size>/<split>.{npy,csv}

The sizes are every variant's image_size in params.yaml; both cores decode in parallel.
"""

from __future__ import annotations

import time
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.core import params as cxr_params
from cxr.core.constants import SPLITS
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_dir
from cxr.data.cache import write_split
from cxr.data.images import load_resized

MANIFEST = Path("data/split/manifest.csv")
OUT = Path("data/processed")


def decode_all(paths: list[str], sizes: list[int], mode: str, workers: int) -> dict[int, np.ndarray]:
    """{size: uint8 (N, size, size, 1)} for every path, in order, decoding each file once."""
    out = {s: np.empty((len(paths), s, s, 1), np.uint8) for s in sizes}
    work = partial(load_resized, sizes=sizes, mode=mode)
    with Pool(workers) as pool:
        for i, arrays in enumerate(
            tqdm(pool.imap(work, paths, chunksize=16), total=len(paths), desc="decode", unit="img")
        ):
            for s in sizes:
                out[s][i] = arrays[s]
    return out


def main() -> int:
    params = cxr_params.load()
    if not MANIFEST.exists():
        raise CxrError(f"{MANIFEST} not found; run `dvc repro split` first")
    manifest = pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)
    sizes = params.image_sizes
    start = time.perf_counter()
    arrays = decode_all(manifest["path"].tolist(), sizes, params.preprocess.resize, params.preprocess.workers)
    seconds = time.perf_counter() - start
    with atomic_dir(OUT) as tmp:
        for size in sizes:
            for split in SPLITS:
                keep = (manifest["split"] == split).to_numpy()
                write_split(tmp / str(size), split, arrays[size][keep], manifest[keep].reset_index(drop=True))
    print(
        f"preprocess: {len(manifest)} images → sizes {sizes} ({params.preprocess.resize}) in {seconds:.1f} s, {len(manifest) / seconds:.0f} images/s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
