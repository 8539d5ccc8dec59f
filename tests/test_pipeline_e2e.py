"""End to end: `dvc repro` on a tiny synthetic archive in a temporary git repository.

Checks what a user relies on: every stage runs, a no-op repro reruns nothing, changing one
variant's parameter reruns only that variant's train/evaluate (and report), and
`dvc metrics diff` shows the change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).with_name("dvc"))
pytestmark = pytest.mark.slow


def sh(cwd: Path, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def tiny_params(source: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["source"] = str(source)
    params["split"]["val_fraction"] = 0.3
    params["transfer"]["weights"] = "none"  # nothing to download in a test
    params["evaluate"]["bootstrap_samples"] = 50
    params["report"]["gradcam_per_outcome"] = 1
    for v in params["variants"].values():
        v["image_size"] = 32 if v["model"] != "dense" else 24
        v["epochs"] = 1
        v["batch_size"] = 8
    return params


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from synth import Counts, make_archive

    tmp = tmp_path_factory.mktemp("e2e")
    archive = make_archive(tmp / "archive.zip", counts={"train": Counts(normal=8, bacteria=6, virus=5), "test": Counts(normal=4, bacteria=3, virus=3)})
    work = tmp / "project"
    work.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work / name)
    for folder in ("cxr", "stages"):
        shutil.copytree(ROOT / folder, work / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(archive), sort_keys=False))
    sh(work, "git", "init", "-q")
    sh(work, DVC, "init", "-q")
    sh(work, DVC, "config", "core.analytics", "false")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "tiny project")
    first = sh(work, DVC, "repro")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "first run")
    return work, first


def test_every_stage_runs_and_writes_its_outputs(repo):
    work, first = repo
    variants = list(yaml.safe_load((work / "params.yaml").read_text())["variants"])
    expected = {"fetch", "split", "preprocess", "report"} | {f"{s}@{v}" for s in ("train", "evaluate") for v in variants}
    assert ran(first) == expected
    for v in variants:
        metrics = json.loads((work / f"metrics/{v}.json").read_text())
        assert 0 <= metrics["roc_auc"] <= 1 and metrics["n_test"] == 20
        assert (work / f"models/{v}.keras").exists()
    summary = json.loads((work / "metrics/summary.json").read_text())
    assert summary["best"] in variants and summary["selected_by"] == "validation roc_auc"
    assert (work / "plots/report.html").exists()


def test_noop_repro_reruns_nothing(repo):
    work, _ = repo
    out = sh(work, DVC, "repro")
    assert ran(out) == set()


def test_one_variant_param_reruns_only_that_variant(repo):
    work, _ = repo
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["variants"]["cnn_baseline"]["epochs"] = 3
    params["variants"]["cnn_baseline"]["learning_rate"] = 0.001
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = sh(work, DVC, "repro")
    assert ran(out) == {"train@cnn_baseline", "evaluate@cnn_baseline", "report"}
    diff = sh(work, DVC, "metrics", "diff", "--json")
    changed = json.loads(diff[diff.index("{"):])
    assert "metrics/cnn_baseline.json" in changed and changed["metrics/cnn_baseline.json"]
    assert "metrics/cnn_augmented.json" not in changed
