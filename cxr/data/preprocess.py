"""The preprocess stage's work: decode every manifest image once, at every input size, into the
uint8 cache (cxr.data.cache's layout).

    python stages/preprocess.py   # (dvc repro preprocess) → data/processed/<size>/<split>.{npy,csv}

Its own module, not part of cxr.data.cache, so that the stages that only read the cache do not
depend on the decoder; bench/bench_preprocess.py times `decode_all` as the stage runs it.
"""

from __future__ import annotations

from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr.core.constants import SPLITS
from cxr.data.cache import cache_dir, write_split
from cxr.data.images import load_resized


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


def write_cache(folder: Path, manifest: pd.DataFrame, arrays: dict[int, np.ndarray]) -> None:
    """Every size's train, val and test split under folder/<size>/, rows in the manifest's order."""
    for size, x in arrays.items():
        for split in SPLITS:
            keep = (manifest["split"] == split).to_numpy()
            write_split(cache_dir(folder, size), split, x[keep], manifest[keep].reset_index(drop=True))
