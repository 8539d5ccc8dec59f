"""Stage `preprocess`: decode every manifest image once into a uint8 cache per input size.

    python stages/preprocess.py   # (dvc repro preprocess) → data/processed/<size>/<split>.{npy,csv}

The sizes are every variant's image_size in params.yaml; both cores decode in parallel
(cxr.data.preprocess).
"""

from __future__ import annotations

import time

import pandas as pd

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_dir
from cxr.core.stage import stage_args
from cxr.data.preprocess import decode_all, write_cache


def main() -> int:
    stage_args(__doc__)
    params = cxr_params.load()
    if not paths.MANIFEST.exists():
        raise CxrError(f"{paths.MANIFEST} not found; run `dvc repro split` first")
    manifest = pd.read_csv(paths.MANIFEST, dtype=str, keep_default_na=False)
    sizes = params.image_sizes
    start = time.perf_counter()
    arrays = decode_all(manifest["path"].tolist(), sizes, params.preprocess.resize, params.preprocess.workers)
    seconds = time.perf_counter() - start
    with atomic_dir(paths.PROCESSED) as tmp:
        write_cache(tmp, manifest, arrays)
    print(
        f"preprocess: {len(manifest)} images → sizes {sizes} ({params.preprocess.resize}) "
        f"in {seconds:.1f} s, {len(manifest) / seconds:.0f} images/s"
    )
    return 0


if __name__ == "__main__":
    run_main(main)
