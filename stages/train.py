"""Stage `train@<variant>` (and `train_fold@<variant>-<k>`): fit one variant on the preprocessed
cache and choose its threshold on validation.

    python stages/train.py VARIANT            # (dvc repro train@VARIANT) → models/VARIANT.{keras,json},
                                                  dvclive/VARIANT/, metrics/VARIANT_stress.json
    python stages/train.py VARIANT --fold K   # (dvc repro train_fold@VARIANT-K)
                                                  → models/cv/VARIANT/foldK.{keras,json,oof.csv}

Per-epoch loss / AUC go to dvclive/VARIANT/plots/metrics and dvclive/VARIANT/metrics.json; the
decision threshold follows train.threshold_rule on validation with the restored best weights.
With --fold K the model trains on every official-train image outside fold K (split.folds),
is validated and early-stopped on fold K, and writes fold K's out-of-fold probabilities
(path,label,fold,probability and p_<shift> under each stress shift) for `stages/ensemble.py`.
Without --fold, the validation images' figures under the stress shifts (cxr.evaluation.stress) go to
metrics/VARIANT_stress.json.

With train.distribute: multi_worker, run the same command on every machine of TF_CONFIG's
cluster (docs/scaling.md); only the chief writes the outputs.
"""

from __future__ import annotations

import time

import pandas as pd

from cxr.core import params as cxr_params
from cxr.core import paths
from cxr.core.errors import CxrError, run_main
from cxr.core.io import atomic_dir, atomic_file, write_json
from cxr.core.stage import stage_args
from cxr.data.cache import cache_dir, fold_split, load_split, official_train


def main() -> int:
    args = stage_args(__doc__, variant="a name under params.yaml variants", fold=True)
    name = args.variant
    params = cxr_params.load()
    variant = params.variant(name)
    if args.fold is not None and (name not in params.cv.variants or args.fold not in params.cv.folds):
        raise CxrError(
            f"--fold {args.fold} for {name}: params.yaml cv.variants "
            f"{params.cv.variants} and cv.folds {params.cv.folds} must include them"
        )
    # TensorFlow loads only once params.yaml is known to be good: a bad value fails in a second.
    from cxr.evaluation.stress import stress_summary
    from cxr.model.distribute import cluster_errors, get_strategy, is_chief, output_root, task_of
    from cxr.model.training import save_result, train_variant

    start = time.perf_counter()
    folder = cache_dir(paths.PROCESSED, variant.image_size)
    if args.fold is None:
        train, val = load_split(folder, "train"), load_split(folder, "val")
    else:
        train, val = fold_split(official_train(folder), args.fold)
    # Before other TensorFlow work: a multi-worker strategy sets up collective ops here.
    strategy = get_strategy(params.train.distribute)
    chief, task = is_chief(strategy), task_of(strategy)
    # Non-chief workers run the same code, writing into a scratch root that is then removed.
    # DVCLive writes into a temporary folder that replaces dvclive/VARIANT only if all succeeds.
    with cluster_errors(task), output_root(chief) as root:
        if args.fold is None:
            with atomic_dir(paths.live_dir(name, root)) as live_dir:
                result = train_variant(variant, params, train, val, live_dir=live_dir)
                stress = stress_summary(val.y, result.val_prob, result.stress_prob, result.meta.threshold)
                model_path = paths.model_path(name, root)
                save_result(result, model_path, paths.sidecar_path(model_path))
                write_json(paths.metrics_path(name, "stress", root), stress)
            written = (
                f"models/{name}.keras, models/{name}.json and metrics/{name}_stress.json "
                f"(mean stress roc_auc {stress['mean']['roc_auc']:.4f})"
            )
        else:
            result = train_variant(variant, params, train, val)
            model_path, meta_path, oof_path = paths.fold_paths(name, args.fold, root)
            stressed = {f"p_{shift}": p for shift, p in result.stress_prob.items()}
            oof = pd.DataFrame(
                {
                    "path": val.rows["path"],
                    "label": val.y,
                    "fold": args.fold,
                    "probability": result.val_prob,
                    **stressed,
                }
            )
            with atomic_file(oof_path) as fh:
                oof.to_csv(fh, index=False)
            save_result(result, model_path, meta_path)
            written = f"{model_path.relative_to(root)} (+ .json, .oof.csv: {len(oof)} out-of-fold images)"
    seconds = time.perf_counter() - start
    if chief:
        print(
            f"train@{name}{'' if args.fold is None else f' fold {args.fold}'}: wrote {written} in {seconds:.1f} s wall"
        )
    else:
        print(f"train@{name}: {task.type} {task.index} finished in {seconds:.1f} s wall; the chief wrote the outputs")
    return 0


if __name__ == "__main__":
    run_main(main)
