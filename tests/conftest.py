"""Shared fixtures; the synthetic data, loopback servers and tiny-pipeline builder they use live in
testkit/ (the benchmarks use them too)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit.pipeline import DVC, ROOT, build_tiny_pipeline, sh

# Read-only inputs beside the checkout (see ../shared/README.md): data/chest_xray_224.zip,
# data/raw_sample (full-resolution originals), keras/models (offline ImageNet weights).
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if (SHARED / "keras" / "models").is_dir():
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))


def require_shared(path: Path) -> Path:
    """`path` (under ../shared) when it exists. Otherwise the test fails in CI, where ../shared is
    always mounted, so a lost mount cannot pass as a green run of skips; elsewhere it is skipped."""
    if path.exists():
        return path
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{path} is missing: CI must mount ../shared (see ../shared/README.md)", pytrace=False)
    pytest.skip(f"{path} is missing (../shared is not mounted here; see ../shared/README.md)")


@pytest.fixture(name="require_shared", scope="session")
def require_shared_fixture():
    """`require_shared(path)` for the tests that read ../shared (see the function above)."""
    return require_shared


@pytest.fixture
def project_root() -> Path:
    return ROOT


# --- a tiny real pipeline, run once per test session -------------------------------------


@dataclass
class TinyPipeline:
    """A committed git+DVC repo on which `dvc repro` has run once. Do not modify it: clone it
    with `clone()` (the clone shares its DVC cache)."""

    origin: Path
    first_run: str

    @property
    def params_trace(self) -> Path:
        """What each stage of the first run read of params.yaml (cxr.core.params, CXR_PARAMS_TRACE)."""
        return self.origin.parent / "params_trace.tsv"

    def clone(self, dest: Path, checkout: bool = True) -> Path:
        sh(dest.parent, "git", "clone", "-q", str(self.origin), str(dest))
        if checkout:
            sh(dest, DVC, "cache", "dir", str(self.origin / ".dvc" / "cache"))
            sh(dest, DVC, "checkout", "-q")
        return dest


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> TinyPipeline:
    work, first = build_tiny_pipeline(tmp_path_factory.mktemp("pipeline"))
    return TinyPipeline(work, first.stdout + first.stderr)
