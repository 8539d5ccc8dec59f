"""The k-fold models' out-of-fold predictions (train_fold@<v>-<k>), read back for the ensemble.

    models/cv/<v>/fold<k>.keras, .json (its sidecar), .oof.csv (fold k's out-of-fold probabilities)

`fold_paths` (those three paths) is cxr.core.paths's, re-exported here beside `read_oof`.

Kept apart from cxr.model.ensemble (which builds Keras models) so that a stage that only reads the
out-of-fold rows (ood@<v>_cv) does not depend on the training code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr.core.errors import CxrError
from cxr.core.paths import fold_paths as fold_paths


def read_oof(paths: list[Path]) -> pd.DataFrame:
    """The folds' out-of-fold predictions, one row per official-train image."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CxrError(f"{', '.join(missing)} not found; run `dvc repro train_fold` first")
    oof = pd.concat([pd.read_csv(p, dtype={"path": str}) for p in paths], ignore_index=True)
    if oof["path"].duplicated().any():
        raise CxrError("an image is out-of-fold in two folds; rerun `dvc repro split preprocess train_fold`")
    return oof
