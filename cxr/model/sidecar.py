"""`models/<v>.json`: what a trained model needs beside its weights, one typed schema.

    python -m cxr.model.sidecar models/modern.keras     # check and print a model's sidecar

`cxr.model.training` writes it (`Sidecar.write`); evaluation, the report, `cxr predict` and the
benchmarks read it with `read` — nowhere else parses the file. docs/design.md lists the fields.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cxr.core.constants import RESIZE_MODES
from cxr.core.errors import CxrError, run_main
from cxr.core.io import write_json
from cxr.core.paths import sidecar_path as path_for


@dataclass(frozen=True)
class ValSummary:
    """The chosen threshold's figures on the images it was chosen on (validation)."""

    roc_auc: float
    accuracy: float
    sensitivity: float
    specificity: float
    n: int


@dataclass(frozen=True)
class Sidecar:
    """models/<v>.json. `params` holds the variant's own params plus the backbone it really used."""

    variant: str
    model: str
    image_size: int
    resize: str
    threshold: float
    threshold_rule: str
    val: ValSummary
    epochs_run: int
    train_seconds: float
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    # the ImageNet starting weights' provenance (efficientnet_lite.starting_weights); {} for none
    weights: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: Path | str) -> None:
        """Write atomically (whole or absent)."""
        write_json(path, self.to_dict())


def fix_hint(model_path: Path | str) -> str:
    """What to do about a missing or broken model/sidecar pair."""
    path = Path(model_path)
    if path.parent.name == "models":  # a pipeline output: DVC can rebuild or fetch it
        return f"rerun `dvc repro train@{path.stem}` or `dvc pull {path}`"
    return "pass a model written by `dvc repro train@<variant>` (models/<variant>.keras with its .json)"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def from_dict(data: Any, where: str = "sidecar", hint: str = "") -> Sidecar:
    """Check a parsed sidecar and build the dataclass; CxrError naming `where` otherwise."""
    tail = f"; {hint}" if hint else ""
    if not isinstance(data, dict):
        raise CxrError(f"{where}: expected a JSON object{tail}")
    missing = [f.name for f in fields(Sidecar) if f.name not in data and f.name != "weights"]
    if missing:
        raise CxrError(f"{where}: missing key(s) {', '.join(missing)}{tail}")
    size, threshold = data["image_size"], data["threshold"]
    if data["resize"] not in RESIZE_MODES:
        raise CxrError(f"{where}: resize must be one of {', '.join(RESIZE_MODES)}, got {data['resize']!r}{tail}")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise CxrError(f"{where}: image_size must be a positive integer, got {size!r}{tail}")
    if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise CxrError(f"{where}: threshold must be a number in [0, 1], got {threshold!r}{tail}")
    val = data["val"]
    val_keys = [f.name for f in fields(ValSummary)]
    if not isinstance(val, dict) or any(not _is_number(val.get(k)) for k in val_keys):
        raise CxrError(f"{where}: val must hold numbers {', '.join(val_keys)}{tail}")
    weights = data.get("weights", {})
    if not isinstance(weights, dict) or not all(isinstance(v, str) for v in weights.values()):
        raise CxrError(f"{where}: weights must map names to strings, got {weights!r}{tail}")
    known = {f.name for f in fields(Sidecar)}
    values = {k: v for k, v in data.items() if k in known}
    return Sidecar(**(values | {"val": ValSummary(**{k: val[k] for k in val_keys}), "threshold": float(threshold)}))


def read(model_path: Path | str) -> Sidecar:
    """The checked sidecar next to `model_path` (`models/<v>.keras` or the .json itself)."""
    model_path = Path(model_path)
    side = path_for(model_path)
    hint = fix_hint(model_path)
    if not side.is_file():
        raise CxrError(f"{side}: sidecar of {model_path.with_suffix('.keras')} not found; {hint}")
    try:
        data = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise CxrError(f"{side}: not valid JSON ({reason}); {hint}") from None
    return from_dict(data, str(side), hint)


def main() -> int:
    if len(sys.argv) != 2:
        raise ValueError("usage: python -m cxr.model.sidecar models/<variant>.keras")
    print(json.dumps(read(sys.argv[1]).to_dict(), indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
