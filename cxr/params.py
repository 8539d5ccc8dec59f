"""Load and validate params.yaml once, with clear errors, into typed settings.

    python -m cxr.params            # validate params.yaml and print the resolved settings

Every stage calls `load()` before doing any work, so a bad value stops the pipeline at once
with a message naming the key.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxr.errors import CxrError, run_main

PARAMS_FILE = Path("params.yaml")

MODELS = ("dense", "cnn", "transfer_features", "transfer_frozen", "transfer_finetuned", "modern")
BACKBONES = ("vgg19", "vgg16", "mobilenet_v2", "mobilenet", "densenet121")
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw")
SPLIT_STRATEGIES = ("patient_grouped", "seed")
RESIZE_MODES = ("squash", "pad")
DISTRIBUTE = ("auto", "none", "mirrored", "multi_worker")
# The seed's CNN pools four times after 3×3 convolutions: below 46 px nothing is left.
MIN_MODEL_SIZE = {"cnn": 46}
# Knobs a builder reads beyond the common variant keys (see cxr/models.py).
MODEL_EXTRAS = {
    "modern": {"alpha", "dropout", "trainable_from", "weight_decay", "label_smoothing", "augment_strength", "warmup_fraction"},
}
# Smallest input each backbone accepts without pooling to nothing (Keras's own checks).
MIN_BACKBONE_SIZE = {"vgg19": 32, "vgg16": 32, "mobilenet_v2": 32, "mobilenet": 32, "densenet121": 32}


@dataclass(frozen=True)
class FetchParams:
    source: str
    max_uncompressed_mb: int = 4096
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SplitParams:
    strategy: str = "patient_grouped"
    val_fraction: float = 0.1
    folds: int = 5  # cross-validation folds of the official train set; 0 = none


@dataclass(frozen=True)
class PreprocessParams:
    resize: str = "squash"
    workers: int = 2


@dataclass(frozen=True)
class TrainParams:
    patience: int = 4
    threshold_rule: str = "youden"
    use_seed_epochs: bool = False
    distribute: str = "auto"
    mixed_precision: bool = False


@dataclass(frozen=True)
class TransferParams:
    backbone: str = "mobilenet_v2"
    alpha: float = 0.35
    weights: str = "imagenet"


@dataclass(frozen=True)
class VariantParams:
    name: str
    model: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    init_from: str = "cxr/models.py"
    shared: str = "base"
    seed_epochs: int | None = None
    augment: bool = False
    # Free-form extras for a variant's builder (e.g. the modern variant's schedule).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def starts_from_model(self) -> bool:
        return self.init_from.endswith(".keras")

    def effective_epochs(self, train: TrainParams) -> int:
        if train.use_seed_epochs and self.seed_epochs:
            return self.seed_epochs
        return self.epochs


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap_samples: int = 1000
    calibration_bins: int = 10


@dataclass(frozen=True)
class ReportParams:
    gradcam_per_outcome: int = 3


@dataclass(frozen=True)
class Params:
    seed: int
    fetch: FetchParams
    split: SplitParams
    preprocess: PreprocessParams
    train: TrainParams
    transfer: TransferParams
    variants: dict[str, VariantParams]
    evaluate: EvaluateParams
    report: ReportParams

    def variant(self, name: str) -> VariantParams:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants))
            raise CxrError(f"unknown variant '{name}' in params.yaml variants; known: {known}")
        return self.variants[name]

    @property
    def image_sizes(self) -> list[int]:
        """Every input size some variant needs: preprocess caches exactly these."""
        return sorted({v.image_size for v in self.variants.values()})


def _section(raw: dict[str, Any], name: str, required: bool = True) -> dict[str, Any]:
    if name not in raw or raw[name] is None:
        if required:
            raise CxrError(f"params.yaml has no '{name}' section; add it (see README, 'Parameters')")
        return {}
    value = raw[name]
    if not isinstance(value, dict):
        raise CxrError(f"params.yaml '{name}' must be a mapping, got {type(value).__name__}")
    return value


def _build(cls: type, section: str, values: dict[str, Any], **fixed: Any) -> Any:
    known = set(cls.__dataclass_fields__) - set(fixed)
    unknown = set(values) - known
    if unknown:
        raise CxrError(f"params.yaml {section}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values, **fixed)
    except TypeError as exc:  # a required key is missing
        missing = [f for f in known if f not in values and cls.__dataclass_fields__[f].default is cls.__dataclass_fields__[f].default_factory]
        raise CxrError(f"params.yaml {section}: missing key(s) {', '.join(sorted(missing)) or exc}") from None


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise CxrError(f"params.yaml {key}: {message}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")


def _positive_int(value: Any, key: str) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, key, f"must be a positive integer, got {value!r}")


def parse(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml) into `Params`."""
    if not isinstance(raw, dict):
        raise CxrError("params.yaml must be a mapping of sections (base, fetch, split, ...)")
    base = _section(raw, "base")
    seed = base.get("seed")
    _check(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0, "base.seed", f"must be a non-negative integer, got {seed!r}")

    fetch = _build(FetchParams, "fetch", _section(raw, "fetch"))
    _check(isinstance(fetch.source, str) and fetch.source.strip() != "", "fetch.source", "must name a URL, zip file or folder")
    _check(fetch.max_uncompressed_mb > 0, "fetch.max_uncompressed_mb", "must be positive")

    split = _build(SplitParams, "split", _section(raw, "split"))
    _choice(split.strategy, "split.strategy", SPLIT_STRATEGIES)
    _check(isinstance(split.val_fraction, (int, float)) and 0 < split.val_fraction < 1, "split.val_fraction", f"must be between 0 and 1 (exclusive), got {split.val_fraction!r}")
    _check(isinstance(split.folds, int) and not isinstance(split.folds, bool) and (split.folds == 0 or split.folds >= 2), "split.folds", f"must be 0 (no folds) or an integer of at least 2, got {split.folds!r}")

    pre = _build(PreprocessParams, "preprocess", _section(raw, "preprocess"))
    _choice(pre.resize, "preprocess.resize", RESIZE_MODES)
    _positive_int(pre.workers, "preprocess.workers")

    train = _build(TrainParams, "train", _section(raw, "train"))
    _positive_int(train.patience, "train.patience")
    _choice(train.threshold_rule, "train.threshold_rule", ("youden",))
    _choice(train.distribute, "train.distribute", DISTRIBUTE)

    transfer = _build(TransferParams, "transfer", _section(raw, "transfer"))
    _choice(transfer.backbone, "transfer.backbone", BACKBONES)
    _check(isinstance(transfer.alpha, (int, float)) and transfer.alpha > 0, "transfer.alpha", "must be positive")
    _check(isinstance(transfer.weights, str) and transfer.weights != "", "transfer.weights", "must be imagenet, none or a path to an .h5 file")

    variants_raw = _section(raw, "variants")
    _check(len(variants_raw) > 0, "variants", "must define at least one variant")
    fields = set(VariantParams.__dataclass_fields__) - {"name", "extra"}
    variants: dict[str, VariantParams] = {}
    for name, values in variants_raw.items():
        key = f"variants.{name}"
        _check(isinstance(values, dict), key, "must be a mapping")
        known = {k: v for k, v in values.items() if k in fields}
        extra = {k: v for k, v in values.items() if k not in fields}
        allowed = MODEL_EXTRAS.get(values.get("model"), set())
        if set(extra) - allowed:
            raise CxrError(f"params.yaml {key}: unknown key(s) {', '.join(sorted(set(extra) - allowed))}; known: {', '.join(sorted(fields | allowed))}")
        v = _build(VariantParams, key, known, name=name, extra=extra)
        _choice(v.model, f"{key}.model", MODELS)
        _positive_int(v.image_size, f"{key}.image_size")
        _positive_int(v.epochs, f"{key}.epochs")
        if v.seed_epochs is not None:
            _positive_int(v.seed_epochs, f"{key}.seed_epochs")
        _positive_int(v.batch_size, f"{key}.batch_size")
        _choice(v.optimizer, f"{key}.optimizer", OPTIMIZERS)
        _check(isinstance(v.learning_rate, (int, float)) and v.learning_rate > 0, f"{key}.learning_rate", f"must be positive, got {v.learning_rate!r}")
        _check(v.shared in raw, f"{key}.shared", f"names no params section '{v.shared}'")
        if v.image_size < MIN_MODEL_SIZE.get(v.model, 1):
            _check(False, f"{key}.image_size", f"{v.image_size} px is too small for model {v.model}; use at least {MIN_MODEL_SIZE[v.model]}")
        if v.model.startswith("transfer") or v.model == "modern":
            minimum = MIN_BACKBONE_SIZE[transfer.backbone]
            _check(v.image_size >= minimum, f"{key}.image_size", f"{v.image_size} px is too small for backbone {transfer.backbone}; use at least {minimum}")
        if v.model == "transfer_finetuned":
            _check(v.starts_from_model, f"{key}.init_from", "must name the trained transfer_frozen model (models/<name>.keras)")
        variants[name] = v

    evaluate = _build(EvaluateParams, "evaluate", _section(raw, "evaluate"))
    _positive_int(evaluate.bootstrap_samples, "evaluate.bootstrap_samples")
    _positive_int(evaluate.calibration_bins, "evaluate.calibration_bins")
    report = _build(ReportParams, "report", _section(raw, "report", required=False))
    return Params(seed, fetch, split, pre, train, transfer, variants, evaluate, report)


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise CxrError(f"{path} not found; run from the project root (where dvc.yaml is)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CxrError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    return parse(raw)


def main() -> int:
    params = load(sys.argv[1] if len(sys.argv) > 1 else PARAMS_FILE)
    print(yaml.safe_dump(asdict(params), sort_keys=False))
    return 0


if __name__ == "__main__":
    run_main(main)
