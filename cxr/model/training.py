"""Train one variant on cached arrays: determinism, class weights, early stopping on validation
AUC, DVCLive logging, and a decision threshold chosen on validation by `train.threshold_rule`.

    python stages/train.py VARIANT      # the DVC stage train@VARIANT; it calls train_variant()

`train_variant` works on in-memory splits and writes nothing but the optional DVCLive folder,
so tests can call it directly; `save_result` writes models/<v>.keras and its sidecar atomically.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.utils.class_weight import compute_class_weight

from cxr.core.errors import CxrError
from cxr.core.io import atomic_path
from cxr.core.params import BACKBONE_MODELS, MODEL_EXTRAS, Params, VariantParams
from cxr.data.cache import CachedSplit
from cxr.evaluation.metrics import binary_metrics, choose_threshold
from cxr.evaluation.stress import stress_probabilities
from cxr.model.architectures import backbone_features, build_model, compose, feature_head, linear_head, pooled_features
from cxr.model.distribute import configure_precision, get_strategy, global_batch_size, shard_by_data
from cxr.model.efficientnet_lite import starting_weights
from cxr.model.forward import forward_arrays, predict_arrays
from cxr.model.robust import reestimate_batchnorm, tta_model
from cxr.model.sidecar import Sidecar, ValSummary


@dataclass
class TrainResult:
    """A trained model, its sidecar (models/<v>.json), the per-epoch history and its probabilities
    on the validation images (in their order), which chose the threshold."""

    model: keras.Model
    meta: Sidecar
    history: dict[str, list[float]] = field(default_factory=dict)
    val_prob: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stress_prob: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # shift → validation probabilities (cxr.evaluation.stress)


def set_determinism(seed: int) -> None:
    """Same seed, same params → the same weights and metrics on CPU."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Balanced weights n / (2 · n_class), so each class contributes equally to the loss."""
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=np.asarray(y))
    return {0: float(weights[0]), 1: float(weights[1])}


def check_inputs(variant: VariantParams, params: Params, train: CachedSplit, val: CachedSplit) -> int:
    """Clear errors for values that would fail deep inside Keras; returns the epoch count."""
    epochs = variant.effective_epochs(params.train)
    if not isinstance(epochs, int) or epochs <= 0:
        key = "seed_epochs" if params.train.use_seed_epochs and variant.seed_epochs else "epochs"
        raise CxrError(f"params.yaml variants.{variant.name}.{key}: must be a positive integer, got {epochs!r}")
    for name, split in (("train", train), ("val", val)):
        if split.x.shape[1:] != (variant.image_size, variant.image_size, 1):
            raise CxrError(
                f"the {name} cache holds {split.x.shape[1:]} images but variants.{variant.name}.image_size is "
                f"{variant.image_size}; rerun `dvc repro preprocess`"
            )
        if set(np.unique(split.y).tolist()) != {0, 1}:
            raise CxrError(
                f"the {name} split needs both NORMAL and PNEUMONIA images (its "
                f"{len(split)} images are not both); check split / preprocess"
            )
    if variant.model == "transfer_features" and variant.augment:
        raise CxrError(
            f"params.yaml variants.{variant.name}.augment: transfer_features computes each image's features once, "
            "so it cannot augment; set augment: false (transfer_frozen augments)"
        )
    if variant.batch_size > len(train):
        raise CxrError(
            f"params.yaml variants.{variant.name}.batch_size: {variant.batch_size} "
            f"is larger than the training set ({len(train)} images); lower it"
        )
    return epochs


class ValidationScores(keras.callbacks.Callback):
    """The one validation pass of each epoch: adds `val_roc_auc` (scikit-learn's exact ROC AUC),
    `val_loss` (cross-entropy) and `val_accuracy` (at 0.5) to the epoch's logs.

    Keras's AUC metric interpolates over 200 fixed thresholds, which is coarse once the
    probabilities crowd near 0 and 1 (a probe read 0.984 where the exact value was 0.998), so
    early stopping and the curves use the exact figure. Keras's own `validation_data` would run
    the validation set through the model a second time each epoch, so fit gets none.
    """

    def __init__(self, x_val: np.ndarray, y_val: np.ndarray):
        super().__init__()
        self.x_val, self.y_val = x_val, y_val

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        prob = predict_arrays(self.model, self.x_val)
        if not np.all(np.isfinite(prob)):
            logs.update(val_roc_auc=0.0, val_loss=float("nan"), val_accuracy=0.0)
            return
        logs["val_roc_auc"] = float(roc_auc_score(self.y_val, prob))
        logs["val_loss"] = float(log_loss(self.y_val, np.clip(prob, 1e-7, 1 - 1e-7), labels=[0, 1]))
        logs["val_accuracy"] = float(np.mean((prob >= 0.5) == self.y_val))


def callbacks(params: Params, live: Any | None) -> list[keras.callbacks.Callback]:
    """Early stopping on exact validation ROC AUC (best weights restored), plus DVCLive if given.
    `fit_arrays` puts ValidationScores in front of these, so they see `val_roc_auc`."""
    out: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            monitor="val_roc_auc", mode="max", patience=params.train.patience, restore_best_weights=True, verbose=1
        )
    ]
    if live is not None:
        from dvclive.keras import DVCLiveCallback

        out.append(DVCLiveCallback(live=live))
    return out


def open_live(live_dir: Path | str | None) -> contextlib.AbstractContextManager[Any]:
    """A DVCLive run writing plots/metrics and metrics.json only: no dvc.yaml, no experiment."""
    if live_dir is None:
        return contextlib.nullcontext(None)
    from dvclive import Live

    return Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)


# At most this many training images (a seeded sample) re-estimate the BatchNorm statistics.
BN_REESTIMATE_IMAGES = 1024


def make_optimizer(variant: VariantParams, steps_per_epoch: int, epochs: int) -> keras.optimizers.Optimizer:
    """The variant's optimizer at its learning_rate. `modern` gets a linear warmup over
    `warmup_fraction` (0.1) of all steps, then cosine decay to 0; adamw uses `weight_decay` (1e-4)."""
    lr: Any = float(variant.learning_rate)
    if variant.model == "modern":
        total = max(1, steps_per_epoch * epochs)
        fraction = variant.option("warmup_fraction")
        warmup = min(total - 1, math.ceil(fraction * total))
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else lr,
            decay_steps=total - warmup,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    name = variant.optimizer
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=lr)
    # adamw (cxr.core.params allows only these four)
    return keras.optimizers.AdamW(
        learning_rate=lr, weight_decay=float(variant.extra.get("weight_decay", MODEL_EXTRAS["modern"]["weight_decay"]))
    )


def compile_model(model: keras.Model, variant: VariantParams, steps_per_epoch: int, epochs: int) -> keras.Model:
    """Binary cross-entropy (optional label_smoothing extra), AUC named "auc", accuracy."""
    smoothing = variant.option("label_smoothing")
    model.compile(
        optimizer=make_optimizer(variant, steps_per_epoch, epochs),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=float(smoothing)),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    return model


def mixup_batches(batches: tf.data.Dataset, alpha: float, seed: int) -> tf.data.Dataset:
    """mixup (Zhang et al. 2018) of (x, y, w) batches: each image, label and class weight blended
    with those of another image of its batch, λ ~ Beta(alpha, alpha) per image; the partner and λ
    depend only on (seed, batch index), so runs repeat exactly."""

    def mix(index: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        x, y, w = batch
        n = tf.shape(y)[0]
        key = tf.stack([tf.constant(seed, tf.int64), index])
        partner = tf.random.experimental.stateless_shuffle(tf.range(n), seed=key)
        g1 = tf.random.stateless_gamma([n], seed=key + 1, alpha=alpha)
        g2 = tf.random.stateless_gamma([n], seed=key + 2, alpha=alpha)
        lam = g1 / (g1 + g2)

        def blend(a: tf.Tensor) -> tf.Tensor:
            weight = tf.reshape(lam, [-1] + [1] * (len(a.shape) - 1))
            return weight * a + (1.0 - weight) * tf.gather(a, partner)

        return blend(x), blend(y), blend(w)

    return batches.enumerate().map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def epoch_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    epochs: int,
    weights: dict[int, float] | None = None,
    mixup: float = 0.0,
) -> tf.data.Dataset:
    """`epochs` × ceil(N / batch_size) float32 training batches, each epoch a permutation that
    depends only on (seed, epoch); batches never span two epochs. With `weights` (class → weight)
    each batch also carries per-image weights, and with `mixup` > 0 images are mixed in pairs
    (`mixup_batches`).

    Not `Dataset.shuffle(reshuffle_each_iteration=True)`: its permutations follow how many
    iterators were opened, and under a tf.distribute strategy Keras opens one more (to build the
    model), which would shift every epoch's order against the same run without a strategy.
    """
    images, labels = tf.constant(np.asarray(x)), tf.constant(np.asarray(y, np.float32))
    n = len(x)

    def epoch_indices(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size)

    if mixup > 0 and weights is None:
        raise ValueError("mixup needs the class weights, to mix them with the labels")
    per_image = (
        None
        if weights is None
        else tf.constant(np.where(np.asarray(y) == 1, weights[1], weights[0]).astype(np.float32))
    )

    def gather(indices: tf.Tensor) -> tuple[tf.Tensor, ...]:
        out = (tf.cast(tf.gather(images, indices), tf.float32), tf.gather(labels, indices))
        return out if per_image is None else (*out, tf.gather(per_image, indices))

    # No .cache(): the arrays are already in memory and gather + cast is cheaper than a copy of
    # float32 pixels (4× the uint8 cache); prefetch overlaps it with the training step.
    batches = (
        tf.data.Dataset.range(epochs)
        .flat_map(epoch_indices)
        .map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    )
    if mixup > 0:
        batches = mixup_batches(batches, float(mixup), seed)
    return batches.prefetch(tf.data.AUTOTUNE)


def fit_arrays(
    model: keras.Model,
    variant: VariantParams,
    params: Params,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    epochs: int,
    cbs: list,
    verbose: int,
) -> keras.callbacks.History:
    """model.fit on seeded, shuffled tf.data batches with balanced class weights; `variant.batch_size`
    images per replica, so each step sees batch_size × replicas (the learning rate is unchanged)."""
    batch = global_batch_size(variant.batch_size, model.distribute_strategy)
    mixup = variant.option("mixup")
    weights = class_weights(y_train)
    # With mixup the class weights are mixed like the labels, so they travel in the batches.
    data = (
        epoch_batches(x_train, y_train, batch, params.seed, epochs, weights, mixup)
        if mixup
        else epoch_batches(x_train, y_train, batch, params.seed, epochs)
    )
    return model.fit(
        shard_by_data(data),
        steps_per_epoch=math.ceil(len(x_train) / batch),
        epochs=epochs,
        class_weight=None if mixup else weights,
        callbacks=[ValidationScores(x_val, y_val), *cbs],
        verbose=verbose,
        shuffle=False,  # the dataset already shuffles, seeded
    )


Fitted = tuple[keras.Model, keras.callbacks.History, np.ndarray]


def fit_end_to_end(
    variant: VariantParams, params: Params, train: CachedSplit, val: CachedSplit, epochs: int, cbs: list, verbose: int
) -> Fitted:
    """Build, compile and fit a whole model on the images; returns (model, history, val_prob)."""
    strategy = get_strategy(params.train.distribute)
    steps = math.ceil(len(train) / global_batch_size(variant.batch_size, strategy))
    with strategy.scope():
        model = build_model(variant, params)
        if variant.option("bn_reestimate"):
            sample = np.random.default_rng(params.seed).permutation(len(train))[:BN_REESTIMATE_IMAGES]
            reestimate_batchnorm(model, train.x[np.sort(sample)])
        model = compile_model(model, variant, steps, epochs)
    history = fit_arrays(model, variant, params, train.x, train.y, val.x, val.y, epochs, cbs, verbose)
    return model, history, predict_arrays(model, val.x)


def fit_on_features(
    variant: VariantParams, params: Params, train: CachedSplit, val: CachedSplit, epochs: int, cbs: list, verbose: int
) -> Fitted:
    """The seed's two-step transfer: backbone features computed once, a head fitted on them, then
    one composed model pixels → backbone → head; returns (model, history, val_prob)."""
    strategy = get_strategy(params.train.distribute)
    steps = math.ceil(len(train) / global_batch_size(variant.batch_size, strategy))
    with strategy.scope():
        extractor = backbone_features(variant, params.transfer)
        head = compile_model(feature_head(extractor.output.shape[-1]), variant, steps, epochs)
    # each image's backbone features once; the head then trains on them
    f_train, f_val = forward_arrays(extractor, train.x), forward_arrays(extractor, val.x)
    history = fit_arrays(head, variant, params, f_train, train.y, f_val, val.y, epochs, cbs, verbose)
    model = compose(extractor, head, variant.name)
    return model, history, predict_arrays(model, val.x)


def fit_linear_probe(variant: VariantParams, params: Params, train: CachedSplit, val: CachedSplit, live: Any) -> Fitted:
    """MedMNIST+'s linear probe: the frozen backbone's pooled features once, then an L2-regularised
    logistic regression (balanced class weights, as every variant trains) for each of
    `c_values`, the one with the highest validation ROC AUC kept. Features are standardised on the
    training images; the scaling is folded into the composed model's last Dense unit, so the saved
    model is pixels → backbone → one sigmoid unit like any other. lbfgs has no randomness.
    Returns (model, history with one entry per C, val_prob)."""
    extractor = pooled_features(variant, variant.backbone(params.transfer))
    f_train = forward_arrays(extractor, train.x).astype(np.float64)
    f_val = forward_arrays(extractor, val.x).astype(np.float64)
    mean, scale = f_train.mean(axis=0), f_train.std(axis=0) + 1e-6
    z_train, z_val = (f_train - mean) / scale, (f_val - mean) / scale
    fits, aucs = [], []
    for c in variant.option("c_values"):
        fit = LogisticRegression(C=float(c), class_weight="balanced", max_iter=5000).fit(z_train, train.y)
        fits.append(fit)
        aucs.append(float(roc_auc_score(val.y, fit.decision_function(z_val))))
        if live is not None:
            live.log_metric("val_roc_auc", aucs[-1])
            live.log_metric("log10_C", float(np.log10(c)))
            live.next_step()
    best = fits[int(np.argmax(aucs))]  # the first of equal AUCs: the strongest regularisation
    weights = best.coef_[0] / scale
    head = linear_head(f_train.shape[1])
    head.layers[-1].set_weights(
        [weights[:, None].astype(np.float32), np.array([best.intercept_[0] - weights @ mean], np.float32)]
    )
    model = compose(extractor, head, variant.name)
    history = keras.callbacks.History()
    history.epoch = list(range(len(fits)))
    history.history = {"val_roc_auc": aucs, "C": [float(c) for c in variant.option("c_values")]}
    return model, history, predict_arrays(model, val.x)


def train_variant(
    variant: VariantParams,
    params: Params,
    train: CachedSplit,
    val: CachedSplit,
    live_dir: Path | str | None = None,
    verbose: int = 2,
) -> TrainResult:
    """Train `variant` on the given splits and choose its threshold on `val`.

    Writes only `live_dir` (DVCLive's per-epoch plots and metrics.json) when given.
    """
    epochs = check_inputs(variant, params, train, val)
    get_strategy(params.train.distribute)  # first: a multi-worker strategy must precede other TensorFlow work
    keras.backend.clear_session()
    set_determinism(params.seed)
    configure_precision(params.train.mixed_precision)
    fit = fit_on_features if variant.model == "transfer_features" else fit_end_to_end
    with open_live(live_dir) as live:
        start = time.perf_counter()
        if variant.model == "linear_probe":
            model, history, val_prob = fit_linear_probe(variant, params, train, val, live)
        else:
            model, history, val_prob = fit(variant, params, train, val, epochs, callbacks(params, live), verbose)
        if variant.option("tta"):
            # trained as usual, then averaged over fixed views; threshold and stress see the average
            model = tta_model(model)
            val_prob = predict_arrays(model, val.x)
        seconds = time.perf_counter() - start
        if not np.all(np.isfinite(val_prob)):
            raise CxrError(
                f"variant {variant.name} diverged (non-finite validation "
                f"predictions); lower variants.{variant.name}.learning_rate"
            )
        stress_prob = stress_probabilities(model, val.x, params.seed)
        threshold = choose_threshold(params.train.threshold_rule, val.y, val_prob, stress_prob)
        m = binary_metrics(val.y, val_prob, threshold)
        summary = ValSummary(
            roc_auc=m["roc_auc"],
            accuracy=m["accuracy"],
            sensitivity=m["sensitivity"],
            specificity=m["specificity"],
            n=m["n"],
        )
        if live is not None:
            # The restored best epoch's figures, next to DVCLive's last-epoch ones in metrics.json.
            for key in ("roc_auc", "sensitivity", "specificity"):
                live.log_metric(f"best/val_{key}", m[key], plot=False)
            live.log_metric("best/threshold", threshold, plot=False)
    epochs_run = len(history.epoch)
    print(
        f"train@{variant.name}: {epochs_run} epoch(s) in {seconds:.1f} s; val roc_auc={summary.roc_auc:.3f} "
        f"threshold={threshold:.3f} ({params.train.threshold_rule}) "
        f"sensitivity={summary.sensitivity:.3f} specificity={summary.specificity:.3f}"
    )
    meta = sidecar(variant, params, threshold, summary, epochs_run, seconds)
    history_lists = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    return TrainResult(model=model, meta=meta, history=history_lists, val_prob=val_prob, stress_prob=stress_prob)


def sidecar(
    variant: VariantParams, params: Params, threshold: float, val: ValSummary, epochs_run: int, seconds: float
) -> Sidecar:
    """models/<v>.json for a trained variant: its params, and the backbone it really used."""
    variant_params = {k: v for k, v in asdict(variant).items() if k not in ("name", "extra")} | dict(variant.extra)
    weights: dict[str, str] = {}
    if variant.model in BACKBONE_MODELS:
        backbone = variant.backbone(params.transfer)
        variant_params["transfer"] = asdict(backbone)
        weights = starting_weights(backbone.backbone, backbone.weights)
    return Sidecar(
        variant=variant.name,
        model=variant.model,
        image_size=variant.image_size,
        resize=params.preprocess.resize,
        threshold=threshold,
        threshold_rule=params.train.threshold_rule,
        val=val,
        epochs_run=epochs_run,
        train_seconds=round(seconds, 2),
        seed=params.seed,
        params=variant_params,
        weights=weights,
    )


def save_result(result: TrainResult, model_path: Path | str, meta_path: Path | str) -> None:
    """Write the model and then its sidecar, each atomically (whole or absent)."""
    with atomic_path(model_path) as tmp:
        result.model.save(tmp)
    result.meta.write(meta_path)
