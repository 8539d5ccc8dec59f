"""One process of tests/test_distribute.py's cluster: run the train stage in a project folder and
report what this process saw.

    python tests/distribute_worker.py PROJECT VARIANT REPORT.json

With TF_CONFIG set (the test sets it per worker) and train.distribute: multi_worker in
PROJECT/params.yaml, this is one worker of the cluster; without, a single-process run. It runs
the real `stages/train.py` main; REPORT.json (kept outside PROJECT, so the project holds only
what the stage wrote) has this process's per-epoch history, sidecar, replicas, global batch and
whether it was the chief.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    project, variant_name, report = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]).resolve()
    sys.path.insert(0, str(ROOT))
    os.chdir(project)
    import cxr.model.training
    from cxr.core import params as cxr_params
    from cxr.model.distribute import get_strategy, global_batch_size, is_chief, task_of

    seen: dict[str, Any] = {}
    train_variant = cxr.model.training.train_variant

    def recording(*args: Any, **kwargs: Any) -> cxr.model.training.TrainResult:
        result = train_variant(*args, **kwargs)
        seen.update(history=result.history, meta=result.meta.to_dict())
        return result

    # The stage imports train_variant from cxr.model.training when main() runs, so it gets this one.
    cxr.model.training.train_variant = recording
    spec = importlib.util.spec_from_file_location("train_stage", ROOT / "stages" / "train.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    sys.argv = [str(ROOT / "stages" / "train.py"), variant_name]
    status = stage.main()

    params = cxr_params.load()
    strategy = get_strategy(params.train.distribute)  # the stage's own (multi_worker is created once)
    task = task_of(strategy)
    seen.update(
        chief=is_chief(strategy),
        task=None if task is None else {"type": task.type, "index": task.index},
        replicas=strategy.num_replicas_in_sync,
        global_batch=global_batch_size(params.variant(variant_name).batch_size, strategy),
    )
    report.write_text(json.dumps(seen, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
