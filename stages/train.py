"""Stage `train@<variant>`: fit one variant on the preprocessed cache and choose its threshold.

    python stages/train.py VARIANT     # (dvc repro train@VARIANT) → models/VARIANT.{keras,json}, dvclive/VARIANT/

Per-epoch loss / AUC go to dvclive/VARIANT/plots/metrics and dvclive/VARIANT/metrics.json; the
decision threshold is Youden's J on validation with the restored best weights.

With train.distribute: multi_worker, run the same command on every machine of TF_CONFIG's
cluster (docs/scaling.md); only the chief writes the outputs.
"""

from __future__ import annotations

import sys
import time

from cxr import params as cxr_params
from cxr.cache import cache_dir, load_split
from cxr.errors import run_main
from cxr.io import atomic_dir


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise ValueError("usage: python stages/train.py VARIANT (a name under params.yaml variants)")
    name = sys.argv[1]
    params = cxr_params.load()
    variant = params.variant(name)
    # TensorFlow loads only once params.yaml is known to be good: a bad value fails in a second.
    from cxr.distribute import cluster_errors, get_strategy, is_chief, output_root, task_of
    from cxr.training import save_result, train_variant

    start = time.perf_counter()
    folder = cache_dir("data/processed", variant.image_size)
    train, val = load_split(folder, "train"), load_split(folder, "val")
    # Before other TensorFlow work: a multi-worker strategy sets up collective ops here.
    strategy = get_strategy(params.train.distribute)
    chief, task = is_chief(strategy), task_of(strategy)
    # Non-chief workers run the same code, writing into a scratch root that is then removed.
    # DVCLive writes into a temporary folder that replaces dvclive/VARIANT only if all succeeds.
    with cluster_errors(task), output_root(chief) as root, atomic_dir(root / "dvclive" / name) as live_dir:
        result = train_variant(variant, params, train, val, live_dir=live_dir)
        save_result(result, root / "models" / f"{name}.keras", root / "models" / f"{name}.json")
    seconds = time.perf_counter() - start
    if chief:
        print(f"train@{name}: wrote models/{name}.keras and models/{name}.json in {seconds:.1f} s wall")
    else:
        print(f"train@{name}: {task.type} {task.index} finished in {seconds:.1f} s wall; the chief wrote the outputs")
    return 0


if __name__ == "__main__":
    run_main(main)
