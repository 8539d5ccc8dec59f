"""File names → label, subtype and patient; validation splits; the data audit.

    python -m cxr.dataset NAME...     # print the parsed label/subtype/patient of file names

Both naming schemes of the data are understood:
  Kaggle/v2:    person123_bacteria_456.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-1427-0001-0002.jpeg
  Mendeley v3:  BACTERIA-1351146-0001.jpeg, NORMAL-28501-0001.jpeg, VIRUS-3637528-0002.jpeg
"""

from __future__ import annotations

import os
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr.errors import CxrError, run_main

LABELS = ("NORMAL", "PNEUMONIA")
MANIFEST_COLUMNS = ["path", "label", "subtype", "patient_id", "split", "sha256"]
SEED_PROTOCOL_NORMAL = 16
SEED_PROTOCOL_PNEUMONIA = 16  # half bacterial, half viral

_PATTERNS = [
    # Kaggle/v2
    (re.compile(r"^person(\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.I), lambda m: f"person{int(m[1])}", lambda m: m[2].lower()),
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
    if label == "NORMAL":
        return "normal"
    return parsed.subtype if parsed.subtype in ("bacteria", "virus") else "unknown"


def scan(raw_root: Path | str, rel_to: Path | str = ".") -> pd.DataFrame:
    """One row per image under raw_root/{train,test}/{NORMAL,PNEUMONIA}: path, label, subtype,
    patient_id, official split, parsed (bool). Paths are relative to `rel_to`."""
    raw_root = Path(raw_root)
    rows = []
    for split in ("train", "test"):
        for label in LABELS:
            folder = raw_root / split / label
            if not folder.is_dir():
                raise CxrError(f"{folder} is missing; the archive needs {{train,test}}/{{NORMAL,PNEUMONIA}} (rerun `dvc repro fetch`)")
            for f in sorted(folder.iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    p = parse_name(f.name)
                    rows.append({
                        "path": Path(os.path.relpath(f, rel_to)).as_posix(),
                        "label": label, "subtype": subtype_for(label, p), "patient_id": p.patient_id,
                        "split": split, "parsed": p.parsed,
                    })
    df = pd.DataFrame(rows, columns=["path", "label", "subtype", "patient_id", "split", "parsed"])
    for split in ("train", "test"):
        if not (df["split"] == split).any():
            raise CxrError(f"{raw_root / split} holds no images; check fetch.source")
    return df


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
    test images to val. Returns the new split per row ('test' | 'val')."""
    rng = np.random.default_rng(seed)
    picked: list = []
    for label, subtype, n in (("NORMAL", "normal", SEED_PROTOCOL_NORMAL), ("PNEUMONIA", "bacteria", SEED_PROTOCOL_PNEUMONIA // 2), ("PNEUMONIA", "virus", SEED_PROTOCOL_PNEUMONIA // 2)):
        pool = test.index[(test["label"] == label) & (test["subtype"] == subtype)].sort_values()
        if len(pool) < n:
            raise CxrError(f"split.strategy=seed needs {n} {subtype} test images, found {len(pool)}; use patient_grouped")
        picked.extend(pool[rng.choice(len(pool), size=n, replace=False)])
    return pd.Series(np.where(test.index.isin(picked), "val", "test"), index=test.index)


def make_manifest(images: pd.DataFrame, strategy: str, val_fraction: float, seed: int) -> tuple[pd.DataFrame, dict]:
    """Assign train/val/test to decodable images (columns path,label,subtype,patient_id,split,sha256).

    Exact duplicates that cross into the official test set are dropped from train/val, never
    from test. Returns the manifest and the duplicate part of the audit.
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


def counts(manifest: pd.DataFrame) -> dict:
    """Images per split/class/subtype and patients per split."""
    out: dict = {}
    for split, part in manifest.groupby("split"):
        by_sub = part.groupby(["label", "subtype"]).size()
        out[split] = {
            "images": len(part),
            "by_label": {k: int(v) for k, v in part["label"].value_counts().sort_index().items()},
            "by_subtype": {f"{lab}/{sub}": int(v) for (lab, sub), v in by_sub.items()},
            "patients": int(part["patient_id"].nunique()),
        }
    return out


def check_manifest(manifest: pd.DataFrame) -> None:
    """Invariants every manifest must hold; raises CxrError naming the broken one."""
    if list(manifest.columns) != MANIFEST_COLUMNS:
        raise CxrError(f"manifest columns must be {MANIFEST_COLUMNS}, got {list(manifest.columns)}")
    by_split = defaultdict(set)
    for split, pid in zip(manifest["split"], manifest["patient_id"]):
        by_split[split].add(pid)
    if by_split["train"] & by_split["val"]:
        raise CxrError(f"patients in both train and val: {sorted(by_split['train'] & by_split['val'])[:5]}")
    for split in ("train", "val", "test"):
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
