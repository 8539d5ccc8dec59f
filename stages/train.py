"""Stage `train@<variant>`: fit one variant on the preprocessed cache and choose its threshold.

    python stages/train.py VARIANT     # (dvc repro train@VARIANT) → models/VARIANT.{keras,json}, dvclive/VARIANT/

Per-epoch loss / AUC go to dvclive/VARIANT/plots/metrics and dvclive/VARIANT/metrics.json; the
decision threshold is Youden's J on validation with the restored best weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cxr import params as cxr_params
from cxr.cache import cache_dir, load_split
from cxr.errors import run_main
from cxr.io import atomic_dir
from cxr.training import save_result, train_variant


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise ValueError("usage: python stages/train.py VARIANT (a name under params.yaml variants)")
    name = sys.argv[1]
    params = cxr_params.load()
    variant = params.variant(name)
    start = time.perf_counter()
    folder = cache_dir("data/processed", variant.image_size)
    train, val = load_split(folder, "train"), load_split(folder, "val")
    # DVCLive writes into a temporary folder that replaces dvclive/VARIANT only if all succeeds.
    with atomic_dir(Path("dvclive") / name) as live_dir:
        result = train_variant(variant, params, train, val, live_dir=live_dir)
        save_result(result, Path("models") / f"{name}.keras", Path("models") / f"{name}.json")
    print(f"train@{name}: wrote models/{name}.keras and models/{name}.json in {time.perf_counter() - start:.1f} s wall")
    return 0


if __name__ == "__main__":
    run_main(main)
