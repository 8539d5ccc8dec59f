"""File names → label, subtype and patient; validation splits and cross-validation folds; the data audit.

    python -m cxr.data.dataset NAME...     # print the parsed label/subtype/patient of file names

Both naming schemes of the data are understood:
  Kaggle/v2:    person123_bacteria_456.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1427-0001-0002.jpeg
  Mendeley v3:  BACTERIA-1351146-0001.jpeg, NORMAL-28501-0001.jpeg, VIRUS-3637528-0002.jpeg

Patient ids are unique only within one official folder: the official train and test sets were
numbered independently and share 170 ids (person1, person104, ...). A patient is therefore the
pair (official folder, patient id), see `patient_key`.
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from cxr.core.constants import CLASSES, NEGATIVE, OFFICIAL_SPLITS, SPLITS
from cxr.core.errors import CxrError, run_main

MANIFEST_COLUMNS = ["path", "label", "subtype", "patient_id", "split", "sha256", "fold"]
NO_FOLD = -1  # the fold of an image outside the official train set (or of every image with folds off)
SEED_PROTOCOL_NORMAL = 16
SEED_PROTOCOL_PNEUMONIA = 16  # half bacterial, half viral

_PATTERNS = [
    # Kaggle/v2
    (
        re.compile(r"^person(\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.I),
        lambda m: f"person{int(m[1])}",
        lambda m: m[2].lower(),
    ),
    (re.compile(r"^(NORMAL2-IM|IM)-(\d+)-\d+(?:-\d+)*$", re.I), lambda m: f"{m[1].upper()}-{m[2]}", lambda m: "normal"),
    # Mendeley v3
    (re.compile(r"^(NORMAL|BACTERIA|VIRUS)-(\d+)-\d+(?:-\d+)*$", re.I), lambda m: m[2], lambda m: m[1].lower()),
]


@dataclass(frozen=True)
class ParsedName:
    patient_id: str
    subtype: str  # normal | bacteria | virus | unknown
    parsed: bool


def parse_name(file_name: str) -> ParsedName:
    """Patient id and subtype from a file name; unparsed names become their own patient."""
    stem = Path(file_name).stem
    for pattern, patient, subtype in _PATTERNS:
        m = pattern.match(stem)
        if m:
            return ParsedName(patient(m), subtype(m), True)
    return ParsedName(stem, "unknown", False)


def subtype_for(label: str, parsed: ParsedName) -> str:
    """The subtype of an image: normal for NORMAL; bacteria/virus (or unknown) for PNEUMONIA."""
    if label == NEGATIVE:
        return "normal"
    return parsed.subtype if parsed.subtype in ("bacteria", "virus") else "unknown"


# A file name's series is what precedes its first "-<digits>": IM-0001-0001 → IM,
# NORMAL2-IM-0006-0001 → NORMAL2-IM (Kaggle/v2), NORMAL-28501-0001 → NORMAL (Mendeley v3).
_SERIES = re.compile(r"^(.*?)-\d")


def image_series(path: str) -> str:
    """The naming series of an image file (see _SERIES); 'other' when the name has none."""
    m = _SERIES.match(PurePosixPath(path).stem)
    return m[1].upper() if m else "other"


def scan(raw_root: Path | str, rel_to: Path | str = ".") -> pd.DataFrame:
    """One row per image under raw_root/{train,test}/{NORMAL,PNEUMONIA}: path, label, subtype,
    patient_id, official split, parsed (bool). Paths are relative to `rel_to`."""
    raw_root = Path(raw_root)
    rows = []
    for split in OFFICIAL_SPLITS:
        for label in CLASSES:
            folder = raw_root / split / label
            if not folder.is_dir():
                raise CxrError(
                    f"{folder} is missing; the archive needs "
                    f"{{train,test}}/{{NORMAL,PNEUMONIA}} (rerun `dvc repro fetch`)"
                )
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    p = parse_name(f.name)
                    rows.append(
                        {
                            "path": Path(os.path.relpath(f, rel_to)).as_posix(),
                            "label": label,
                            "subtype": subtype_for(label, p),
                            "patient_id": p.patient_id,
                            "split": split,
                            "parsed": p.parsed,
                        }
                    )
    df = pd.DataFrame(rows, columns=["path", "label", "subtype", "patient_id", "split", "parsed"])
    for split in OFFICIAL_SPLITS:
        if not (df["split"] == split).any():
            raise CxrError(f"{raw_root / split} holds no images; check fetch.source")
    return df


def official_split(df: pd.DataFrame) -> pd.Series:
    """The official folder (train | test) of each row, from its path `.../{train,test}/LABEL/file`."""
    return df["path"].map(lambda p: PurePosixPath(p).parts[-3])


def patient_key(df: pd.DataFrame) -> pd.Series:
    """`folder/patient_id` per row: the patient, since ids repeat across the official folders."""
    return official_split(df) + "/" + df["patient_id"]


def _groups(df: pd.DataFrame) -> np.ndarray:
    """Split units: patients, merged when two patients share an identical image (so a
    duplicate can never sit on both sides of the train/val line)."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for _, members in df.groupby("sha256")["patient_id"]:
        ids = list(dict.fromkeys(members))
        for other in ids[1:]:
            ra, rb = find(ids[0]), find(other)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(p) for p in df["patient_id"]])


def patient_grouped_split(train: pd.DataFrame, val_fraction: float, seed: int) -> pd.Series:
    """Mark about `val_fraction` of train's images as val, whole patients at a time,
    stratified by class and subtype. Returns the new split per row ('train' | 'val')."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train = train.assign(_group=_groups(train), _stratum=train["label"] + "/" + train["subtype"])
    # A group's stratum is its most common one (patients rarely mix classes).
    stratum = train.groupby("_group")["_stratum"].agg(lambda s: s.value_counts().sort_index().idxmax())
    sizes = train.groupby("_group").size()
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for name in sorted(stratum.unique()):
        groups = sorted(stratum.index[stratum == name])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        target = val_fraction * sizes[groups].sum()
        taken = 0
        for g in groups:
            if taken >= target:
                break
            val_groups.add(g)
            taken += sizes[g]
    return pd.Series(np.where(train["_group"].isin(val_groups), "val", "train"), index=train.index)


def seed_protocol_split(test: pd.DataFrame, seed: int) -> pd.Series:
    """The seed notebook's protocol: move 16 NORMAL and 16 PNEUMONIA (8 bacterial, 8 viral)
    test images to val. Returns the new split per row ('test' | 'val').

    Unlike the notebook, whole test patients move (merged when they share an identical image),
    so no test patient has images in both val and test: patients of one subtype are drawn in
    random order and taken while they fit the remaining count (single-image patients fill it).
    """
    test = test.assign(_group=_groups(test))
    subtypes = test.groupby("_group")["subtype"].agg(lambda s: s.iloc[0] if s.nunique() == 1 else "mixed")
    sizes = test.groupby("_group").size()
    rng = np.random.default_rng(seed)
    val_groups: list[str] = []
    for subtype, n in (
        ("normal", SEED_PROTOCOL_NORMAL),
        ("bacteria", SEED_PROTOCOL_PNEUMONIA // 2),
        ("virus", SEED_PROTOCOL_PNEUMONIA // 2),
    ):
        groups = sorted(subtypes.index[subtypes == subtype])
        left = n
        for g in (groups[i] for i in rng.permutation(len(groups))):
            if left == 0:
                break
            if sizes[g] <= left:
                val_groups.append(g)
                left -= sizes[g]
        if left:
            raise CxrError(
                f"split.strategy=seed needs {n} {subtype} test images from "
                f"whole patients, found {n - left}; use patient_grouped"
            )
    return pd.Series(np.where(test["_group"].isin(val_groups), "val", "test"), index=test.index)


def grouped_folds(train: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """Cross-validation fold (0..folds-1) of each image of the official train set: whole
    patients at a time (merged when they share an identical image), stratified by class and
    subtype (sklearn's StratifiedGroupKFold, shuffled with `seed`)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    groups = _groups(train)
    if len(set(groups)) < folds:
        raise CxrError(
            f"split.folds={folds} needs at least {folds} patients in the "
            f"official train set, found {len(set(groups))}; lower split.folds"
        )
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold = np.full(len(train), NO_FOLD)
    for k, (_, held_out) in enumerate(cv.split(train, train["label"] + "/" + train["subtype"], groups)):
        fold[held_out] = k
    return pd.Series(fold, index=train.index)


def make_manifest(
    images: pd.DataFrame, strategy: str, val_fraction: float, seed: int, folds: int = 0
) -> tuple[pd.DataFrame, dict]:
    """Assign train/val/test, and with `folds` ≥ 2 a cross-validation fold of the official train
    set, to decodable images (columns path,label,subtype,patient_id,split,sha256).

    Exact duplicates that cross into the official test set are dropped from train/val, never
    from test. `fold` is NO_FOLD outside the official train set and when `folds` is 0. Returns
    the manifest and the duplicate part of the audit.
    """
    df = images.sort_values("path").reset_index(drop=True)
    test_hashes = set(df.loc[df["split"] == "test", "sha256"])
    leaking = (df["split"] == "train") & df["sha256"].isin(test_hashes)
    removed = df.loc[leaking, "path"].tolist()
    df = df.loc[~leaking].reset_index(drop=True)

    train, test = df["split"] == "train", df["split"] == "test"
    if strategy == "patient_grouped":
        df.loc[train, "split"] = patient_grouped_split(df.loc[train], val_fraction, seed)
    elif strategy == "seed":
        df.loc[test, "split"] = seed_protocol_split(df.loc[test], seed)
    else:
        raise ValueError(f"unknown split strategy {strategy!r}")
    df["fold"] = NO_FOLD
    if folds:
        df.loc[train, "fold"] = grouped_folds(df.loc[train], folds, seed)  # `train`: the official train set
    return df[MANIFEST_COLUMNS], {"removed_from_train_as_test_duplicates": removed}


def duplicate_audit(images: pd.DataFrame) -> dict:
    """Exact-duplicate groups (same sha256) among the official split, before any removal."""
    groups = [g for _, g in images.groupby("sha256") if len(g) > 1]
    within = sum(1 for g in groups if g["split"].nunique() == 1)
    return {
        "groups": len(groups),
        "images_in_groups": int(sum(len(g) for g in groups)),
        "groups_within_one_split": within,
        "groups_across_train_test": len(groups) - within,
        "list": [sorted(g["path"]) for g in sorted(groups, key=lambda g: min(g["path"]))],
    }


def counts(manifest: pd.DataFrame, by: str = "split") -> dict:
    """Images per class/subtype and patients, for each value of `by` (split, or fold)."""
    out: dict = {}
    for value, part in manifest.groupby(by):
        by_sub = part.groupby(["label", "subtype"]).size()
        out[str(value)] = {
            "images": len(part),
            "by_label": {k: int(v) for k, v in part["label"].value_counts().sort_index().items()},
            "by_subtype": {f"{lab}/{sub}": int(v) for (lab, sub), v in by_sub.items()},
            "patients": int(patient_key(part).nunique()),
        }
    return out


def guarantees(manifest: pd.DataFrame, strategy: str) -> dict:
    """What the split does and cannot promise about patients, for the audit (ids repeat across
    the official folders, so a shared id may or may not be the same child)."""
    official = official_split(manifest)
    ids = {folder: set(manifest.loc[official == folder, "patient_id"]) for folder in OFFICIAL_SPLITS}
    val_ids = set(manifest.loc[manifest["split"] == "val", "patient_id"])
    shared = len(ids["train"] & ids["test"])
    out = {
        "patient_key": "official folder + patient id (the official train and test folders were numbered independently)",
        "patient_ids_in_official_train_and_test": shared,
        "guaranteed": [
            "no patient (official folder + id) has images in two of train/val/test, nor in two folds",
            "no identical image (sha256) in test and train/val (train copies are dropped) nor in two folds",
        ],
        "not_guaranteed": [
            (
                f"train and test disjoint by child: {shared} ids occur in both official folders and "
                "whether one id is one child cannot be told from the data; this rests on the dataset's official split"
            ),
        ],
    }
    if strategy == "seed":
        out["val_patient_ids_in_official_train"] = len(val_ids & ids["train"])
        out["guaranteed"].append(
            "val holds whole official-test patients: none of them (by "
            "the official test numbering) has an image left in test"
        )
        out["not_guaranteed"].append(
            f"val and train disjoint by child: {out['val_patient_ids_in_official_train']} "
            f"of val's {len(val_ids)} patient ids also occur in the official train folder"
        )
    else:
        out["guaranteed"].append(
            "val holds whole official-train patients, none of them in train; test is the official test set, untouched"
        )
    return out


def check_manifest(manifest: pd.DataFrame) -> None:
    """Invariants every manifest must hold; raises CxrError naming the broken one."""
    if list(manifest.columns) != MANIFEST_COLUMNS:
        raise CxrError(f"manifest columns must be {MANIFEST_COLUMNS}, got {list(manifest.columns)}")
    keys = patient_key(manifest)
    by_split = defaultdict(set)
    for split, key in zip(manifest["split"], keys):
        by_split[split].add(key)
    for a, b in combinations(SPLITS, 2):
        if by_split[a] & by_split[b]:
            raise CxrError(f"patients in both {a} and {b}: {sorted(by_split[a] & by_split[b])[:5]}")
    fold = manifest["fold"].astype(int)
    outside = (official_split(manifest) != "train") & (fold != NO_FOLD)
    if outside.any():
        raise CxrError(
            f"images outside the official train set have a fold: {manifest.loc[outside, 'path'].tolist()[:5]}"
        )
    for what, unit in (("patients", keys), ("identical images", manifest["sha256"])):
        folds_of = fold.groupby(unit).nunique()
        if (folds_of > 1).any():
            raise CxrError(f"{what} in two folds: {sorted(folds_of.index[folds_of > 1])[:5]}")
    for split in SPLITS:
        part = manifest[manifest["split"] == split]
        if len(part) == 0:
            raise CxrError(f"the {split} split is empty; check fetch.source and split.val_fraction")
        if part["label"].nunique() < 2:
            raise CxrError(f"the {split} split holds only {part['label'].iloc[0]} images; both classes are needed")


def main() -> int:
    for name in sys.argv[1:]:
        print(name, parse_name(name))
    return 0


if __name__ == "__main__":
    run_main(main)
