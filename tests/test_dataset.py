"""Pure functions of cxr.data.dataset: name parsing, splits, duplicates, manifest invariants."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cxr.core.errors import CxrError
from cxr.data import dataset


@pytest.mark.parametrize(
    "name, patient, subtype",
    [
        ("person123_bacteria_456.jpeg", "person123", "bacteria"),
        ("person1_virus_12_3.jpeg", "person1", "virus"),
        ("IM-0115-0001.jpeg", "IM-0115", "normal"),
        ("IM-0117-0001-0002.jpeg", "IM-0117", "normal"),
        ("NORMAL2-IM-1427-0001-0002.jpeg", "NORMAL2-IM-1427", "normal"),
        ("NORMAL2-IM-0468-0001.jpeg", "NORMAL2-IM-0468", "normal"),
        ("BACTERIA-1351146-0001.jpeg", "1351146", "bacteria"),
        ("NORMAL-28501-0001.jpeg", "28501", "normal"),
        ("VIRUS-3637528-0002.jpeg", "3637528", "virus"),
        ("virus-3637528-0002.JPEG", "3637528", "virus"),
    ],
)
def test_parse_name_both_schemes(name, patient, subtype):
    parsed = dataset.parse_name(name)
    assert (parsed.patient_id, parsed.subtype, parsed.parsed) == (patient, subtype, True)


def test_unparsed_name_is_its_own_patient():
    parsed = dataset.parse_name("scan_of_someone.jpeg")
    assert parsed == dataset.ParsedName("scan_of_someone", "unknown", False)
    assert dataset.subtype_for("PNEUMONIA", parsed) == "unknown"
    assert dataset.subtype_for("NORMAL", parsed) == "normal"


def fake_images(n_patients: int = 60, per_patient: int = 3, seed: int = 0) -> pd.DataFrame:
    """An official-split table: train patients of three strata, a small test set."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in (("train", n_patients), ("test", 12)):
        for p in range(n):
            subtype = ("normal", "bacteria", "virus")[p % 3]
            label = "NORMAL" if subtype == "normal" else "PNEUMONIA"
            for k in range(int(rng.integers(1, per_patient + 1))):
                rows.append(
                    {
                        "path": f"{split}/{label}/{subtype}-{p}-{k}.jpeg",
                        "label": label,
                        "subtype": subtype,
                        "patient_id": f"{split}{p}",
                        "split": split,
                        "sha256": f"{split}-{p}-{k}",
                    }
                )
    return pd.DataFrame(rows)


def test_patient_grouped_split_keeps_patients_whole_and_is_stratified():
    images = fake_images()
    manifest, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=1)
    dataset.check_manifest(manifest)
    train, val = manifest[manifest.split == "train"], manifest[manifest.split == "val"]
    assert not set(train.patient_id) & set(val.patient_id)
    for subtype in ("normal", "bacteria", "virus"):
        share = (val.subtype == subtype).sum() / ((train.subtype == subtype).sum() + (val.subtype == subtype).sum())
        assert 0.1 < share < 0.35, subtype
    # The official test set is untouched.
    assert sorted(manifest.loc[manifest.split == "test", "path"]) == sorted(images.loc[images.split == "test", "path"])


def test_split_is_deterministic_and_seed_dependent():
    images = fake_images()
    a, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=1)
    b, _ = dataset.make_manifest(images.sample(frac=1, random_state=3), "patient_grouped", 0.2, seed=1)
    c, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])


def test_duplicate_images_never_straddle_train_and_val():
    images = fake_images(n_patients=90)
    # Two different patients share an identical image: they must land on the same side.
    train = images[images.split == "train"]
    first, other = train.iloc[0], train[train.patient_id != train.iloc[0].patient_id].iloc[-1]
    images.loc[other.name, "sha256"] = first.sha256
    for seed in range(10):
        manifest, _ = dataset.make_manifest(images, "patient_grouped", 0.3, seed=seed)
        sides = manifest.set_index("patient_id").loc[[first.patient_id, other.patient_id], "split"].unique()
        assert len(sides) == 1


def test_duplicates_of_test_images_leave_train_not_test():
    images = fake_images()
    test_row = images[images.split == "test"].iloc[0]
    train_idx = images[images.split == "train"].index[5]
    images.loc[train_idx, "sha256"] = test_row.sha256
    audit = dataset.duplicate_audit(images)
    assert audit["groups"] == 1 and audit["groups_across_train_test"] == 1
    manifest, removed = dataset.make_manifest(images, "patient_grouped", 0.2, seed=0)
    assert removed["removed_from_train_as_test_duplicates"] == [images.loc[train_idx, "path"]]
    assert test_row.path in set(manifest.path)
    assert images.loc[train_idx, "path"] not in set(manifest.path)


def test_seed_protocol_moves_16_normal_and_8_plus_8_pneumonia_from_test():
    images = fake_images()
    extra = []
    for subtype, label in (("normal", "NORMAL"), ("bacteria", "PNEUMONIA"), ("virus", "PNEUMONIA")):
        for i in range(20):
            extra.append(
                {
                    "path": f"test/{label}/x-{subtype}-{i}.jpeg",
                    "label": label,
                    "subtype": subtype,
                    "patient_id": f"t{subtype}{i}",
                    "split": "test",
                    "sha256": f"x{subtype}{i}",
                }
            )
    images = pd.concat([images, pd.DataFrame(extra)], ignore_index=True)
    manifest, _ = dataset.make_manifest(images, "seed", 0.1, seed=7)
    val = manifest[manifest.split == "val"]
    assert (val.label == "NORMAL").sum() == 16
    assert (val.subtype == "bacteria").sum() == 8 and (val.subtype == "virus").sum() == 8
    assert set(manifest.loc[manifest.split == "train", "path"]) == set(images.loc[images.split == "train", "path"])
    again, _ = dataset.make_manifest(images, "seed", 0.1, seed=7)
    pd.testing.assert_frame_equal(manifest, again)


def test_seed_protocol_refuses_too_few_test_images():
    with pytest.raises(CxrError, match="split.strategy=seed"):
        dataset.make_manifest(fake_images(), "seed", 0.1, seed=0)


def test_check_manifest_refuses_leaks_and_empty_splits():
    manifest, _ = dataset.make_manifest(fake_images(), "patient_grouped", 0.2, seed=0)
    leak = manifest.copy()
    leak.loc[leak.index[leak.split == "val"][0], "patient_id"] = leak.loc[leak.split == "train", "patient_id"].iloc[0]
    with pytest.raises(CxrError, match="both train and val"):
        dataset.check_manifest(leak)
    with pytest.raises(CxrError, match="val split is empty"):
        dataset.check_manifest(manifest.assign(split=manifest.split.replace("val", "train")))


def test_val_fraction_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="val_fraction"):
        dataset.patient_grouped_split(fake_images(), 1.0, 0)


def test_scan_reads_the_tree(tmp_path):
    from testkit.synth import write_tree

    write_tree(tmp_path / "raw", naming="mendeley")
    table = dataset.scan(tmp_path / "raw", rel_to=tmp_path)
    assert set(table.split) == {"train", "test"} and table.parsed.all()
    assert set(table.subtype) == {"normal", "bacteria", "virus"}
    assert table.path.str.startswith("raw/").all()
    (tmp_path / "raw" / "test" / "NORMAL").rename(tmp_path / "gone")
    with pytest.raises(CxrError, match="test/NORMAL is missing"):
        dataset.scan(tmp_path / "raw")


def test_folds_keep_patients_whole_cover_official_train_and_are_stratified():
    images = fake_images(n_patients=90)
    manifest, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=1, folds=3)
    dataset.check_manifest(manifest)
    official_train = manifest.path.str.startswith("train/")
    assert set(manifest.loc[official_train, "fold"]) == {0, 1, 2}  # train and val rows alike
    assert (manifest.loc[~official_train, "fold"] == dataset.NO_FOLD).all()
    assert (manifest[official_train].groupby("patient_id")["fold"].nunique() == 1).all()
    for subtype in ("normal", "bacteria", "virus"):
        per_fold = manifest[official_train & (manifest.subtype == subtype)].groupby("fold").size()
        assert per_fold.max() - per_fold.min() <= 3, (subtype, per_fold.tolist())


def test_folds_are_deterministic_and_seed_dependent_and_off_at_zero():
    images = fake_images(n_patients=90)
    a, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=1, folds=4)
    b, _ = dataset.make_manifest(images.sample(frac=1, random_state=3), "patient_grouped", 0.2, seed=1, folds=4)
    c, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=2, folds=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a["fold"].equals(c["fold"])
    off, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=1)
    assert (off["fold"] == dataset.NO_FOLD).all() and off["split"].equals(a["split"])


def test_patients_sharing_an_image_share_a_fold():
    images = fake_images(n_patients=90)
    train = images[images.split == "train"]
    first, other = train.iloc[0], train[train.patient_id != train.iloc[0].patient_id].iloc[-1]
    images.loc[other.name, "sha256"] = first.sha256
    for seed in range(10):
        manifest, _ = dataset.make_manifest(images, "patient_grouped", 0.2, seed=seed, folds=5)
        dataset.check_manifest(manifest)
        assert manifest.set_index("patient_id").loc[[first.patient_id, other.patient_id], "fold"].nunique() == 1


def test_fold_arguments_are_checked():
    images = fake_images()
    with pytest.raises(ValueError, match="folds must be at least 2"):
        dataset.grouped_folds(images, 1, seed=0)
    few = images[images.patient_id.isin(["train0", "train1", "train2"])]
    with pytest.raises(CxrError, match="split.folds=5 needs at least 5 patients"):
        dataset.grouped_folds(few, 5, seed=0)


def test_check_manifest_refuses_fold_leaks():
    manifest, _ = dataset.make_manifest(fake_images(n_patients=90), "patient_grouped", 0.2, seed=0, folds=3)
    sizes = manifest[manifest.fold != dataset.NO_FOLD].groupby("patient_id").size()
    rows = manifest.index[manifest.patient_id == sizes.index[sizes > 1][0]]
    split_patient = manifest.copy()
    split_patient.loc[rows[0], "fold"] = (split_patient.loc[rows[1], "fold"] + 1) % 3
    with pytest.raises(CxrError, match="patients in two folds"):
        dataset.check_manifest(split_patient)
    test_fold = manifest.copy()
    test_fold.loc[test_fold.index[test_fold.split == "test"][0], "fold"] = 2
    with pytest.raises(CxrError, match="outside the official train set have a fold"):
        dataset.check_manifest(test_fold)


def test_ids_repeated_across_official_folders_are_different_patients():
    """The real data reuses ids across the official train and test folders: the seed protocol's
    val (from test) may share an id with train, but never a (folder, id) patient with test."""
    images = fake_images()
    extra = []
    for subtype, label in (("normal", "NORMAL"), ("bacteria", "PNEUMONIA"), ("virus", "PNEUMONIA")):
        for i in range(20):
            for k in range(1 + i % 3):  # patients of 1-3 images: the protocol must move them whole
                extra.append(
                    {
                        "path": f"test/{label}/x-{subtype}-{i}-{k}.jpeg",
                        "label": label,
                        "subtype": subtype,
                        "patient_id": f"train{i}" if subtype == "bacteria" else f"t{subtype}{i}",
                        "split": "test",
                        "sha256": f"x{subtype}{i}-{k}",
                    }
                )
    images = pd.concat([images, pd.DataFrame(extra)], ignore_index=True)
    for seed in range(5):
        manifest, _ = dataset.make_manifest(images, "seed", 0.1, seed=seed, folds=3)
        dataset.check_manifest(manifest)  # no "patients in both train and val" for a reused id
        val, test = manifest[manifest.split == "val"], manifest[manifest.split == "test"]
        assert val.subtype.value_counts().to_dict() == {"normal": 16, "bacteria": 8, "virus": 8}
        assert not set(val.patient_id) & set(test.patient_id)
        assert (val.fold == dataset.NO_FOLD).all()
        patients = dataset.guarantees(manifest, "seed")
        shared = set(val.patient_id) & set(manifest.loc[manifest.split == "train", "patient_id"])
        assert patients["val_patient_ids_in_official_train"] == len(shared) > 0
    leak = manifest.copy()
    leak.loc[leak.index[leak.split == "test"][0], "patient_id"] = val.patient_id.iloc[0]
    with pytest.raises(CxrError, match="patients in both val and test"):
        dataset.check_manifest(leak)
