"""Scaling out (cxr/model/distribute.py, docs/scaling.md): strategy choice, TF_CONFIG errors, the global
batch, mixed precision, and a real two-worker MultiWorkerMirroredStrategy run on 127.0.0.1 whose
per-epoch losses match a single-process run with the same global batch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from cxr.core import params as cxr_params
from cxr.core.errors import CxrError
from cxr.data.cache import cache_dir, write_split
from cxr.model import distribute
from cxr.model.architectures import build_model
from cxr.model.distribute import Task, configure_precision, get_strategy, global_batch_size, read_tf_config
from cxr.model.training import compile_model, epoch_batches, train_variant
from model.conftest import tiny_split  # the model tests' tiny labelled images

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distribute_worker.py"
VARIANT = "dense_baseline"
SIZE, N_TRAIN, N_VAL = 32, 32, 8
PER_REPLICA, EPOCHS = 4, 3
CLUSTER_TIMEOUT_S = 240  # typical: about 30 s; a hung collective would otherwise wait forever
# Two workers sum their gradients in another order than one process does (float32 rounding,
# ~1e-7 relative per step); over 12 steps that stays far below this. A wrong global batch, a
# worker training on the wrong shard or a shifted shuffle moves the loss by 1e-3 or more.
LOSS_RTOL = 1e-4


def raw_params(distribute_mode: str = "none", batch_size: int = PER_REPLICA, epochs: int = EPOCHS) -> dict:
    """params.yaml with dense_baseline shrunk to 32 px, a few epochs and no early stop."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["transfer"]["weights"] = "none"
    raw["train"].update(distribute=distribute_mode, mixed_precision=False, patience=epochs + 1, use_seed_epochs=False)
    raw["variants"][VARIANT].update(image_size=SIZE, batch_size=batch_size, epochs=epochs, learning_rate=0.01)
    return raw


def make_project(folder: Path, raw: dict) -> Path:
    """A project folder with params.yaml and the 32 px train/val cache, as `dvc pull` would leave it."""
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    cache = cache_dir(folder / "data" / "processed", SIZE)
    for split, n, seed in (("train", N_TRAIN, 1), ("val", N_VAL, 2)):
        data = tiny_split(n, size=SIZE, seed=seed)
        write_split(cache, split, data.x, data.rows)
    return folder


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def private_loopback() -> Iterator[list[str]]:
    """A command prefix that runs a process in a network namespace holding only its own loopback.

    TensorFlow's gRPC server listens on 0.0.0.0 whatever address TF_CONFIG gives, so the
    cluster runs where 0.0.0.0 is 127.0.0.1 alone. Where unprivileged namespaces are not
    allowed (some containers) the prefix is empty and the servers listen on the host for the
    test's half minute.
    """
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip")):
        yield []
        return
    # unshare execs the shell, so holder.pid is inside the new namespaces until it is killed.
    holder = subprocess.Popen(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--net",
            "sh",
            "-c",
            "ip link set lo up && echo ready && exec sleep 900",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        ready = holder.stdout.readline().strip() == "ready"  # "" when unshare is refused
        yield ["nsenter", f"--target={holder.pid}", "--user", "--net", "--preserve-credentials"] if ready else []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (closed again for TensorFlow to bind)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# --- strategy choice and TF_CONFIG ----------------------------------------------------------


def test_get_strategy_choices(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    gpus = len(tf.config.list_logical_devices("GPU"))
    default = tf.distribute.get_strategy()
    assert get_strategy("none") is default and default.num_replicas_in_sync == 1
    if gpus <= 1:  # auto is the default strategy unless several GPUs are visible
        assert get_strategy("auto") is default
    else:
        assert isinstance(get_strategy("auto"), tf.distribute.MirroredStrategy)
    mirrored = get_strategy("mirrored")
    assert isinstance(mirrored, tf.distribute.MirroredStrategy) and mirrored.num_replicas_in_sync == max(gpus, 1)
    with pytest.raises(
        CxrError, match=r"^params.yaml train.distribute: 'horovod' is not one of auto, none, mirrored, multi_worker$"
    ):
        get_strategy("horovod")


def test_multi_worker_without_tf_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(CxrError) as info:
        get_strategy("multi_worker")
    message = str(info.value)
    assert message.startswith(
        "TF_CONFIG (needed by params.yaml train.distribute: multi_worker) is not set; set it on every machine"
    )
    assert "docs/scaling.md" in message and "\n" not in message
    assert distribute._multi_worker is None  # nothing was started
    monkeypatch.setenv("TF_CONFIG", "{'cluster': }")
    with pytest.raises(CxrError, match=r"^TF_CONFIG \(needed by .*\) is not valid JSON"):
        get_strategy("multi_worker")
    assert distribute._multi_worker is None


def test_multi_worker_after_other_tensorflow_work_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(distribute, "_multi_worker", None)
    assert float(tf.constant(1.0) + 1) == 2.0  # TensorFlow has run: too late to set up collective ops
    port = free_ports(1)[0]
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}})
    )
    with pytest.raises(
        CxrError,
        match=r"^params.yaml train.distribute: multi_worker must set up its strategy before TensorFlow runs "
        r"anything else in the process; call cxr.model.distribute.get_strategy\('multi_worker'\) first",
    ):
        get_strategy("multi_worker")
    assert distribute._multi_worker is None


def test_a_lost_worker_is_one_clear_line():
    lost = tf.errors.UnavailableError(
        None, None, "Collective ops is aborted by: task 1 stopped sending heartbeats.\nmore"
    )
    with pytest.raises(CxrError) as info, distribute.cluster_errors(Task("worker", 0, {"worker": ["a:1", "b:2"]})):
        raise lost
    assert str(info.value) == (
        "TF_CONFIG cluster: worker 0 lost contact with another worker (Collective ops is aborted by: task 1 "
        "stopped sending heartbeats. more); check every worker's log, then start all of them again"
    )
    with (
        pytest.raises(tf.errors.UnavailableError),
        distribute.cluster_errors(None),
    ):  # not in a cluster: TensorFlow's own error
        raise lost


@pytest.mark.parametrize(
    "config, detail",
    [
        ("[]", "must be a JSON object with 'cluster' and 'task' objects"),
        ('{"cluster": {"worker": ["a:1"]}}', "must be a JSON object with 'cluster' and 'task' objects"),
        (
            '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}',
            "cluster has job(s) ps",
        ),
        (
            '{"cluster": {"worker": []}, "task": {"type": "worker", "index": 0}}',
            "cluster.worker must be a non-empty list of 'host:port'",
        ),
        (
            '{"cluster": {"worker": ["hostonly"]}, "task": {"type": "worker", "index": 0}}',
            "cluster.worker must be a non-empty list of 'host:port'",
        ),
        ('{"cluster": {"chief": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "has no cluster.worker list"),
        (
            '{"cluster": {"chief": ["a:1", "b:2"], "worker": ["c:3"]}, "task": {"type": "chief", "index": 0}}',
            "at most one chief",
        ),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
            "task.type 'chief' is not a job of the cluster (worker)",
        ),
        (
            '{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}',
            "task.index 2 is not in 0..1",
        ),
    ],
)
def test_malformed_tf_config_is_a_clear_error(config, detail):
    with pytest.raises(CxrError) as info:
        read_tf_config(config)
    message = str(info.value)
    assert message.startswith("TF_CONFIG (needed by params.yaml train.distribute: multi_worker) ") and detail in message
    assert "e.g. TF_CONFIG=" in message and "\n" not in message


def test_the_chief_is_the_chief_task_or_worker_0():
    two = {"worker": ["a:1", "b:2"]}
    assert read_tf_config(json.dumps({"cluster": two, "task": {"type": "worker", "index": 0}})) == Task(
        "worker", 0, two
    )
    assert Task("worker", 0, two).is_chief and not Task("worker", 1, two).is_chief
    with_chief = {"chief": ["c:0"], **two}
    assert Task("chief", 0, with_chief).is_chief and not Task("worker", 0, with_chief).is_chief
    assert Task("chief", 0, with_chief).num_workers == 3


def test_tf_config_with_another_mode_prints_a_note(monkeypatch, capsys):
    monkeypatch.setattr(distribute, "_noted", False)
    monkeypatch.setenv(
        "TF_CONFIG", json.dumps({"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 0}})
    )
    assert get_strategy("none").num_replicas_in_sync == 1
    assert "note: TF_CONFIG is set but params.yaml train.distribute is none" in capsys.readouterr().out


# --- global batch and data order -----------------------------------------------------------


class _Replicas:
    def __init__(self, n: int):
        self.num_replicas_in_sync = n


def test_global_batch_is_per_replica_batch_times_replicas():
    assert global_batch_size(48, _Replicas(1)) == 48
    assert global_batch_size(48, _Replicas(8)) == 384
    assert global_batch_size(48, get_strategy("none")) == 48


def test_epoch_batches_depend_only_on_seed_and_epoch():
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    y = np.arange(10) % 2
    ds = epoch_batches(x, y, batch_size=4, seed=7, epochs=2)

    def epochs_of(dataset):
        batches = [b[0].numpy().reshape(-1).astype(int).tolist() for b in dataset]
        assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]  # batches never span two epochs
        return [i for b in batches[:3] for i in b], [i for b in batches[3:] for i in b]

    first, second = epochs_of(ds)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert epochs_of(ds) == (first, second)  # a second iterator gives the same order
    assert epochs_of(epoch_batches(x, y, 4, seed=8, epochs=2)) != (first, second)
    assert next(iter(ds))[0].dtype == tf.float32


def test_mirrored_one_replica_trains_like_no_strategy(monkeypatch):
    """MirroredStrategy on one device (a CPU-only machine) runs the same steps as no strategy:
    global batch = batch_size × 1, same data order, same losses."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    if tf.config.list_logical_devices("GPU"):
        pytest.skip("one-replica MirroredStrategy needs a machine without GPUs")
    train, val = tiny_split(N_TRAIN, size=SIZE, seed=1), tiny_split(N_VAL, size=SIZE, seed=2)
    runs = {}
    for mode in ("none", "mirrored"):
        params = cxr_params.parse(raw_params(mode, batch_size=8, epochs=2))
        runs[mode] = train_variant(params.variant(VARIANT), params, train, val, verbose=0).history
    np.testing.assert_allclose(runs["mirrored"]["loss"], runs["none"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(runs["mirrored"]["val_roc_auc"], runs["none"]["val_roc_auc"], rtol=1e-6)


# --- mixed precision -------------------------------------------------------------------------


@pytest.fixture
def float32_afterwards():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_mixed_precision_keeps_the_output_float32(float32_afterwards):
    params = cxr_params.parse(raw_params())
    keras.mixed_precision.set_global_policy("mixed_float16")  # on CPU too: only dtypes are checked
    variant = replace(params.variant("cnn_baseline"), image_size=48)
    model = compile_model(build_model(variant, params), variant, steps_per_epoch=1, epochs=1)
    hidden = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert hidden and all(layer.compute_dtype == "float16" and layer.variable_dtype == "float32" for layer in hidden)
    assert model.output.dtype == "float32" and model.layers[-1].compute_dtype == "float32"
    prob = model(np.full((2, 48, 48, 1), 128, np.float32))
    assert prob.dtype == "float32"
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)  # fp16 gradients do not underflow


def test_mixed_precision_on_cpu_falls_back_to_float32_with_a_note(float32_afterwards, capsys):
    if tf.config.list_logical_devices("GPU"):
        assert configure_precision(True) == "mixed_float16"
        return
    assert configure_precision(True) == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"
    assert (
        "note: params.yaml train.mixed_precision is true but no GPU is visible; training in float32"
        in capsys.readouterr().out
    )
    assert configure_precision(False) == "float32" and capsys.readouterr().out == ""


# --- a real two-worker cluster on 127.0.0.1 --------------------------------------------------


def test_two_workers_match_one_process_and_only_the_chief_writes(tmp_path):
    chief = make_project(tmp_path / "chief", raw_params("multi_worker", batch_size=PER_REPLICA))
    worker = make_project(tmp_path / "worker", raw_params("multi_worker", batch_size=PER_REPLICA))
    single = make_project(tmp_path / "single", raw_params("none", batch_size=2 * PER_REPLICA))
    inputs = files_under(worker)
    scratch = tmp_path / "tmp"  # the workers' TMPDIR: where a non-chief's scratch outputs go
    scratch.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", TMPDIR=str(scratch))
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    runs = {
        "chief": (chief, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}})}),
        "worker": (worker, {"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}})}),
        "single": (single, {}),
    }
    procs = {}
    with private_loopback() as prefix:
        try:
            for name, (project, extra) in runs.items():
                with open(tmp_path / f"{name}.log", "w") as log:
                    command = [
                        *(prefix if extra else []),
                        sys.executable,
                        str(WORKER),
                        str(project),
                        VARIANT,
                        str(tmp_path / f"{name}.json"),
                    ]
                    procs[name] = subprocess.Popen(
                        command, cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT
                    )
            deadline = time.monotonic() + CLUSTER_TIMEOUT_S
            for proc in procs.values():
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        finally:
            # SIGKILL: once its strategy is up, a multi-worker process ignores SIGTERM (a preemption notice).
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def tail(name: str) -> str:
        return f"--- {name} (rc {procs[name].returncode}):\n" + (tmp_path / f"{name}.log").read_text()[-3000:]

    logs = "\n".join(tail(name) for name in procs)
    assert all(proc.returncode == 0 for proc in procs.values()), logs
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in procs}

    # Only the chief wrote outputs; the worker's project holds just its inputs, its scratch is gone.
    assert files_under(worker) == inputs, logs
    assert list(scratch.iterdir()) == []
    assert (
        f"train@{VARIANT}: worker 1 finished in" in (tmp_path / "worker.log").read_text()
    )  # it did write, into its scratch
    for project in (chief, single):
        written = [f for f in files_under(project) if f not in inputs]
        assert {f"models/{VARIANT}.keras", f"models/{VARIANT}.json", f"dvclive/{VARIANT}/metrics.json"} <= set(written)
    assert json.loads((chief / "models" / f"{VARIANT}.json").read_text()) == reports["chief"]["meta"]

    assert reports["chief"]["chief"] and not reports["worker"]["chief"] and reports["single"]["chief"]
    assert reports["chief"]["task"] == {"type": "worker", "index": 0} and reports["worker"]["task"] == {
        "type": "worker",
        "index": 1,
    }
    assert [reports[n]["replicas"] for n in procs] == [2, 2, 1]
    assert [reports[n]["global_batch"] for n in procs] == [2 * PER_REPLICA] * 3

    # The same global batches in the same order: the same per-epoch losses, up to summation order.
    loss = {name: np.array(reports[name]["history"]["loss"]) for name in procs}
    assert len(loss["single"]) == EPOCHS and loss["single"][-1] < loss["single"][0]  # it learned something
    np.testing.assert_array_equal(loss["worker"], loss["chief"])  # one all-reduced value on both
    np.testing.assert_allclose(loss["chief"], loss["single"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(
        reports["chief"]["history"]["val_loss"], reports["single"]["history"]["val_loss"], rtol=LOSS_RTOL
    )
    print("loss relative difference per epoch:", (np.abs(loss["chief"] - loss["single"]) / loss["single"]).tolist())
