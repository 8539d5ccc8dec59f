"""The out-of-distribution gate and the refer band (cxr/evaluation/gate.py, stages/ood.py, `cxr predict`).

.venv/bin/pytest -q tests/test_ood.py      # the last test runs on the tiny pipeline (slow)
"""

from __future__ import annotations

import json
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr.core.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE, UNCERTAIN
from cxr.core.errors import CxrError
from cxr.data.images import ImageFacts, load_resized_facts
from cxr.evaluation import gate as ood
from cxr.evaluation import ood_families, selective
from testkit.pipeline import ROOT, sh

CHECKS = ood.Checks(min_std=6.0, max_colourfulness=12.0, max_aspect=2.5)
ZIP_224 = ROOT.parent / "shared" / "data" / "chest_xray_224.zip"


def chest_like(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """uint8 (n, size, size, 1): two dark lungs in a bright body, with per-image jitter."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        body = 170 + rng.normal(0, 10)
        lungs = sum(
            np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.25) ** 2))
            for cx in (0.3 + rng.normal(0, 0.02), 0.7 + rng.normal(0, 0.02))
        )
        img = body - 110 * lungs + rng.normal(0, 8, (size, size))
        out.append(np.clip(img, 0, 255).astype(np.uint8)[:, :, None])
    return np.stack(out)


def test_mahalanobis_ranks_planted_outliers_above_inliers():
    rng = np.random.default_rng(0)
    cov = np.diag(np.linspace(0.1, 5, 20))
    train = rng.multivariate_normal(np.zeros(20), cov, 500)
    inliers = rng.multivariate_normal(np.zeros(20), cov, 200)
    # outliers lie along the low-variance directions: far in Mahalanobis, near in Euclid
    outliers = rng.multivariate_normal(np.zeros(20), cov, 200)
    outliers[:, :3] += 2.5
    d = ood.Mahalanobis.fit(train)
    auc = roc_auc_score(np.r_[np.zeros(200), np.ones(200)], np.r_[d.distance(inliers), d.distance(outliers)])
    euclid = roc_auc_score(
        np.r_[np.zeros(200), np.ones(200)], np.r_[np.linalg.norm(inliers, axis=1), np.linalg.norm(outliers, axis=1)]
    )
    assert auc > 0.97 and auc > euclid + 0.1
    assert d.distance(inliers).mean() == pytest.approx(20, rel=0.25)  # E[d²] = dimension for the fitted Gaussian


def fitted_gate(rng: np.random.Generator, keep_val: float = 0.99, coverage: float = 0.9) -> tuple[ood.Gate, dict]:
    data = {s: (rng.normal(0, 1, (n, 8)), chest_like(rng, n)) for s, n in (("train", 400), ("val", 300))}
    val_p = rng.beta(0.5, 0.5, 300)
    gate = ood.fit_gate(*data["train"], *data["val"], val_p, 0.4, keep_val, coverage, CHECKS)
    return gate, {**data, "val_p": val_p}


@pytest.mark.parametrize("keep_val", [0.9, 0.99, 1.0])
def test_gate_threshold_keeps_the_declared_share_of_validation(keep_val):
    gate, data = fitted_gate(np.random.default_rng(1), keep_val)
    inside = np.mean(gate.scores(*data["val"]) <= 1)
    assert keep_val <= inside <= keep_val + 1 / 300 + 1e-12
    assert gate.meta["val_in_distribution"] == pytest.approx(inside)


def grouped_gate(rng: np.random.Generator, shift: float = 0.0, keep_val: float = 0.99) -> tuple[ood.Gate, dict]:
    """A gate whose training images sit in 4 folds; fold 3's features are shifted by `shift`."""
    train_f, train_x = rng.normal(0, 1, (400, 8)), chest_like(rng, 400)
    groups = np.repeat(np.arange(4), 100)
    train_f[groups == 3] += shift
    val_f, val_x = rng.normal(0, 1, (300, 8)), chest_like(rng, 300)
    gate = ood.fit_gate(
        train_f, train_x, val_f, val_x, rng.beta(0.5, 0.5, 300), 0.4, keep_val, 0.9, CHECKS, train_groups=groups
    )
    return gate, {"val": (val_f, val_x)}


def test_worst_group_threshold_keeps_every_held_out_group_and_reports_leave_one_out():
    gate, data = grouped_gate(np.random.default_rng(11))
    held = gate.meta["held_out"]
    assert gate.meta["threshold_rule"] == "worst_group"
    assert held["groups"] == ["validation"] + [f"train fold {k}" for k in range(4)] and held["n"] == [300] + [100] * 4
    assert min(held["in_distribution"]) >= 0.99  # every group, not only their pool
    assert gate.meta["val_in_distribution"] == pytest.approx(np.mean(gate.scores(*data["val"]) <= 1))
    assert len(held["leave_one_out_false_flag"]) == 5 and held["leave_one_out_false_flag_max"] == max(
        held["leave_one_out_false_flag"]
    )
    assert "held_out" not in fitted_gate(np.random.default_rng(11))[0].meta  # no folds: validation alone
    assert fitted_gate(np.random.default_rng(11))[0].meta["threshold_rule"] == "validation"


def test_a_shifted_fold_raises_the_threshold_and_is_seen_in_leave_one_out():
    calm, _ = grouped_gate(np.random.default_rng(12))
    shifted, _ = grouped_gate(np.random.default_rng(12), shift=4.0)
    # fold 3's features drift (as another CPU's model might): the rule widens the threshold so it
    # still keeps 99% of it, and leave-one-out shows what that fold would have met without it
    assert shifted.meta["held_out"]["in_distribution"][4] >= 0.99
    loo = lambda g: g.meta["held_out"]["leave_one_out_false_flag"][4]  # noqa: E731
    assert loo(shifted) > 0.2 and loo(calm) < 0.05 and shifted.threshold > calm.threshold


def test_worst_group_needs_two_folds():
    rng = np.random.default_rng(13)
    x = chest_like(rng, 60)
    with pytest.raises(CxrError, match="at least 2 CV folds; set split.folds >= 2"):
        ood.fit_gate(
            rng.normal(0, 1, (60, 8)),
            x,
            rng.normal(0, 1, (30, 8)),
            x[:30],
            np.full(30, 0.5),
            0.4,
            0.99,
            0.9,
            CHECKS,
            train_groups=np.zeros(60, int),
        )


def test_gate_flags_planted_outliers_in_features_and_in_pixels():
    rng = np.random.default_rng(2)
    gate, _ = fitted_gate(rng)
    new_f, new_x = rng.normal(0, 1, (50, 8)), chest_like(rng, 50)
    assert np.mean(gate.scores(new_f, new_x) > 1) < 0.1  # fresh in-distribution inputs pass
    assert np.all(gate.scores(new_f + 6, new_x) > 1)  # features far away
    assert np.all(gate.scores(new_f, np.rot90(new_x, axes=(1, 2))) > 1)  # rotated: the pixel layout is wrong
    assert np.all(gate.scores(new_f, 255 - new_x) > 1)  # inverted grey levels


def test_gate_round_trips_through_its_file(tmp_path):
    rng = np.random.default_rng(3)
    gate, data = fitted_gate(rng)
    gate.save(tmp_path / "m.ood.npz")
    back = ood.Gate.load(tmp_path / "m.ood.npz")
    np.testing.assert_allclose(back.scores(*data["val"]), gate.scores(*data["val"]), rtol=1e-5)
    assert (back.refer_low, back.refer_high, back.checks, back.meta) == (
        gate.refer_low,
        gate.refer_high,
        gate.checks,
        gate.meta,
    )


def test_unreadable_gate_file_is_a_one_line_error(tmp_path):
    (tmp_path / "m.ood.npz").write_bytes(b"not a zip")
    with pytest.raises(Exception, match=r"m.ood.npz: cannot read the OOD gate .*dvc repro ood@"):
        ood.Gate.load(tmp_path / "m.ood.npz")


def test_refer_band_answers_at_least_its_coverage_on_every_draw():
    rng = np.random.default_rng(21)
    short = 0
    for _ in range(300):
        n, target, threshold = int(rng.integers(5, 200)), float(rng.uniform(0.5, 0.99)), float(rng.uniform(0.05, 0.95))
        p = rng.beta(0.4, 0.4, n)
        low, high = selective.refer_band(p, threshold, target)
        short += int(selective.answered(p, low, high).sum() < math.ceil(target * n - 1e-9))
    assert short == 0


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("threshold", [0.5, 0.93, 0.02])
def test_refer_band_coverage_matches_its_target(target, threshold):
    rng = np.random.default_rng(4)
    p = 1 / (1 + np.exp(-rng.normal(selective.logit(threshold), 3, 2000)))
    low, high = selective.refer_band(p, threshold, target)
    assert low <= threshold <= high
    assert target <= selective.answered(p, low, high).mean() <= target + 0.02  # on the probabilities it was set on
    fresh = 1 / (1 + np.exp(-rng.normal(selective.logit(threshold), 3, 5000)))
    assert (
        abs(selective.answered(fresh, low, high).mean() - target) <= 0.02
    )  # and on new ones from the same distribution
    # symmetric in logits around the threshold
    assert selective.logit(high) - selective.logit(threshold) == pytest.approx(
        selective.logit(threshold) - selective.logit(low)
    )


def test_refer_band_of_full_coverage_is_empty():
    assert selective.refer_band(np.array([0.1, 0.6]), 0.5, 1.0) == (0.5, 0.5)
    assert selective.answered(np.array([0.5]), 0.5, 0.5).all()


def test_labels_put_out_of_distribution_before_uncertain_before_the_class():
    gate, _ = fitted_gate(np.random.default_rng(5))
    mid = (gate.refer_low + gate.refer_high) / 2
    assert gate.label(mid, 0.4, "colour image") == OUT_OF_DISTRIBUTION
    assert gate.label(mid, 0.4, None) == UNCERTAIN
    assert gate.label(min(1.0, gate.refer_high + 1e-9), 0.4, None) == POSITIVE
    assert gate.label(max(0.0, gate.refer_low - 1e-9), 0.4, None) == NEGATIVE


def test_risk_coverage_ends_at_full_coverage_and_answers_the_most_confident_first():
    y = np.array([1, 1, 0, 0, 1, 0])
    p = np.array([0.99, 0.55, 0.02, 0.45, 0.3, 0.9])  # the two least confident (0.55, 0.45) are right
    curve = selective.risk_coverage(y, p, 0.5)
    full = selective.answered_metrics(y, p, 0.5, np.ones(6, bool))
    assert [c["coverage"] for c in curve] == pytest.approx(np.arange(1, 7) / 6)
    assert {k: curve[-1][k] for k in ("accuracy", "sensitivity", "specificity")} == {
        k: full[k] for k in ("accuracy", "sensitivity", "specificity")
    }
    assert curve[0] == {"coverage": 1 / 6, "accuracy": 1.0, "sensitivity": 1.0, "specificity": None}  # 0.99 first
    at = selective.at_coverage(y, p, 0.5, 0.5)
    assert at["n_answered"] == 3 and at["accuracy"] == pytest.approx(2 / 3)  # 0.99 ✓, 0.02 ✓, 0.9 ✗


def test_image_checks_catch_constant_colour_and_aspect():
    rng = np.random.default_rng(6)
    xray = chest_like(rng, 1)[0]
    gray = ImageFacts(1500, 1200, 0.0)
    assert ood.image_check(xray, gray, CHECKS) is None
    assert ood.image_check(np.zeros_like(xray), gray, CHECKS) == "blank"
    assert ood.image_check(np.full_like(xray, 200) + (rng.random(xray.shape) < 0.1), gray, CHECKS) == "blank"
    assert ood.image_check(xray, ImageFacts(640, 427, 40.0), CHECKS) == "colour"
    assert ood.image_check(xray, ImageFacts(3000, 1000, 0.0), CHECKS) == "aspect"
    assert ood.image_check(xray, None, CHECKS) is None


def test_facts_come_from_the_same_decode_as_the_pixels(tmp_path):
    """A colour photo is colourful, an X-ray saved as RGB JPEG is not, and the pixels are the
    grayscale ones load_resized gives."""
    from sklearn.datasets import load_sample_images

    from cxr.data.images import load_resized

    photo = tmp_path / "flower.jpg"
    Image.fromarray(load_sample_images().images[1]).save(photo)
    xray = chest_like(np.random.default_rng(7), 1, 300)[0, :, :, 0]
    rgb = tmp_path / "xray_rgb.jpg"
    Image.fromarray(np.repeat(xray[:, :, None], 3, axis=2)).save(rgb)
    wide = tmp_path / "wide.png"
    Image.fromarray(np.tile(xray, (1, 3))).save(wide)
    for path in (photo, rgb, wide):
        pixels, facts = load_resized_facts(path, 64)
        np.testing.assert_array_equal(pixels, load_resized(path, [64])[64])
    assert load_resized_facts(photo, 64)[1].colourfulness > CHECKS.max_colourfulness
    assert load_resized_facts(rgb, 64)[1].colourfulness < 1
    assert load_resized_facts(wide, 64)[1].aspect == pytest.approx(3)


def test_every_synthetic_family_is_built_and_seeded():
    a, b = (
        ood_families.synthetic_families(np.random.default_rng(8), 6),
        ood_families.synthetic_families(np.random.default_rng(8), 6),
    )
    assert set(a) == {"constant", "near_constant", "noise", "photos", "photos_gray", "oct"}
    for name, images in a.items():
        assert len(images) == 6 and all(img.dtype == np.uint8 for img in images), name
        assert all(np.array_equal(x, y) for x, y in zip(images, b[name])), name
    assert a["constant"][0].max() == 0 and a["constant"][1].min() == 255
    x = chest_like(np.random.default_rng(9), 3, 48)
    fam = ood_families.xray_families(x)
    assert set(fam) == {"rotated_90", "rotated_180", "inverted", "corner_crop"}
    np.testing.assert_array_equal(fam["rotated_180"][0], x[0, ::-1, ::-1, 0])
    assert fam["corner_crop"][0].shape == (12, 12)


def test_penultimate_features_are_the_input_of_the_last_dense_through_a_nested_head():
    import keras
    from keras import layers

    inputs = keras.Input((16, 16, 1))
    extractor = keras.Model(inputs, layers.Flatten()(layers.Conv2D(2, 3)(inputs)))
    head_in = keras.Input((392,))
    head = keras.Model(head_in, layers.Dense(1, activation="sigmoid")(layers.Dense(7, activation="relu")(head_in)))
    composed = keras.Model(extractor.input, head(extractor.output))
    assert tuple(ood.penultimate(composed).outputs[0].shape) == (None, 7)
    plain = keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            layers.Flatten(),
            layers.Dense(5),
            layers.Dropout(0.2),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    assert tuple(ood.penultimate(plain).outputs[0].shape) == (None, 5)


def test_view_negatives_are_each_image_transformed_once():
    x = chest_like(np.random.default_rng(5), 70)
    neg = ood.view_negatives(x, np.random.default_rng(6))
    assert neg.shape == x.shape and neg.dtype == np.uint8
    assert not any(np.array_equal(a, b) for a, b in zip(x, neg))  # every copy is changed
    again = ood.view_negatives(x, np.random.default_rng(6))
    assert np.array_equal(neg, again)  # seeded
    assert ood.view_negatives(x[:0], np.random.default_rng(6)).shape == (0, 32, 32, 1)


def _upright(rng: np.random.Generator, n: int) -> np.ndarray:
    """chest_like with a bright abdomen below the lungs: a film with a top and a bottom."""
    x = chest_like(rng, n).astype(np.float64)
    x[:, 26:, :, :] += 60
    return np.clip(x, 0, 255).astype(np.uint8)


def test_view_check_tells_upright_films_from_rotated_flipped_inverted_and_cropped():
    rng = np.random.default_rng(7)
    view = ood.ViewCheck.fit(_upright(rng, 300), rng)
    fresh = _upright(rng, 100)
    cut = np.quantile(view.logit(ood.thumbnails(fresh)), 0.99)
    corner = np.stack(
        [np.asarray(Image.fromarray(i[:8, :8, 0]).resize((32, 32), Image.Resampling.BILINEAR)) for i in fresh]
    )[..., None]
    for name, wrong in {
        "upside down": np.rot90(fresh, 2, axes=(1, 2)),
        "inverted": 255 - fresh,
        "corner": corner,
    }.items():
        assert np.mean(view.logit(ood.thumbnails(wrong)) > cut) >= 0.95, name


def test_view_check_on_real_xrays_flags_the_transformed_families_not_the_test_films(tmp_path, require_shared):
    """Fitted on 1,200 real official-train X-rays (64 px), thresholded at 99.7% of 300 others;
    the official test films and transforms of them (the ood stage's xray families)."""
    require_shared(ZIP_224)

    def load(prefix: str, n: int) -> np.ndarray:
        with zipfile.ZipFile(ZIP_224) as zf:
            names = sorted(m for m in zf.namelist() if f"/{prefix}/" in m and m.lower().endswith(".jpeg"))
            picked = [names[i] for i in np.random.default_rng(0).choice(len(names), n, replace=False)]
            out = []
            for name in picked:
                path = tmp_path / "x.jpeg"
                path.write_bytes(zf.read(name))
                out.append(load_resized_facts(path, 64)[0])
        return np.stack(out)

    train, test = load("train", 1500), load("test", 300)
    view = ood.ViewCheck.fit(train[:1200], np.random.default_rng(0))
    cut = np.quantile(view.logit(ood.thumbnails(train[1200:])), 0.997)
    assert np.mean(view.logit(ood.thumbnails(test)) > cut) <= 0.02
    for family, images in ood_families.xray_families(test).items():
        resized = np.stack(
            [np.asarray(Image.fromarray(i).resize((64, 64), Image.Resampling.BILINEAR)) for i in images]
        )[..., None]
        assert np.mean(view.logit(ood.thumbnails(resized)) > cut) >= 0.9, family


def test_image_checks_pass_every_real_xray(tmp_path, require_shared):
    """No real X-ray of the 224-px archive (RGB-stored JPEGs among them) fails a cheap check."""
    require_shared(ZIP_224)
    flagged = []
    with zipfile.ZipFile(ZIP_224) as zf:
        names = [n for n in zf.namelist() if n.lower().endswith(".jpeg")]
        for name in names:
            path = tmp_path / "x.jpeg"
            path.write_bytes(zf.read(name))
            pixels, facts = load_resized_facts(path, 96)
            if ood.image_check(pixels, facts, CHECKS) is not None:
                flagged.append(name)
    assert len(names) > 5000 and flagged == []


@pytest.mark.slow
def test_tiny_pipeline_gate_labels_what_is_not_an_xray(tiny_pipeline, tmp_path):
    from sklearn.datasets import load_sample_images

    work = tiny_pipeline.origin
    metrics = json.loads((work / "metrics" / "cnn_baseline_ood.json").read_text())
    assert set(metrics["families"]) >= {
        "constant",
        "near_constant",
        "noise",
        "photos",
        "oct",
        "rotated_90",
        "rotated_180",
        "inverted",
        "corner_crop",
    }
    assert metrics["families"]["constant"]["flag_rate"] == 1.0 and metrics["families"]["photos"]["flag_rate"] == 1.0
    n_val, band = metrics["n_val"], metrics["refer_band"]
    # The threshold is a validation score itself (a quantile, method "higher"), so at least
    # keep_val of validation is in: every image of the tiny one, where one out is already 1/n_val > 1%.
    assert metrics["val_in_distribution"] >= metrics["keep_val"]
    # The narrowest band leaving ceil(coverage n) images answered: its edge is one image's margin,
    # which float rounding puts on either side of the edge, so one fewer may be answered. A model
    # giving every image one probability answers them all (a band of width 0).
    answered = round(band["val_coverage"] * n_val)
    wanted = math.ceil(band["target_coverage"] * n_val)
    assert wanted - 1 <= answered <= wanted < n_val, (answered, wanted, n_val)
    assert (work / "models" / "cnn_baseline.ood.npz").is_file() and (
        work / "plots" / "cnn_baseline" / "risk_coverage.csv"
    ).is_file()
    black, photo = tmp_path / "black.png", tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(black)
    Image.fromarray(load_sample_images().images[0]).save(photo)
    cxr = str(Path(sys.executable).with_name("cxr"))
    done = sh(work, cxr, "predict", str(black), str(photo), "--model", "models/cnn_baseline.keras", "--format", "json")
    rows = json.loads(done.stdout)
    assert [r["label"] for r in rows] == [OUT_OF_DISTRIBUTION] * 2 and all(
        r["ood"] and r["probability"] is not None for r in rows
    )
    assert (rows[0]["ood_detector"], rows[1]["ood_detector"]) == ("blank", "colour")
    assert rows[0]["ood_reason"] == ood.OOD_REASONS["blank"] and "colour" in rows[1]["ood_reason"]
    assert all(math.isfinite(r["ood_score"]) and r["refer_low"] <= r["threshold"] <= r["refer_high"] for r in rows)
    assert "warning: 2 of 2" in done.stderr
    strict = sh(work, cxr, "predict", str(black), "--model", "models/cnn_baseline.keras", "--strict", check=False)
    assert strict.returncode == 1 and "OUT_OF_DISTRIBUTION" in strict.stdout and "error: 1 of 1" in strict.stderr


@pytest.mark.parametrize(("folds", "grouped"), [([0, 1, 2, 0, 1, 2], True), ([-1] * 6, False), ([0] * 6, False)])
def test_the_ood_stage_reads_the_folds_of_the_cache_it_wrote(tmp_path, folds, grouped):
    import importlib.util

    import pandas as pd

    from cxr.data.cache import load_split, write_split

    spec = importlib.util.spec_from_file_location("ood_stage", ROOT / "stages" / "ood.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    rows = pd.DataFrame({"path": [f"f{i}.png" for i in range(6)], "label": ["NORMAL", "PNEUMONIA"] * 3, "fold": folds})
    write_split(tmp_path, "train", chest_like(np.random.default_rng(0), 6), rows)
    got = stage.train_groups(load_split(tmp_path, "train"))  # the CSV comes back as text
    assert (got is not None) == grouped
    if grouped:
        assert got.tolist() == folds
