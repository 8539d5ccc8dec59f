"""params.yaml validation: every bad value stops before work starts, naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from cxr import params
from cxr.errors import CxrError


@pytest.fixture
def raw(project_root):
    return yaml.safe_load((project_root / "params.yaml").read_text())


def test_project_params_are_valid(raw):
    p = params.parse(raw)
    assert p.image_sizes == sorted({v["image_size"] for v in raw["variants"].values()})
    assert p.variants["transfer_finetuned"].starts_from_model


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("variants.cnn_baseline.epochs", 0, "variants.cnn_baseline.epochs: must be a positive integer"),
        ("variants.cnn_baseline.epochs", -3, "must be a positive integer"),
        ("variants.cnn_baseline.model", "resnet9000", "variants.cnn_baseline.model: 'resnet9000' is not one of"),
        ("transfer.backbone", "alexnet", "transfer.backbone: 'alexnet' is not one of"),
        ("split.val_fraction", 1.5, "split.val_fraction: must be between 0 and 1"),
        ("split.val_fraction", 0, "split.val_fraction"),
        ("split.strategy", "random", "split.strategy"),
        ("split.folds", 1, "split.folds: must be 0 .no folds. or an integer of at least 2, got 1"),
        ("split.folds", -5, "split.folds"),
        ("split.folds", 2.5, "split.folds"),
        ("split.folds", True, "split.folds"),
        ("preprocess.resize", "crop", "preprocess.resize"),
        ("variants.transfer_frozen.image_size", 16, "too small for backbone mobilenet_v2"),
        ("variants.cnn_baseline.learning_rate", -1, "learning_rate: must be positive"),
        ("variants.cnn_baseline.batch_size", 0, "batch_size: must be a positive integer"),
        ("variants.cnn_baseline.colour", "blue", "unknown key"),
        ("variants.transfer_finetuned.init_from", "cxr/models.py", "init_from: must name the trained"),
        ("base.seed", "abc", "base.seed"),
    ],
)
def test_bad_values_name_the_key(raw, path, value, message):
    bad = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = bad
    for key in parents:
        node = node[key]
    node[last] = value
    with pytest.raises(CxrError, match=message.replace("(", r"\(")):
        params.parse(bad)


@pytest.mark.parametrize("section", ["base", "fetch", "split", "variants", "train", "evaluate"])
def test_missing_section(raw, section):
    del raw[section]
    with pytest.raises(CxrError, match=f"no '{section}' section"):
        params.parse(raw)


def test_unknown_variant_is_a_clear_error(raw):
    with pytest.raises(CxrError, match="unknown variant 'nope'.*known: cnn_augmented"):
        params.parse(raw).variant("nope")


def test_seed_epochs_switch(raw):
    raw["train"]["use_seed_epochs"] = True
    p = params.parse(raw)
    assert p.variants["cnn_baseline"].effective_epochs(p.train) == raw["variants"]["cnn_baseline"]["seed_epochs"]


def test_load_reports_missing_and_broken_files(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        params.load(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("base: [unclosed\n")
    with pytest.raises(CxrError, match="not valid YAML"):
        params.load(tmp_path / "params.yaml")


def test_folds_default_and_off(raw):
    del raw["split"]["folds"]
    assert params.parse(raw).split.folds == 5
    raw["split"]["folds"] = 0
    assert params.parse(raw).split.folds == 0
