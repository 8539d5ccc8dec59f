"""k-fold ensembles: where fold models live, and their average as one Keras model.

    python stages/ensemble.py VARIANT     # the DVC stage ensemble@VARIANT; it calls build_ensemble()

A fold model (`train_fold@<v>-<k>`) trains on the official-train images outside fold k and
writes fold k's out-of-fold probabilities. The ensemble `<v>_cv` averages the k models' outputs
in one functional model (no Lambda layers: it loads with safe_mode like every model), and its
threshold is chosen by `train.threshold_rule` on the out-of-fold probabilities, so no image that
chose it was seen by the model that scored it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cxr.core.errors import CxrError
from cxr.core.params import Params
from cxr.evaluation.metrics import binary_metrics, choose_threshold
from cxr.model.sidecar import Sidecar, ValSummary

if TYPE_CHECKING:
    from cxr.model.training import TrainResult
    from cxr.serving.inference import LoadedModel


def average_model(name: str, models: list[Any]) -> Any:
    """One model whose output is the mean of `models`' outputs on the same input."""
    import keras
    from keras import layers

    inputs = keras.Input(models[0].inputs[0].shape[1:], name="image")
    # each member wrapped under its own name: the fold models share one architecture's layer names
    outputs = [keras.Model(m.inputs[0], m.outputs[0], name=f"fold{k}")(inputs) for k, m in enumerate(models)]
    return keras.Model(inputs, layers.Average(name="mean")(outputs), name=name)


def build_ensemble(name: str, members: list[LoadedModel], oof: pd.DataFrame, params: Params) -> TrainResult:
    """The averaged model and its sidecar: threshold and `val` figures from the out-of-fold rows
    (their `p_<shift>` columns are the stress probabilities, for stress_youden and the report)."""
    from cxr.evaluation.stress import SHIFTS
    from cxr.model.training import TrainResult

    first = members[0].meta
    for m in members[1:]:
        if (m.meta.image_size, m.meta.resize) != (first.image_size, first.resize):
            raise CxrError(f"{m.path}: fold models differ in image_size/resize; rerun `dvc repro train_fold`")
    y, prob = oof["label"].to_numpy().astype(int), oof["probability"].to_numpy()
    stressed = {shift: oof[f"p_{shift}"].to_numpy() for shift in SHIFTS}
    threshold = choose_threshold(params.train.threshold_rule, y, prob, stressed)
    m = binary_metrics(y, prob, threshold)
    meta = Sidecar(
        variant=name,
        model="ensemble",
        image_size=first.image_size,
        resize=first.resize,
        threshold=threshold,
        threshold_rule=params.train.threshold_rule,
        val=ValSummary(
            roc_auc=m["roc_auc"],
            accuracy=m["accuracy"],
            sensitivity=m["sensitivity"],
            specificity=m["specificity"],
            n=m["n"],
        ),
        epochs_run=int(sum(x.meta.epochs_run for x in members)),
        train_seconds=round(float(sum(x.meta.train_seconds for x in members)), 2),
        seed=params.seed,
        params={
            "members": [str(x.path) for x in members],
            "member_epochs": [x.meta.epochs_run for x in members],
            "variant": first.params,
        },
        weights=first.weights,
    )
    return TrainResult(
        model=average_model(name, [x.model for x in members]),
        meta=meta,
        val_prob=np.asarray(prob),
        stress_prob=stressed,
    )
