"""Fixtures for the model and training tests: tiny params and tiny in-memory caches."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from cxr.core import params as cxr_params
from cxr.data.cache import CachedSplit, labels_of

ROOT = Path(__file__).resolve().parents[2]
SHARED_KERAS = ROOT.parent / "shared" / "keras"
SIZE = 48  # the smallest size every builder (the 4-block cnn included) accepts, rounded up


def tiny_raw_params(size: int = SIZE, epochs: int = 1, batch_size: int = 4) -> dict[str, Any]:
    """The repository's params.yaml shrunk for tests: one size, few epochs, no ImageNet download."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    raw["transfer"].update(backbone="mobilenet_v2", alpha=0.35, weights="none")
    raw["train"].update(patience=2, use_seed_epochs=False, distribute="none", mixed_precision=False)
    raw["variants"]["modern"] = {
        "model": "modern",
        "image_size": size,
        "init_from": "cxr/model/architectures.py",
        "shared": "transfer",
        "optimizer": "adamw",
        "learning_rate": 1e-3,
        "batch_size": batch_size,
        "epochs": epochs,
        "augment": True,
        "alpha": 0.35,
        "trainable_from": "block_15_expand",
        "dropout": 0.2,
        "label_smoothing": 0.05,
    }
    for variant in raw["variants"].values():
        # params.yaml refuses a cnn below 46 px; tests of other models may go smaller
        cnn_size = max(size, SIZE) if variant["model"] == "cnn" else size
        variant.update(image_size=cnn_size, epochs=epochs, batch_size=batch_size)
    return raw


def tiny_params(size: int = SIZE, epochs: int = 1, batch_size: int = 4, **transfer: Any) -> cxr_params.Params:
    raw = tiny_raw_params(size, epochs, batch_size)
    raw["transfer"].update(transfer)
    return cxr_params.parse(raw)


def tiny_split(n: int = 8, size: int = SIZE, seed: int = 0) -> CachedSplit:
    """n images, half pneumonia (a bright blurred blob), half normal (bands + noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    x = np.empty((n, size, size, 1), np.uint8)
    labels = []
    for i in range(n):
        img = 60 + 40 * np.sin(yy * 12) ** 2 + rng.normal(0, 10, (size, size))
        positive = i % 2 == 1
        if positive:
            cy, cx = rng.uniform(0.3, 0.7, 2)
            img += 120 * np.exp(-(((yy - cy) / 0.18) ** 2 + ((xx - cx) / 0.18) ** 2))
        x[i, :, :, 0] = np.clip(img, 0, 255).astype(np.uint8)
        labels.append("PNEUMONIA" if positive else "NORMAL")
    rows = pd.DataFrame(
        {
            "path": [f"data/raw/chest_xray/train/{lab}/img{seed}_{i}.jpeg" for i, lab in enumerate(labels)],
            "label": labels,
            "subtype": ["bacteria" if lab == "PNEUMONIA" else "normal" for lab in labels],
            "patient_id": [f"p{seed}_{i}" for i in range(n)],
            "split": "train",
            "sha256": [f"{seed:04d}{i:060d}" for i in range(n)],
        }
    )
    return CachedSplit(x=x, y=labels_of(rows), rows=rows)


@pytest.fixture
def params() -> cxr_params.Params:
    return tiny_params()


@pytest.fixture(scope="session")
def splits() -> tuple[CachedSplit, CachedSplit]:
    return tiny_split(8, seed=1), tiny_split(6, seed=2)
