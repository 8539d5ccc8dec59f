"""Where training runs: the tf.distribute strategy, the global batch, which process writes the
outputs, and mixed precision (see docs/scaling.md).

    train.distribute: auto          # MirroredStrategy on >1 visible GPU, else the default strategy
    train.distribute: none          # the default strategy (one device)
    train.distribute: mirrored      # MirroredStrategy: all GPUs of this machine (CPU:0 without GPUs)
    train.distribute: multi_worker  # MultiWorkerMirroredStrategy over the machines in TF_CONFIG

Each replica gets `batch_size` images per step (the variant's batch size is per replica), so the
global batch is batch_size × replicas; the learning rate stays as configured. Only the chief
(task 'chief', or worker 0 when the cluster has none) writes models, sidecars and DVCLive logs;
the other workers write the same files into a temporary folder that is removed (the Keras
multi-worker pattern), so every process runs the same code path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from cxr.core.errors import CxrError

MODES = ("auto", "none", "mirrored", "multi_worker")
TASK_TYPES = ("chief", "worker")
EXAMPLE = (
    'TF_CONFIG=\'{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}\' '
    "(index 1 on the second machine; see docs/scaling.md)"
)


@dataclass(frozen=True)
class Task:
    """This process's place in a TF_CONFIG cluster."""

    type: str
    index: int
    cluster: dict[str, list[str]]

    @property
    def is_chief(self) -> bool:
        """The chief job's task, or worker 0 when the cluster has no chief (TensorFlow's convention)."""
        return self.type == "chief" or (self.type == "worker" and self.index == 0 and "chief" not in self.cluster)

    @property
    def num_workers(self) -> int:
        return sum(len(addresses) for addresses in self.cluster.values())


def _config_error(detail: str) -> CxrError:
    return CxrError(f"TF_CONFIG (needed by params.yaml train.distribute: multi_worker) {detail}; e.g. {EXAMPLE}")


def read_tf_config(text: str | None) -> Task:
    """Parse and check the TF_CONFIG environment variable's JSON (the standard tf.distribute
    cluster description); one clear error for each way it can be wrong."""
    if text is None or not text.strip():
        raise _config_error("is not set; set it on every machine")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _config_error(f"is not valid JSON ({exc.msg} at character {exc.pos})") from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("cluster"), dict)
        or not isinstance(config.get("task"), dict)
    ):
        raise _config_error("must be a JSON object with 'cluster' and 'task' objects")
    cluster = config["cluster"]
    unknown = set(cluster) - set(TASK_TYPES)
    if unknown:
        raise _config_error(
            f"cluster has job(s) {', '.join(sorted(unknown))}, which MultiWorkerMirroredStrategy "
            "does not use; list only 'worker' (and at most one 'chief')"
        )
    for job, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)
        ):
            raise _config_error(f"cluster.{job} must be a non-empty list of 'host:port' strings, got {addresses!r}")
    if "worker" not in cluster:
        raise _config_error("has no cluster.worker list")
    if len(cluster.get("chief", [])) > 1:
        raise _config_error(f"cluster.chief lists {len(cluster['chief'])} addresses; a cluster has at most one chief")
    task = config["task"]
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster:
        raise _config_error(f"task.type {kind!r} is not a job of the cluster ({', '.join(sorted(cluster))})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise _config_error(
            f"task.index {index!r} is not in 0..{len(cluster[kind]) - 1} "
            f"(cluster.{kind} has {len(cluster[kind])} addresses)"
        )
    return Task(type=kind, index=index, cluster={job: list(addresses) for job, addresses in cluster.items()})


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy whose `reduce` takes what Keras 3's `fit` passes it.

    Keras 3.15 reduces a whole (x, y, sample_weight) batch at once when it builds the model, and
    per-replica scalar logs with axis=0; the collective strategy handles neither
    (keras-team/keras#20585). Reducing leaf by leaf, scalars without an axis, fixes both and
    leaves single-tensor calls as they were.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: int | None) -> Any:
        parent = super()

        def one(v: Any) -> Any:
            local = v.values[0] if isinstance(v, tf.distribute.DistributedValues) else v
            rank = getattr(getattr(local, "shape", None), "rank", None)
            return parent.reduce(reduce_op, v, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


# TensorFlow configures collective ops (and starts this worker's gRPC server) once per process,
# so the multi-worker strategy is created once and reused; so is MirroredStrategy, which the
# stage and the fit functions both ask for.
_multi_worker: tf.distribute.MultiWorkerMirroredStrategy | None = None
_mirrored: tf.distribute.MirroredStrategy | None = None
_noted = False


def get_strategy(distribute: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy for params.yaml train.distribute (see the module doc).

    multi_worker: call this before other TensorFlow work in the process (stages/train.py and
    cxr.model.training.train_variant do), as TensorFlow configures collective ops at start-up.
    """
    global _multi_worker, _mirrored, _noted
    if distribute not in MODES:
        raise CxrError(f"params.yaml train.distribute: '{distribute}' is not one of {', '.join(MODES)}")
    if distribute == "multi_worker":
        if _multi_worker is None:
            read_tf_config(os.environ.get("TF_CONFIG"))  # a clear error before TensorFlow's own
            try:
                _multi_worker = _MultiWorkerStrategy()
            except RuntimeError as exc:
                if "program startup" not in str(exc):
                    raise
                raise CxrError(
                    "params.yaml train.distribute: multi_worker must set up its strategy before TensorFlow runs "
                    "anything else in the process; call cxr.model.distribute.get_strategy('multi_worker') first "
                    "(stages/train.py does)"
                ) from None
        return _multi_worker
    if os.environ.get("TF_CONFIG", "").strip() and not _noted:
        _noted = True
        print(
            f"note: TF_CONFIG is set but params.yaml train.distribute is {distribute}; this machine trains alone "
            "(set train.distribute: multi_worker to train across the cluster)"
        )
    if distribute == "mirrored" or (distribute == "auto" and len(tf.config.list_logical_devices("GPU")) > 1):
        if _mirrored is None:
            _mirrored = tf.distribute.MirroredStrategy()
        return _mirrored
    return tf.distribute.get_strategy()


def task_of(strategy: tf.distribute.Strategy) -> Task | None:
    """This process's task in a multi-worker cluster, None for single-process strategies."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None
    resolver = strategy.cluster_resolver
    cluster = resolver.cluster_spec().as_dict()
    if not cluster:  # created without TF_CONFIG: one local worker
        return None
    return Task(type=resolver.task_type, index=int(resolver.task_id), cluster={k: list(v) for k, v in cluster.items()})


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the outputs: always outside a cluster, else only the chief."""
    task = task_of(strategy)
    return task is None or task.is_chief


def global_batch_size(per_replica: int, strategy: tf.distribute.Strategy) -> int:
    """Images per optimizer step: the variant's batch_size on each of the strategy's replicas."""
    return per_replica * strategy.num_replicas_in_sync


def shard_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Split batches between workers by element: in-memory arrays have no files to shard by (the
    AUTO policy would try files first, then fall back with a warning). No effect on one worker."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def configure_precision(mixed_precision: bool) -> str:
    """Set Keras's global dtype policy for params.yaml train.mixed_precision; returns its name.

    mixed_float16 only where a GPU is visible: CPUs have no fast float16 path, so there it would
    be slower, and we fall back to float32 with a note. Models keep a float32 output layer
    (cxr.model.architectures._output) and Keras wraps the optimizer in a LossScaleOptimizer at compile time.
    """
    policy = "float32"
    if mixed_precision:
        if tf.config.list_logical_devices("GPU"):
            policy = "mixed_float16"
        else:
            print("note: params.yaml train.mixed_precision is true but no GPU is visible; training in float32")
    keras.mixed_precision.set_global_policy(policy)
    return policy


@contextlib.contextmanager
def cluster_errors(task: Task | None) -> Iterator[None]:
    """In a cluster, a peer that crashed or cannot be reached becomes one CxrError line instead
    of TensorFlow's collective-op traceback."""
    try:
        yield
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError) as exc:
        if task is None:
            raise
        detail = " ".join(str(exc.message).split())[:240]
        raise CxrError(
            f"TF_CONFIG cluster: {task.type} {task.index} lost contact with another "
            f"worker ({detail}); check every worker's log, then start all of them again"
        ) from None


@contextlib.contextmanager
def output_root(chief: bool) -> Iterator[Path]:
    """The folder the outputs' relative paths start from: the project root (`.`) on the chief, a
    temporary folder, removed afterwards, on the other workers."""
    if chief:
        yield Path(".")
        return
    scratch = Path(tempfile.mkdtemp(prefix="cxr-worker-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
