"""Inference speed: batch throughput, single-image latency and `cxr predict` cold start.

    .venv/bin/python bench/bench_predict.py [MODEL.keras] [--images N] [--profile]

Without MODEL it uses models/<best>.keras named in metrics/summary.json; if there is none it
builds an untrained MobileNetV2 (alpha 0.35, 224 px, weights=None) stand-in and says so.
Images are the full-resolution originals in ../shared/data/raw_sample, repeated to --images.
Prints a table and writes bench/results/predict.json. Goals: ≥100 images/s, ≤50 ms per image.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common import ROOT, STANDIN_SIZE, build_standin, children_cpu, sample_files, timed, write_result
from cxr.errors import run_main
from cxr.inference import decode, load_images, load_model, predict_arrays, predict_files

GOAL_BATCH_IPS, GOAL_SINGLE_MS = 100.0, 50.0


def default_model() -> Path | None:
    summary = ROOT / "metrics" / "summary.json"
    if not summary.is_file():
        return None
    best = json.loads(summary.read_text()).get("best")
    path = ROOT / "models" / f"{best}.keras"
    return path if best and path.is_file() else None


def median_ms(fn: Any, repeats: int) -> float:
    return 1000 * statistics.median(timed(fn)[0] for _ in range(repeats))


def cold_start(model: Path, image: Path, repeats: int) -> tuple[float, float]:
    """Median wall and CPU time of the whole `cxr predict` command on one image, in seconds.

    CPU time is reported too because wall time on a shared machine mostly measures the others.
    """
    exe = Path(sys.executable).with_name("cxr")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "cxr.cli"]
    cmd += ["predict", str(image), "--model", str(model), "--format", "json"]
    walls, cpus = [], []
    for _ in range(repeats):
        cpu0 = children_cpu()
        seconds, proc = timed(lambda: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True))
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {proc.stderr.strip().splitlines()[-1:]}")
        walls.append(seconds)
        cpus.append(children_cpu() - cpu0)
    return statistics.median(walls), statistics.median(cpus)


def profile_top(fn: Any, n: int = 12) -> str:
    """The functions taking the most cumulative time in `fn` (cProfile)."""
    prof = cProfile.Profile()
    prof.runcall(fn)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(n)
    return buf.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="trained .keras model (default: the best variant)")
    parser.add_argument("--images", type=int, default=200, help="files per batch run (default 200)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="single-image runs (median)")
    parser.add_argument("--cold-runs", type=int, default=3, help="`cxr predict` runs (median)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the file batch run")
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="bench_predict_")
    model_path, standin = args.model or default_model(), False
    if model_path is None:
        (model_path, _), standin = build_standin(Path(tmp.name)), True
        print(f"no trained model (metrics/summary.json): using an UNTRAINED MobileNetV2 α0.35 {STANDIN_SIZE}px stand-in")

    load_s, loaded = timed(lambda: load_model(model_path))
    size = loaded.image_size
    files = sample_files(args.images)
    predict_files(files[:2], loaded, args.batch_size)  # trace the compiled call once
    cpu0 = time.process_time()
    files_s, preds = timed(lambda: predict_files(files, loaded, args.batch_size))
    files_cpu = time.process_time() - cpu0
    failed = [p.error for p in preds if not p.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} sample file(s) failed, e.g. {failed[0]}")
    decode_s, (x, _, _) = timed(lambda: load_images(files, size, loaded.resize))
    arrays_s, _ = timed(lambda: predict_arrays(loaded.model, x, args.batch_size))
    single_file_ms = median_ms(lambda: predict_files(files[:1], loaded, 1), args.repeats)
    single_array_ms = median_ms(lambda: predict_arrays(loaded.model, x[:1], 1), args.repeats)
    cold_s, cold_cpu = cold_start(model_path, files[0], args.cold_runs)

    n = len(files)
    results = {
        "model": "untrained MobileNetV2 alpha 0.35 stand-in"
        if standin
        else str(model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT) else model_path),
        "standin": standin,
        "image_size": size,
        "images": n,
        "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "load_model_s": round(load_s, 3),
        "files_images_per_s": round(n / files_s, 1),
        "files_cpu_ms_per_image": round(1000 * files_cpu / n, 2),
        # what the CPU time allows with every core free (the machine is shared: wall is worse)
        "cpu_bound_images_per_s_estimate": round((os.cpu_count() or 1) * n / files_cpu, 1),
        "decode_only_images_per_s": round(n / decode_s, 1),
        "arrays_images_per_s": round(n / arrays_s, 1),
        "decode_share_of_file_run": round(decode_s / (decode_s + arrays_s), 2),
        "single_file_ms_median": round(single_file_ms, 1),
        "single_array_ms_median": round(single_array_ms, 1),
        "cold_start_cli_s_median": round(cold_s, 2),
        "cold_start_cli_cpu_s_median": round(cold_cpu, 2),
        "goals": {"batch_images_per_s": GOAL_BATCH_IPS, "single_ms": GOAL_SINGLE_MS},
        "meets_batch_goal": n / files_s >= GOAL_BATCH_IPS,
        "meets_single_goal": single_file_ms <= GOAL_SINGLE_MS,
    }
    rows = [
        ("model load (in process)", f"{load_s:.2f} s", ""),
        (f"batch of {n} files (decode + model)", f"{n / files_s:.0f} img/s", f"goal ≥ {GOAL_BATCH_IPS:.0f}; {1000 * files_cpu / n:.1f} CPU ms/image"),
        ("  decode + resize only", f"{n / decode_s:.0f} img/s", f"{results['decode_share_of_file_run']:.0%} of the time"),
        ("  model only (arrays)", f"{n / arrays_s:.0f} img/s", ""),
        ("single file (decode + model), median", f"{single_file_ms:.1f} ms", f"goal ≤ {GOAL_SINGLE_MS:.0f}"),
        ("single array (model only), median", f"{single_array_ms:.1f} ms", ""),
        ("`cxr predict` 1 image, cold start", f"{cold_s:.2f} s", f"process start to exit; {cold_cpu:.1f} CPU s"),
    ]
    print(f"model: {results['model']} ({size} px), {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>12}  {note}")
    path = write_result("predict", results)
    print(f"wrote {path.relative_to(ROOT)}")
    if args.profile:
        # one thread, so cProfile sees the decoding too (the threaded run hides it in workers)
        sequential = lambda: predict_arrays(loaded.model, np.stack([decode(p, size, loaded.resize)[0] for p in files]), args.batch_size)  # noqa: E731
        print(profile_top(sequential, 16))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    run_main(main)
