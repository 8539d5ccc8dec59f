"""Preprocess speed: full-resolution JPEG → every model input size, with the real decoder.

    .venv/bin/python bench/bench_preprocess.py [--images 400] [--repeats 3] [--profile] [--quick]

Copies the full-resolution originals in ../shared/data/raw_sample (16 files, 850–2268 px) to a
temporary folder, repeated to --images files (real copies on disk, read once beforehand so the
page cache is warm and equally fair to every method), and times, in alternation:

  decode_all                 cxr.data.preprocess.decode_all with params.yaml's workers (2): the stage's own code
  load_resized, 1 process    cxr.data.images.load_resized file after file (what one core does)
  plain PIL, 1 process       Image.open → convert('L') → resize to each size (bilinear, no draft)
  plain PIL, N processes     the same plain function inside decode_all's own Pool (load_resized swapped
                             for it), so the decoder is the only difference

Sizes are params.yaml's image sizes (every variant's image_size). Goal: decode_all ≥ 150 images/s.
--candidates adds a proposed change, timed in alternation with the real code (see decode_all_shared).
--profile adds where the time goes: a cProfile of load_resized split into JPEG decode / resize /
other, the Pool + pickling + assembly cost alone (decode_all with a worker that returns ready
arrays), and the cost of writing the cache (cxr.data.cache.write_split).
Prints a table and writes bench/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, children_cpu, machine_info, machine_line, sample_files, table, timed, write_result

os.environ.setdefault("TQDM_DISABLE", "1")  # decode_all's progress bar: no clutter in the tables

from PIL import Image  # noqa: E402

from cxr.core import params as cxr_params  # noqa: E402
from cxr.data import preprocess  # noqa: E402
from cxr.data.images import load_resized  # noqa: E402

GOAL_IPS = 150.0


# ----------------------------------------------------------------------------- the baseline


def plain_load(path: str, sizes: list[int], mode: str = "squash") -> dict[int, np.ndarray]:
    """The naive way, for comparison only: full-size decode, then resize to each size (squash)."""
    img = Image.open(path).convert("L")
    return {s: np.asarray(img.resize((s, s), Image.Resampling.BILINEAR), dtype=np.uint8)[:, :, None] for s in sizes}


def ready_arrays(path: str, sizes: list[int], mode: str = "squash") -> dict[int, np.ndarray]:
    """No decoding at all: fresh arrays of the right shapes, to time the Pool/IPC path alone."""
    return {s: np.full((s, s, 1), len(path) % 251, np.uint8) for s in sizes}


def sequential(fn: Any, paths: list[str], sizes: list[int], mode: str) -> dict[int, np.ndarray]:
    """One process, same output arrays as decode_all."""
    out = {s: np.empty((len(paths), s, s, 1), np.uint8) for s in sizes}
    for i, p in enumerate(paths):
        arrays = fn(p, sizes=sizes, mode=mode)
        for s in sizes:
            out[s][i] = arrays[s]
    return out


def decode_all_with(fn: Any, paths: list[str], sizes: list[int], mode: str, workers: int) -> dict[int, np.ndarray]:
    """cxr.data.preprocess.decode_all with its per-file function swapped for `fn` (fork keeps the swap)."""
    real = preprocess.load_resized
    preprocess.load_resized = fn
    try:
        return preprocess.decode_all(paths, sizes, mode, workers)
    finally:
        preprocess.load_resized = real


# ----------------------------------------------------------------------------- a candidate

# Candidate change to cxr.data.preprocess.decode_all, timed here under --candidates only: workers
# write straight into shared output arrays and send back nothing but the index, instead of
# pickling every {size: array} back to the parent, which unpickles and copies it again.
_SHARED: dict[int, np.ndarray] = {}


def _decode_into(item: tuple[int, str], sizes: list[int], mode: str) -> int:
    i, path = item
    arrays = load_resized(path, sizes, mode)  # the same decoder: the same pixels
    for s in sizes:
        _SHARED[s][i] = arrays[s]
    return i


def decode_all_shared(paths: list[str], sizes: list[int], mode: str, workers: int) -> dict[int, np.ndarray]:
    """decode_all with results in shared memory (inherited by the forked workers)."""
    from functools import partial
    from multiprocessing import Pool, shared_memory

    blocks = {s: shared_memory.SharedMemory(create=True, size=max(1, len(paths) * s * s)) for s in sizes}
    try:
        for s, block in blocks.items():
            _SHARED[s] = np.ndarray((len(paths), s, s, 1), np.uint8, buffer=block.buf)
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(partial(_decode_into, sizes=sizes, mode=mode), enumerate(paths), chunksize=16):
                pass
        return {s: _SHARED[s].copy() for s in sizes}
    finally:
        _SHARED.clear()
        for block in blocks.values():
            block.close()
            block.unlink()


# ----------------------------------------------------------------------------- set-up


def make_inputs(folder: Path, n: int) -> tuple[list[str], int]:
    """n real copies of the samples (round robin) in `folder`; read once to warm the page cache."""
    paths = []
    for i, src in enumerate(sample_files(n)):
        dest = folder / f"{i:05d}-{src.name}"
        shutil.copyfile(src, dest)
        paths.append(str(dest))
    total = sum(len(Path(p).read_bytes()) for p in paths)
    return paths, total


def profile_decoder(paths: list[str], sizes: list[int], mode: str) -> dict[str, Any]:
    """cProfile of load_resized in one process, its own time split into coarse buckets."""
    prof = cProfile.Profile()
    prof.runcall(lambda: [load_resized(p, sizes, mode) for p in paths])
    stats = pstats.Stats(prof)
    buckets = {"jpeg_decode": 0.0, "draft_and_header": 0.0, "resize": 0.0, "to_numpy": 0.0, "other": 0.0}
    for (filename, _line, func), (_cc, _nc, tottime, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        name = func.lower()
        if "'decode' of" in name or ("imagefile" in filename.lower() and func == "load"):
            buckets["jpeg_decode"] += tottime
        elif "resize" in name or "'reduce' of" in name:
            buckets["resize"] += tottime
        elif (
            func in ("draft", "open", "_open", "_accept", "_getexif", "getexif", "exif_transpose", "_seek_check")
            or "jpegimageplugin" in filename.lower()
        ):
            buckets["draft_and_header"] += tottime
        elif "asarray" in name or "__array_interface__" in name or "tobytes" in name or "'encode' of" in name:
            buckets["to_numpy"] += tottime
        else:
            buckets["other"] += tottime
    total = sum(buckets.values())
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return {
        "seconds_total": round(total, 3),
        "ms_per_image": {k: round(1000 * v / len(paths), 3) for k, v in buckets.items()},
        "share": {k: round(v / total, 3) for k, v in buckets.items()},
        "top_by_own_time": buf.getvalue(),
    }


def write_cost(arrays: dict[int, np.ndarray], n: int) -> float:
    """Seconds to write the cache for these arrays with the stage's writer (one split per size)."""
    import pandas as pd

    from cxr.data.cache import write_split

    rows = pd.DataFrame({"path": [f"f{i}" for i in range(n)], "label": ["NORMAL"] * n, "split": ["train"] * n})
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-write-") as tmp:
        start = time.perf_counter()
        for s, x in arrays.items():
            write_split(Path(tmp) / str(s), "train", x, rows)
        return time.perf_counter() - start


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400, help="files to decode per run (default 400)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per method; the median is reported")
    parser.add_argument("--workers", type=int, default=None, help="default: params.yaml preprocess.workers")
    parser.add_argument(
        "--profile", action="store_true", help="add the cProfile breakdown, the IPC-only run and the write cost"
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="also time the proposed shared-memory decode_all (same pixels, checked)",
    )
    parser.add_argument("--quick", action="store_true", help="--images 128 --repeats 1, with the profile")
    args = parser.parse_args()
    if args.quick:
        args.images, args.repeats, args.profile = 128, 1, True
    return args


def methods_to_time(
    paths: list[str], sizes: list[int], mode: str, workers: int, candidates: bool
) -> dict[str, Callable[[], dict[int, np.ndarray]]]:
    """Name → run, in table order: the real code first, sequential load_resized second (the pixel
    reference), the plain-PIL baselines, then any candidate."""
    methods = {
        f"decode_all ({workers} workers, real stage code)": lambda: preprocess.decode_all(paths, sizes, mode, workers),
        "load_resized, 1 process": lambda: sequential(load_resized, paths, sizes, mode),
        "plain PIL (no draft), 1 process": lambda: sequential(plain_load, paths, sizes, mode),
        f"plain PIL (no draft), {workers} processes": lambda: decode_all_with(plain_load, paths, sizes, mode, workers),
    }
    if candidates:
        methods[f"candidate: decode_all, shared-memory results ({workers} workers)"] = lambda: decode_all_shared(
            paths, sizes, mode, workers
        )
    return methods


def time_methods(
    methods: dict[str, Callable[[], dict[int, np.ndarray]]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, dict[int, np.ndarray]]]:
    """Wall seconds and CPU seconds (children included) of every run, and each method's last output."""
    seconds: dict[str, list[float]] = {k: [] for k in methods}
    cpu: dict[str, list[float]] = {k: [] for k in methods}
    outputs: dict[str, dict[int, np.ndarray]] = {}
    for _ in range(repeats):
        for name, fn in methods.items():  # alternate, so background load hits every method alike
            c0 = time.process_time() + children_cpu()
            s, outputs[name] = timed(fn)
            cpu[name].append(time.process_time() + children_cpu() - c0)
            seconds[name].append(s)
    return seconds, cpu, outputs


def method_figures(seconds: list[float], cpu: list[float], n: int, procs: int) -> dict[str, Any]:
    """One method's row: throughput at the median, every run, CPU per image and what it allows."""
    med = float(np.median(seconds))
    return {
        "images_per_s": round(n / med, 1),
        "seconds_median": round(med, 3),
        "seconds_all": [round(x, 3) for x in seconds],
        "cpu_ms_per_image": round(1000 * float(np.median(cpu)) / n, 2),
        # what the CPU time allows when the processes get a whole core each (the machine is shared)
        "cpu_bound_images_per_s": round(min(procs, os.cpu_count() or 1) * n / float(np.median(cpu)), 1),
    }


def add_comparisons(result: dict[str, Any], names: list[str]) -> None:
    """The real code's throughput, the goal, and its speed-ups over the plain-PIL baselines."""
    real_ips = result["methods"][names[0]]["images_per_s"]
    result["decode_all_images_per_s"] = real_ips
    result["goal_met"] = real_ips >= GOAL_IPS
    result["speedup_vs_plain_same_processes"] = round(real_ips / result["methods"][names[3]]["images_per_s"], 2)
    result["speedup_vs_plain_1_process"] = round(real_ips / result["methods"][names[2]]["images_per_s"], 2)


def add_profile(
    result: dict[str, Any], paths: list[str], sizes: list[int], mode: str, workers: int, decoded: dict[int, np.ndarray]
) -> None:
    """--profile: where load_resized's time goes, the Pool/IPC path alone, and the cache write."""
    n = len(paths)
    result["profile"] = profile_decoder(paths, sizes, mode)
    ipc_s, _ = timed(lambda: decode_all_with(ready_arrays, paths, sizes, mode, workers))
    pool_s, _ = timed(lambda: decode_all_with(ready_arrays, paths[:1], sizes, mode, workers))
    write_s = write_cost(decoded, n)
    result["ipc_only"] = {
        "what": "decode_all with a worker that returns ready arrays: Pool start + pickling + transfer + assembly",
        "images_per_s": round(n / ipc_s, 1),
        "ms_per_image": round(1000 * ipc_s / n, 3),
        "pool_start_and_stop_s": round(pool_s, 3),
        "bytes_per_image": int(sum(s * s for s in sizes)),
    }
    result["write"] = {
        "what": "cxr.data.cache.write_split of every size (np.save + csv, fsync)",
        "ms_per_image": round(1000 * write_s / n, 3),
    }


def same_pixels(a: dict[int, np.ndarray], b: dict[int, np.ndarray], sizes: list[int]) -> bool:
    return all(np.array_equal(a[s], b[s]) for s in sizes)


def measure(args: argparse.Namespace, sizes: list[int], mode: str, workers: int) -> dict[str, Any]:
    """Time every method on fresh copies of the samples; the result without the machine facts."""
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        paths, total_bytes = make_inputs(Path(tmp), args.images)
        n = len(paths)
        methods = methods_to_time(paths, sizes, mode, workers, args.candidates)
        seconds, cpu, outputs = time_methods(methods, args.repeats)
        names = list(methods)
        real_name, seq_name = names[:2]
        result: dict[str, Any] = {
            "images": n,
            "distinct_originals": len(sample_files()),
            "input_mb": round(total_bytes / 1e6, 1),
            "sizes": sizes,
            "resize": mode,
            "workers": workers,
            "repeats": args.repeats,
            "page_cache": "warm (every copy read once before timing)",
            "goal_images_per_s": GOAL_IPS,
            "methods": {},
            "decode_all_matches_sequential_pixels": same_pixels(outputs[real_name], outputs[seq_name], sizes),
            "candidates_match_sequential_pixels": {
                name: same_pixels(outputs[name], outputs[seq_name], sizes) for name in names[4:]
            },
        }
        for name in names:
            procs = 1 if name.endswith("1 process") else workers
            result["methods"][name] = method_figures(seconds[name], cpu[name], n, procs)
        add_comparisons(result, names)
        if args.profile:
            add_profile(result, paths, sizes, mode, workers, outputs[real_name])
    return result


def print_report(result: dict[str, Any], before: dict[str, Any], profile: bool) -> None:
    """The table and the one-line findings."""
    real_name = next(iter(result["methods"]))
    rows = []
    for name, m in result["methods"].items():
        note = ""
        if name == real_name:
            note = f"goal ≥ {GOAL_IPS:.0f}: {'met' if result['goal_met'] else 'NOT met'}"
        rows.append(
            (
                name,
                f"{m['images_per_s']:.0f}",
                f"{m['seconds_median']:.2f}",
                f"{m['cpu_ms_per_image']:.1f}",
                f"{m['cpu_bound_images_per_s']:.0f}",
                note,
            )
        )
    print(
        f"{result['images']} files ({result['input_mb']} MB, copies of {result['distinct_originals']} "
        f"originals) → sizes {result['sizes']} ({result['resize']}); {machine_line(before)}"
    )
    print(table(["method", "images/s", "median s", "CPU ms/img", "CPU-bound img/s", "note"], rows, "lrrrrl"))
    print(
        f"decode_all is {result['speedup_vs_plain_same_processes']}x plain PIL with the same {result['workers']} "
        f"processes, {result['speedup_vs_plain_1_process']}x plain PIL in 1 process; pixels equal to sequential "
        f"load_resized: {result['decode_all_matches_sequential_pixels']}"
    )
    for name, same in result["candidates_match_sequential_pixels"].items():
        print(f"{name}: pixels equal to load_resized: {same}")
    if profile:
        p = result["profile"]
        print(
            "load_resized, 1 process, cProfile own time per image (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in p["ms_per_image"].items())
        )
        ipc = result["ipc_only"]
        print(
            f"Pool + pickling + assembly alone: {ipc['ms_per_image']:.2f} ms/image "
            f"({ipc['images_per_s']:.0f} images/s; pool start+stop {ipc['pool_start_and_stop_s']:.2f} s); "
            f"writing the cache: {result['write']['ms_per_image']:.2f} ms/image"
        )


def main() -> int:
    args = parse_args()
    params = cxr_params.load(ROOT / "params.yaml")
    sizes, mode = params.image_sizes, params.preprocess.resize
    workers = args.workers or params.preprocess.workers
    before = machine_info()
    result = measure(args, sizes, mode, workers)
    result["machine_before"] = before
    after = machine_info()
    print_report(result, before, args.profile)
    print(f"load average after: {after['load_average_1_5_15']}")
    path = write_result("preprocess", result, after)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
