"""Where the k-fold models and their out-of-fold predictions live (train_fold@<v>-<k>).

    models/cv/<v>/fold<k>.keras, .json (its sidecar), .oof.csv (fold k's out-of-fold probabilities)

Kept apart from cxr.model.ensemble (which builds Keras models) so that a stage that only reads the
out-of-fold rows (ood@<v>_cv) does not depend on the training code.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxr.core.errors import CxrError


def fold_paths(name: str, fold: int, root: Path = Path(".")) -> tuple[Path, Path, Path]:
    """models/cv/<v>/fold<k>.keras, its sidecar and its out-of-fold probabilities (.oof.csv)."""
    base = root / "models" / "cv" / name / f"fold{fold}"
    return base.with_suffix(".keras"), base.with_suffix(".json"), base.with_suffix(".oof.csv")


def read_oof(paths: list[Path]) -> pd.DataFrame:
    """The folds' out-of-fold predictions, one row per official-train image."""
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CxrError(f"{', '.join(missing)} not found; run `dvc repro train_fold` first")
    oof = pd.concat([pd.read_csv(p, dtype={"path": str}) for p in paths], ignore_index=True)
    if oof["path"].duplicated().any():
        raise CxrError("an image is out-of-fold in two folds; rerun `dvc repro split preprocess train_fold`")
    return oof
