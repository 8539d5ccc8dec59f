"""The split stage on the real data (../shared/data/chest_xray_224.zip), both strategies and the
cross-validation folds: the seed strategy once passed on synthetic names and failed on the real
ones (ids reused across the official folders), so these run on the real names. ~10 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cxr.data import dataset
from cxr.data.fetch import MB, fetch

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT.parent / "shared" / "data" / "chest_xray_224.zip"


@pytest.fixture(scope="module", autouse=True)
def real_archive(require_shared) -> Path:
    return require_shared(ZIP)


def run_split(project: Path, strategy: str) -> tuple[pd.DataFrame, dict]:
    """Fetch the real archive into `project` and run stages/split.py there with `strategy`."""
    fetch(str(ZIP), project / "data" / "raw", max_uncompressed_bytes=4096 * MB, progress=False)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["strategy"] = strategy
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "split.py")],
        check=False,
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = pd.read_csv(project / "data/split/manifest.csv", dtype={"fold": int}, keep_default_na=False)
    return manifest, json.loads((project / "data/split/audit.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[pd.DataFrame, dict]]:
    return {s: run_split(tmp_path_factory.mktemp(s), s) for s in ("patient_grouped", "seed")}


@pytest.mark.parametrize("strategy", ["patient_grouped", "seed"])
def test_both_strategies_give_a_valid_manifest(runs, strategy):
    manifest, audit = runs[strategy]
    dataset.check_manifest(manifest)
    assert len(manifest) == 5840 and audit["excluded"] == []
    patients = audit["patients"]
    assert patients["patient_ids_in_official_train_and_test"] == 170  # the reuse that broke the seed strategy


def test_patient_grouped_leaves_the_official_test_set_untouched(runs):
    manifest, audit = runs["patient_grouped"]
    test = manifest[manifest.split == "test"]
    assert len(test) == 624 and test.path.str.contains("/test/").all()
    assert audit["counts"]["test"]["by_label"] == {"NORMAL": 234, "PNEUMONIA": 390}


def test_seed_protocol_moves_16_plus_16_whole_test_patients(runs):
    manifest, audit = runs["seed"]
    val, test, train = (manifest[manifest.split == s] for s in ("val", "test", "train"))
    assert val.path.str.contains("/test/").all() and len(val) == 32
    assert val.subtype.value_counts().to_dict() == {"normal": 16, "bacteria": 8, "virus": 8}
    assert len(test) == 592
    assert len(train) == 5216 and train.path.str.contains("/train/").all()
    assert not set(val.patient_id) & set(test.patient_id)  # within the official test numbering
    assert audit["patients"]["val_patient_ids_in_official_train"] == len(set(val.patient_id) & set(train.patient_id))


@pytest.mark.parametrize("strategy", ["patient_grouped", "seed"])
def test_folds_on_real_data_are_patient_disjoint_and_balanced(runs, strategy):
    manifest, audit = runs[strategy]
    official_train = manifest.path.str.contains("/train/")
    in_folds = manifest[manifest.fold != dataset.NO_FOLD]
    assert official_train.sum() == len(in_folds) == 5216 and official_train[in_folds.index].all()
    assert sorted(in_folds.fold.unique()) == [0, 1, 2, 3, 4]
    assert (in_folds.groupby("patient_id").fold.nunique() == 1).all()
    assert (in_folds.groupby("sha256").fold.nunique() == 1).all()
    overall = (in_folds.label == "PNEUMONIA").mean()
    per_fold = in_folds.groupby("fold").agg(
        images=("path", "size"), pneumonia=("label", lambda s: (s == "PNEUMONIA").mean())
    )
    assert (per_fold.pneumonia - overall).abs().max() < 0.03, per_fold
    assert per_fold.images.max() < 1.15 * per_fold.images.min(), per_fold
    assert {int(k): v["images"] for k, v in audit["fold_counts"].items()} == per_fold.images.to_dict()


def test_folds_do_not_depend_on_the_strategy(runs):
    (a, _), (b, _) = runs["patient_grouped"], runs["seed"]
    fold_a, fold_b = (m.set_index("path").fold for m in (a, b))
    assert fold_a.equals(fold_b.loc[fold_a.index])
