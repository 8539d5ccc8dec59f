"""Data checks: split and preprocess run on a synthetic tree, then their outputs are audited
(schema, leakage, duplicates, counts, cache shapes). The same checks run on the real
data/split/manifest.csv when a `make repro` has produced one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.data import dataset
from cxr.data.cache import load_split

ROOT = Path(__file__).resolve().parents[2]


def run_stage(cwd: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / f"{name}.py")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def project(tmp_path):
    from testkit.synth import Counts, write_tree

    raw = tmp_path / "data" / "raw" / "chest_xray"
    write_tree(
        raw,
        {
            "train": Counts(normal=8, bacteria=8, virus=6, images_per_patient=2),
            "test": Counts(normal=4, bacteria=3, virus=3),
        },
        size=(90, 70),
    )
    # a duplicate of a test image inside train, and a broken file: both must be handled visibly
    test_img = sorted((raw / "test" / "NORMAL").iterdir())[0]
    shutil.copy(test_img, raw / "train" / "NORMAL" / "IM-0777-0001.jpeg")
    (raw / "train" / "PNEUMONIA" / "person999_bacteria_1.jpeg").write_bytes(b"not a jpeg")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["val_fraction"] = 0.25
    params["variants"] = {k: params["variants"][k] for k in ("cnn_baseline", "transfer_frozen")}
    params["cv"] = {"variants": [], "folds": []}  # no k-fold ensemble of a variant left out
    params["variants"]["cnn_baseline"]["image_size"] = 48
    params["variants"]["transfer_frozen"]["image_size"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def audit_manifest(manifest: pd.DataFrame) -> None:
    """The invariants every manifest must satisfy, real or synthetic."""
    dataset.check_manifest(manifest)
    assert manifest["path"].is_unique
    assert set(manifest["label"]) == {"NORMAL", "PNEUMONIA"}
    assert set(manifest["subtype"]) <= {"normal", "bacteria", "virus", "unknown"}
    assert ((manifest["label"] == "NORMAL") == (manifest["subtype"] == "normal")).all()
    # no image content in both test and train/val
    test_hashes = set(manifest.loc[manifest.split == "test", "sha256"])
    assert not test_hashes & set(manifest.loc[manifest.split != "test", "sha256"])


def test_split_and_preprocess_on_a_synthetic_tree(project):
    done = run_stage(project, "split")
    assert done.returncode == 0, done.stderr
    manifest = pd.read_csv(project / "data/split/manifest.csv", dtype=str)
    assert list(manifest.columns) == dataset.MANIFEST_COLUMNS
    audit_manifest(manifest)
    audit = json.loads((project / "data/split/audit.json").read_text())
    assert [e["path"] for e in audit["excluded"]] == ["data/raw/chest_xray/train/PNEUMONIA/person999_bacteria_1.jpeg"]
    assert audit["duplicates"]["groups_across_train_test"] == 1
    assert audit["removed_from_train_as_test_duplicates"] == ["data/raw/chest_xray/train/NORMAL/IM-0777-0001.jpeg"]
    assert audit["counts"]["test"]["images"] == 20  # the official test set, untouched
    assert sum(audit["counts"][s]["images"] for s in ("train", "val", "test")) == len(manifest)

    done = run_stage(project, "preprocess")
    assert done.returncode == 0, done.stderr
    for size in (32, 48):
        for split in ("train", "val", "test"):
            part = load_split(project / "data/processed" / str(size), split)
            rows = manifest[manifest.split == split].reset_index(drop=True)
            assert part.x.shape == (len(rows), size, size, 1) and part.x.dtype == np.uint8
            assert part.rows["path"].tolist() == rows["path"].tolist()
            assert part.y.tolist() == (rows["label"] == "PNEUMONIA").astype(int).tolist()
    # the cached pixels are what the one image loader gives for that file
    from cxr.data.images import load_resized

    first = load_split(project / "data/processed/48", "test")
    assert np.array_equal(first.x[0], load_resized(project / first.rows["path"][0], [48])[48])


def test_split_refuses_a_tree_without_test_normal(project):
    shutil.rmtree(project / "data/raw/chest_xray/test/NORMAL")
    done = run_stage(project, "split")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and "test/NORMAL is missing" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (project / "data/split/manifest.csv").exists()


def test_preprocess_without_manifest_is_a_clear_error(project):
    done = run_stage(project, "preprocess")
    assert done.returncode == 1 and "run `dvc repro split` first" in done.stderr
    assert not (project / "data/processed").exists()


@pytest.mark.skipif(not (ROOT / "data/split/manifest.csv").exists(), reason="no real manifest: run `make repro` first")
def test_real_manifest_holds_the_invariants():
    manifest = pd.read_csv(ROOT / "data/split/manifest.csv", dtype=str)
    audit_manifest(manifest)
    assert (manifest.split == "test").sum() in (624, 592)  # official test, or seed protocol's 624 − 32
