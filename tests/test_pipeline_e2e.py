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


def ran(output: str | object) -> set[str]:
    """The stages a `dvc repro` ran, from its output (text, or the CompletedProcess of `sh`)."""
    if not isinstance(output, str):
        output = output.stdout + output.stderr
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
    default, screened = list(params["pipeline"]["default"]), list(params["pipeline"]["screened"])
    per_variant = ("train", "evaluate", "ood", "export")
    expected = {"fetch", "split", "preprocess", "report", "site_curve"} | {
        f"{s}@{v}" for s in per_variant for v in default
    }
    # the opt-in pipeline's stages, named by DVC after their file
    opt_in = {f"{s}@{v}" for s in per_variant for v in screened} | {"report_all", "blend"}
    opt_in |= {f"train_fold@{v}-{k}" for v in cv["variants"] for k in cv["folds"]}
    opt_in |= {f"{s}@{v}" for s in ("ensemble", "evaluate_cv", "ood_cv", "export_cv") for v in cv["variants"]}
    expected |= {f"screened/dvc.yaml:{name}" for name in opt_in}
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
    # the default report compares the default pipeline's models; report_all every model, by the same rule
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert summary["best"] in set(default) and summary["select_by"] == params["report"]["select_by"]
    assert set(summary["variants"]) == set(default)
    every = json.loads((work / "metrics/all/summary.json").read_text())
    assert set(every["variants"]) == set(variants) | {f"{v}_cv" for v in cv["variants"]}
    assert every["select_by"] == summary["select_by"] and every["best"] in every["variants"]
    assert (work / "plots/report.html").exists() and (work / "plots/all/report.html").exists()
    # the blend: its members' figures, recomputed from their own caches, are the ones train wrote
    blend = json.loads((work / "metrics/blend.json").read_text())
    assert blend["members"] == params["blend"]["members"] and blend["n_test"] == 20
    for name, figures in blend["member_figures"].items():
        stress = json.loads((work / f"metrics/{name}_stress.json").read_text())
        assert figures["stress_roc_auc"] == pytest.approx(stress["mean"]["roc_auc"], abs=1e-6), name
    assert blend["selection"]["picked"] in ("blend", params["report"]["incumbent"])
    assert blend["selection"]["scores"]["blend"] == pytest.approx(blend["stress"]["mean"]["roc_auc"])


def test_the_default_pipeline_alone_builds_the_headline_from_nothing(tiny_pipeline, tmp_path):
    """`make repro` on a fresh clone (no DVC cache, no outputs): only the default pipeline's stages run,
    and they give the headline model the full run gave."""
    work = tiny_pipeline.clone(tmp_path / "clone", checkout=False)
    done = sh(work, DVC, "repro", "--no-run-cache", timeout=2400)
    stages = ran(done)
    assert stages and not any(s.startswith("screened/") for s in stages), stages
    params = yaml.safe_load((work / "params.yaml").read_text())
    assert {s.partition("@")[2] for s in stages if s.startswith("train@")} == set(params["pipeline"]["default"])
    fresh, full = (json.loads((w / "metrics/summary.json").read_text()) for w in (work, tiny_pipeline.origin))
    assert fresh["best"] == full["best"]
    for name, row in full["variants"].items():  # all but the wall-clock training time
        assert {k: v for k, v in fresh["variants"][name].items() if k != "train_seconds"} == {
            k: v for k, v in row.items() if k != "train_seconds"
        }, name


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
