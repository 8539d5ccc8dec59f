"""Shared fixtures: the synthetic builders live in tests/synth.py."""

from __future__ import annotations

import os
import sys
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
