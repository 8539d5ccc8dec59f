"""params.yaml validation: every bad value stops before work starts, naming the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from cxr.core import params
from cxr.core.errors import CxrError


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
        ("variants.transfer_finetuned.init_from", "cxr/model/architectures.py", "init_from: must name the trained"),
        ("base.seed", "abc", "base.seed"),
        # types: YAML strings and booleans must not pass for numbers or booleans
        ("train.mixed_precision", "false", "train.mixed_precision: must be true or false, got 'false'"),
        ("train.use_seed_epochs", 1, "train.use_seed_epochs: must be true or false"),
        ("fetch.max_uncompressed_mb", "4096", "fetch.max_uncompressed_mb: must be a number, got '4096'"),
        ("fetch.timeout_s", True, "fetch.timeout_s: must be a number"),
        ("variants.cnn_baseline.augment", "yes", "variants.cnn_baseline.augment: must be true or false"),
        ("variants.cnn_baseline.learning_rate", "0.001", "learning_rate: must be a number"),
        ("variants.cnn_baseline.epochs", 2.5, "variants.cnn_baseline.epochs: must be an integer"),
        ("transfer.alpha", "0.35", "transfer.alpha: must be a number"),
        ("split.val_fraction", True, "split.val_fraction: must be a number"),
        # the modern variant's own keys, checked before TensorFlow loads
        ("variants.modern.backbone", "resnet", "variants.modern.backbone: 'resnet' is not one of"),
        ("variants.modern.dropout", 1.0, r"variants.modern.dropout: must be a number in \[0, 1\)"),
        ("variants.modern.augment_strength", 0, "variants.modern.augment_strength"),
        ("variants.modern.warmup_fraction", "0.1", "variants.modern.warmup_fraction"),
        ("variants.modern.label_smoothing", -0.1, "variants.modern.label_smoothing"),
        ("variants.modern.weight_decay", "1e-4", "variants.modern.weight_decay"),
        ("variants.modern.trainable_from", 1.5, "variants.modern.trainable_from"),
        ("variants.modern.alpha", 0, "variants.modern.alpha"),
        ("train.threshold_rule", "median", "train.threshold_rule: 'median' is not one of youden"),
        ("train.threshold_rule", "sensitivity:1.5", "train.threshold_rule"),
        ("train.threshold_rule", "sensitivity:abc", "train.threshold_rule"),
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


@pytest.mark.parametrize(
    "rule, parsed",
    [
        ("youden", ("youden", None)),
        ("sensitivity:0.97", ("sensitivity", 0.97)),
        ("calibrated_0.5", ("calibrated", 0.5)),
    ],
)
def test_threshold_rules_parse(raw, rule, parsed):
    raw["train"]["threshold_rule"] = rule
    assert params.parse_threshold_rule(params.parse(raw).train.threshold_rule) == parsed


def test_modern_has_its_own_backbone(raw):
    """The modern variant's backbone and width are its own; the sidecar and size check use them."""
    raw["variants"]["modern"].update(backbone="mobilenet", alpha=0.25)
    raw["transfer"].update(backbone="vgg19", alpha=0.35)
    p = params.parse(raw)
    used = p.variants["modern"].backbone(p.transfer)
    assert (used.backbone, used.alpha, used.weights) == ("mobilenet", 0.25, raw["transfer"]["weights"])
    assert p.variants["transfer_frozen"].backbone(p.transfer) == p.transfer


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
    with pytest.raises(CxrError, match="cv.variants needs folds"):
        params.parse(raw)  # the k-fold ensembles need folds
    raw["cv"] = {"variants": [], "folds": []}
    assert params.parse(raw).split.folds == 0
