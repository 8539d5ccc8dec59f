"""End to end: `dvc repro` on a tiny synthetic archive in a temporary git repository.

Checks what a user relies on: every stage runs, a no-op repro reruns nothing, changing one
variant's parameter reruns only that variant's train/evaluate (and report), and
`dvc metrics diff` shows the change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit.pipeline import DVC, sh

pytestmark = pytest.mark.slow


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def probabilities(work: Path, name: str) -> dict[str, np.ndarray]:
    """The model's probabilities for the validation and test images (the preprocessed caches)."""
    from cxr.data.cache import load_split
    from cxr.model.forward import predict_arrays
    from cxr.serving.inference import load_model

    loaded = load_model(work / "models" / f"{name}.keras", with_gate=False)
    cache = work / "data" / "processed" / str(loaded.image_size)
    return {split: predict_arrays(loaded.model, load_split(cache, split).x) for split in ("val", "test")}


def test_every_stage_runs_and_writes_its_outputs(tiny_pipeline):
    work = tiny_pipeline.origin
    params = yaml.safe_load((work / "params.yaml").read_text())
    variants, cv = list(params["variants"]), params["cv"]
    expected = {"fetch", "split", "preprocess", "report", "site_curve"} | {
        f"{s}@{v}" for s in ("train", "evaluate", "ood", "export") for v in variants
    }
    expected |= {f"train_fold@{v}-{k}" for v in cv["variants"] for k in cv["folds"]}
    expected |= {f"{s}@{v}" for s in ("ensemble", "evaluate_cv", "ood_cv", "export_cv") for v in cv["variants"]}
    assert ran(tiny_pipeline.first_run) == expected
    for v in variants + [f"{v}_cv" for v in cv["variants"]]:
        export = json.loads((work / f"metrics/{v}_export.json").read_text())
        assert export["tolerance"] == params["export"]["tolerance"], v
        assert export["max_abs_probability_diff"] <= export["tolerance"], v
        # Float kernels differ between CPUs: a probability within the tolerance of the threshold
        # may fall on either side of it. Every class flip must be one of those, as the stage judges.
        flips = round((1 - export["class_agreement"]) * export["n_images"])
        assert flips == export["borderline_class_flips"], (v, export)
        for split, p in probabilities(work, v).items():
            assert np.std(p) > 1e-4, f"{v} gives one probability for every {split} image: {p[:3]}"
        assert (work / f"models/{v}.tflite").is_file() and json.loads((work / f"models/{v}.tflite.json").read_text())[
            "format"
        ] == "litert"
        metrics = json.loads((work / f"metrics/{v}.json").read_text())
        assert 0 <= metrics["roc_auc"] <= 1 and metrics["n_test"] == 20
        assert (work / f"models/{v}.keras").exists()
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert summary["best"] in set(summary["variants"]) and summary["select_by"] == params["report"]["select_by"]
    assert set(summary["variants"]) == set(variants) | {f"{v}_cv" for v in cv["variants"]}
    assert (work / "plots/report.html").exists()


def test_noop_repro_reruns_nothing(tiny_pipeline, tmp_path):
    work = tiny_pipeline.clone(tmp_path / "clone")
    done = sh(work, DVC, "repro")
    assert ran(done.stdout + done.stderr) == set()


def test_one_variant_param_reruns_only_that_variant(tiny_pipeline, tmp_path):
    work = tiny_pipeline.clone(tmp_path / "clone")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["variants"]["cnn_baseline"]["epochs"] = 3
    params["variants"]["cnn_baseline"]["learning_rate"] = 0.001
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = sh(work, DVC, "repro")
    assert ran(done.stdout + done.stderr) == {
        "train@cnn_baseline",
        "evaluate@cnn_baseline",
        "ood@cnn_baseline",
        "export@cnn_baseline",
        "report",
        "site_curve",  # reads the headline model's test predictions, through metrics/summary.json
    }
    diff = json.loads(sh(work, DVC, "metrics", "diff", "--json").stdout)
    assert diff.get("metrics/cnn_baseline.json"), diff
    assert "metrics/cnn_augmented.json" not in diff
