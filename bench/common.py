"""Helpers shared by the benchmark scripts: machine facts, sample images, timers, a plain-text
table, result JSON. Importing it puts the project root on sys.path (for `cxr` and `stages`).

Every figure a benchmark writes carries the machine it was measured on (`machine_info()`:
core count, CPU model, load average, versions, git commit, timestamp) because the build
machine is shared and wall times on it say as much about the neighbours as about the code.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SAMPLES = ROOT.parent / "shared" / "data" / "raw_sample"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cxr.core.provenance import git_commit  # noqa: E402  (the checkout's cxr, not an installed one)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge a timing: cores, CPU, load, versions, commit, time."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model(),
        "load_average_1_5_15": load_average(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(ROOT),
        "timestamp": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:
        pass
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    info = info or machine_info()
    load = info.get("load_average_1_5_15") or ["?"]
    return (
        f"{info['nproc']} cores ({info['cpu_model']}), load average "
        f"{load[0]} (1 min), commit {str(info.get('git_commit'))[:12]}"
    )


def sample_files(n: int | None = None, root: Path = SAMPLES) -> list[Path]:
    """The full-resolution originals in ../shared/data/raw_sample, sorted; with `n`, repeated
    round robin to n files."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no sample images in {root}; see ../shared/README.md")
    return files if n is None else [files[i % len(files)] for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def children_cpu() -> float:
    """CPU seconds (user + system) used so far by this process's finished, waited-for children.

    Benchmarks report it next to wall time: on a shared machine it depends less on the neighbours."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A plain-text table with '|' separators (also valid Markdown). align: one l/r per column."""
    rows = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" * len(headers)

    def fmt(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(cells, widths, align, strict=True))
            + " |"
        )

    sep = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2)) for w, a in zip(widths, align, strict=True))
        + "|"
    )
    return "\n".join([fmt(headers), sep] + [fmt(r) for r in rows])


def write_result(name: str, data: dict[str, Any], machine: dict[str, Any] | None = None) -> Path:
    """bench/results/<name>.json (atomic), with the machine facts under "machine"."""
    from cxr.core.io import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {**data, "machine": machine or machine_info()})
    return path


STANDIN_SIZE = 224


def build_standin(folder: Path) -> tuple[Path, str]:
    """The benchmarks' stand-in model when no trained one exists (MobileNetV2 α0.35 at 224 px:
    realistic compute), with ImageNet
    weights from Keras's cache when they are there (KERAS_HOME=../shared/keras) and a head of
    fixed random weights, so different X-rays get different probabilities and a Grad-CAM;
    untrained throughout, the backbone answers 0.5 for every image. Returns (path, weights)."""
    import keras
    import numpy as np
    from keras import layers

    from cxr.model.sidecar import Sidecar, ValSummary

    keras.utils.set_random_seed(0)
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
    weights = (
        "imagenet"
        if (cache / f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_{STANDIN_SIZE}_no_top.h5").is_file()
        else None
    )
    backbone = keras.applications.MobileNetV2(
        input_shape=(STANDIN_SIZE, STANDIN_SIZE, 3), alpha=0.35, include_top=False, weights=weights, pooling="avg"
    )
    inputs = keras.Input((STANDIN_SIZE, STANDIN_SIZE, 1))
    x = layers.Rescaling(1.0 / 127.5, offset=-1)(inputs)
    features = backbone(layers.Concatenate()([x, x, x]))
    head = layers.Dense(1, activation="sigmoid", name="head")
    model = keras.Model(inputs, head(features), name="standin")
    rng = np.random.default_rng(0)
    head.set_weights([rng.normal(0, 0.1, (features.shape[-1], 1)).astype("float32"), np.zeros(1, "float32")])
    path = folder / "standin.keras"
    model.save(path)
    untrained = ValSummary(
        roc_auc=float("nan"), accuracy=float("nan"), sensitivity=float("nan"), specificity=float("nan"), n=0
    )
    Sidecar(
        variant="standin",
        model="transfer_frozen",
        image_size=STANDIN_SIZE,
        resize="squash",
        threshold=0.5,
        threshold_rule="none (untrained)",
        val=untrained,
        epochs_run=0,
        train_seconds=0.0,
        seed=0,
    ).write(path.with_suffix(".json"))
    return path, weights or "none (random)"
