"""Shared fixtures: the synthetic builders live in tests/synth.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# ImageNet weights for the small MobileNets, offline (see ../shared/README.md).
if (ROOT.parent / "shared" / "keras" / "models").is_dir():
    os.environ.setdefault("KERAS_HOME", str(ROOT.parent / "shared" / "keras"))


@pytest.fixture
def project_root() -> Path:
    return ROOT


# --- a tiny real pipeline, run once per test session -------------------------------------

def sh(cwd: Path, *args: str, timeout: int = 900, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command in `cwd` with the venv's tools first on PATH; fail the test on error."""
    full_env = {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                "DVC_NO_ANALYTICS": "1", **(env or {})}
    done = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


DVC = str(Path(sys.executable).with_name("dvc"))


def tiny_params(source: Path) -> dict:
    """params.yaml shrunk so that the whole pipeline runs in about a minute."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["source"] = str(source)
    params["split"]["val_fraction"] = 0.3
    params["transfer"]["weights"] = "none"  # nothing to download in a test
    params["evaluate"]["bootstrap_samples"] = 50
    params["report"]["gradcam_per_outcome"] = 1
    for v in params["variants"].values():
        v["image_size"] = 48  # the seed's CNN needs ≥ 46 px for its four poolings
        v["epochs"] = 1
        v["batch_size"] = 8
    return params


@dataclass
class TinyPipeline:
    """A committed git+DVC repo on which `dvc repro` has run once. Do not modify it: clone it
    with `clone()` (the clone shares its DVC cache)."""

    origin: Path
    first_run: str

    def clone(self, dest: Path, checkout: bool = True) -> Path:
        sh(dest.parent, "git", "clone", "-q", str(self.origin), str(dest))
        if checkout:
            sh(dest, DVC, "cache", "dir", str(self.origin / ".dvc" / "cache"))
            sh(dest, DVC, "checkout", "-q")
        return dest


def build_tiny_pipeline(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """A git+DVC copy of the project with tiny params and a synthetic archive, after one
    `dvc repro`, committed. Used by the tiny_pipeline fixture and bench/bench_repro.py."""
    import yaml
    from synth import Counts, make_archive

    archive = make_archive(folder / "archive.zip", counts={"train": Counts(normal=8, bacteria=6, virus=5), "test": Counts(normal=4, bacteria=3, virus=3)})
    work = folder / "origin"
    work.mkdir()
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, work / name)
    for sub in ("cxr", "stages"):
        shutil.copytree(ROOT / sub, work / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(archive), sort_keys=False))
    sh(work, "git", "init", "-q", "-b", "main")
    sh(work, DVC, "init", "-q")
    sh(work, DVC, "config", "core.analytics", "false")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "tiny project")
    first = sh(work, DVC, "repro")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "first run")
    return work, first


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    work, first = build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
    return TinyPipeline(work, first.stdout + first.stderr)
