"""`cxr serve` under load on loopback: good and bad uploads at once, answers checked, latency and memory.

    .venv/bin/python bench/bench_serve.py [MODEL.keras] [--requests 2000] [--concurrency 16] [--quick]

Starts `cxr serve` as a child process on 127.0.0.1 (a free port, --max-upload-mb 8), then sends
--requests POST /predict from --concurrency threads: the raw_sample originals (75%) mixed with
bad requests of every kind the service refuses (no file, empty, not an image, truncated JPEG,
decompression bomb, DICOM without pixels, over the upload limit), in a fixed shuffled order.
Checks: no 5xx, no connection error, every bad request its 4xx, every good answer equal to
`predict_files` on that file alone (what `cxr predict FILE` prints) to 1e-6. Reports p50/p99 latency and the server's
RSS before and after (and its peak). With Chromium on PATH it also uploads a sample through the
page and saves bench/results/serve_screenshot.png. Without MODEL it uses the best trained model
(metrics/summary.json) or an untrained stand-in (build_standin), and says so.
Writes bench/results/serve.json; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench_predict import default_model
from common import RESULTS, ROOT, build_standin, machine_info, sample_files, table, write_result
from testkit.serveapp import post_file

MAX_UPLOAD_MB = 8
GOOD_FRACTION = 0.75


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and its peak so far (VmHWM), MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb before inflating)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def bad_uploads(folder: Path, sample: bytes) -> dict[str, tuple[dict[str, Any], int]]:
    """kind → (post_file kwargs, expected status)."""
    from testkit.dicomfiles import write_dicom

    sr = write_dicom(
        folder / "sr.dcm",
        np.full((64, 64), 128, np.uint8),
        SOPClassUID="1.2.840.10008.5.1.4.1.1.88.11",
        Modality="SR",
        PixelData=None,
    )
    return {
        "no_file": ({"filename": None, "data": None}, 422),
        "empty": ({"filename": "empty.jpeg", "data": b""}, 422),
        "not_an_image": ({"filename": "notes.txt", "data": b"not an x-ray\n" * 100}, 415),
        "truncated_jpeg": ({"filename": "cut.jpeg", "data": sample[: len(sample) // 2]}, 415),
        "decompression_bomb": ({"filename": "bomb.png", "data": png_claiming(40_000, 40_000)}, 415),
        "dicom_without_pixels": ({"filename": "sr.dcm", "data": sr.read_bytes()}, 415),
        "over_limit": ({"filename": "big.jpeg", "data": sample + b"\0" * (MAX_UPLOAD_MB * 1024 * 1024)}, 413),
    }


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "cxr.serving.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-upload-mb",
        str(MAX_UPLOAD_MB),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"cxr serve did not start; see {log}") from None
            time.sleep(0.5)


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


# the page's cells and the answer fields (cxr.serving.present) they show verbatim
PAGE_CELLS = (("probability", "shown_probability"), ("label", "label"), ("reason", "reason"), ("ood", "ood_level"))


def screenshot(url: str, image: Path, want: dict[str, Any]) -> dict[str, Any]:
    """Upload `image` through the page in headless Chromium; save the screenshot."""
    from testkit.serveapp import chromium_paths, headless_chromium, upload_in_page

    if chromium_paths() is None:
        return {"taken": False, "why": "chromium/chromedriver not on PATH"}
    target = RESULTS / "serve_screenshot.png"
    with headless_chromium() as driver:
        page = upload_in_page(driver, url, image)
        driver.save_screenshot(str(target))
    same = all(page[cell] == want[key] for cell, key in PAGE_CELLS)
    return {
        "taken": True,
        "path": str(target.relative_to(ROOT)),
        "page_probability": page["probability"],
        "page_label": page["label"],
        "equals_predict": same,
    }


@dataclass
class LoadRun:
    """What one run of the requests against the server gave."""

    rows: list[dict[str, Any]]
    wall: float
    startup_s: float
    memory_before: dict[str, float]
    memory_after: dict[str, float]
    cpu_before: float
    cpu_after: float
    shot: dict[str, Any]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model",
        nargs="?",
        type=Path,
        help="a .keras file with its sidecar (default: the best trained model, else a stand-in)",
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="300 requests")
    args = parser.parse_args()
    if args.quick:
        args.requests = 300
    return args


def choose_model(given: Path | None, folder: Path) -> tuple[Path, bool, str | None]:
    """(model, is it the stand-in, the stand-in's backbone weights): `given`, else the best trained
    model, else a stand-in built in `folder`."""
    model, standin, weights = given or default_model(), False, None
    if model is None:
        (model, weights), standin = build_standin(folder), True
    return model, standin, weights


def expected_answers(samples: list[Path], loaded: Any) -> dict[str, dict[str, Any]]:
    """What `cxr predict FILE` prints for each file alone (a batch of one, as the service runs each upload)."""
    from cxr.serving.inference import predict_files
    from cxr.serving.present import answers

    return {p.name: answers(predict_files([p], loaded), loaded)[0] for p in samples}


def shuffled_jobs(good: dict[str, bytes], bad: dict[str, Any], requests: int) -> tuple[list[tuple[str, str]], int]:
    """(what, key) per request, GOOD_FRACTION of them good, in a fixed shuffled order; and how many are good."""
    rng = random.Random(0)
    n_good = round(GOOD_FRACTION * requests)
    jobs = [("good", name) for name in (list(good) * requests)[:n_good]]
    jobs += [("bad", kind) for kind in (list(bad) * requests)[: requests - n_good]]
    rng.shuffle(jobs)
    return jobs, n_good


# compared exactly (the probability to 1e-6): the raw fields and the presentation's texts
ANSWER_FIELDS = (
    "label",
    "threshold",
    "threshold_source",
    "ood_score",
    "ood",
    "ood_reason",
    "ood_detector",
    "refer_low",
    "refer_high",
    "finding",
    "shown_probability",
    "ood_level",
    "refer_band",
    "refer_val_coverage",
    "reason",
    "gradcam_caption",
)


def send(
    url: str, job: tuple[str, str], good: dict[str, bytes], bad: dict[str, Any], want: dict[str, Any]
) -> dict[str, Any]:
    """One POST /predict: its status against the expected one, its latency and, for a good file,
    whether the answer equals `predict_files`'."""
    what, key = job
    kwargs, status = ({"filename": key, "data": good[key]}, 200) if what == "good" else bad[key]
    t0 = time.perf_counter()
    try:
        got, body = post_file(url + "/predict", **kwargs, timeout=300)
    except Exception as exc:  # a dropped connection or a non-JSON answer is a failure to report, not to stop on
        return {
            "what": what,
            "key": key,
            "status": None,
            "error": type(exc).__name__,
            "ms": 1000 * (time.perf_counter() - t0),
        }
    ms = 1000 * (time.perf_counter() - t0)
    row = {"what": what, "key": key, "status": got, "expected": status, "ms": ms}
    if what == "good" and got == 200:
        w = want[key]
        row["equal"] = abs(body["probability"] - w["probability"]) <= 1e-6 and all(
            body[k] == w[k] for k in ANSWER_FIELDS
        )
    return row


def serve_under_load(
    model: Path,
    folder: Path,
    jobs: list[tuple[str, str]],
    concurrency: int,
    *,
    good: dict[str, bytes],
    bad: dict[str, Any],
    want: dict[str, Any],
    sample: Path,
) -> LoadRun:
    """Start `cxr serve`, send every job from `concurrency` threads (see `send`), measure the
    server, upload `sample` through the page for the screenshot, stop the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    proc = start_server(model, port, folder / "serve.log")
    startup_s = time.monotonic() - started
    try:
        memory_before, cpu_before = rss_mib(proc.pid), cpu_seconds(proc.pid)
        one = functools.partial(send, url, good=good, bad=bad, want=want)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            rows = list(pool.map(one, jobs))
        wall = time.perf_counter() - t0
        memory_after, cpu_after = rss_mib(proc.pid), cpu_seconds(proc.pid)
        shot = screenshot(url, sample, want[sample.name])
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return LoadRun(rows, wall, startup_s, memory_before, memory_after, cpu_before, cpu_after, shot)


def answer_checks(rows: list[dict[str, Any]], n_good: int, concurrency: int, bad: dict[str, Any]) -> dict[str, Any]:
    """How many requests got the status and the answer they should."""
    goods = [r for r in rows if r["what"] == "good" and r["status"] == 200]
    mismatches = sum(1 for r in goods if not r["equal"])
    return {
        "requests": len(rows),
        "concurrency": concurrency,
        "good_requests": n_good,
        "bad_requests": len(rows) - n_good,
        "bad_kinds": {
            k: {"expected_status": s, "count": sum(1 for r in rows if r["what"] == "bad" and r["key"] == k)}
            for k, (_, s) in bad.items()
        },
        "statuses": dict(sorted(Counter(str(r["status"]) for r in rows).items())),
        "server_errors_5xx": sum(1 for r in rows if r["status"] is not None and r["status"] >= 500),
        "connection_errors": sum(1 for r in rows if r["status"] is None),
        "wrong_status": sum(1 for r in rows if r["status"] is not None and r["status"] != r["expected"]),
        "good_answers_equal_to_predict": len(goods) - mismatches,
        "good_answers_different": mismatches,
    }


def server_figures(run: LoadRun) -> dict[str, Any]:
    """Latency percentiles, throughput, and the server's memory, CPU time and start-up time."""
    goods = [r for r in run.rows if r["what"] == "good" and r["status"] == 200]
    ms_all, ms_good, ms_bad = (
        [r["ms"] for r in run.rows],
        [r["ms"] for r in goods],
        [r["ms"] for r in run.rows if r["what"] == "bad"],
    )
    return {
        "latency_ms": {
            "all": {"p50": percentile(ms_all, 50), "p99": percentile(ms_all, 99)},
            "good": {"p50": percentile(ms_good, 50), "p99": percentile(ms_good, 99)},
            "bad": {"p50": percentile(ms_bad, 50), "p99": percentile(ms_bad, 99)},
        },
        "seconds": round(run.wall, 1),
        "requests_per_s": round(len(run.rows) / run.wall, 1),
        "server_rss_mib_before": run.memory_before["VmRSS"],
        "server_rss_mib_after": run.memory_after["VmRSS"],
        "server_rss_mib_peak": run.memory_after["VmHWM"],
        "server_cpu_s": round(run.cpu_after - run.cpu_before, 1),
        "server_startup_s": round(run.startup_s, 1),
    }


def passed(checks: dict[str, Any], shot: dict[str, Any]) -> bool:
    """No 5xx, no connection error, every status as expected, every good answer equal to predict_files."""
    ok = (
        checks["server_errors_5xx"] == 0
        and checks["connection_errors"] == 0
        and checks["wrong_status"] == 0
        and checks["good_answers_different"] == 0
        and checks["good_answers_equal_to_predict"] == checks["good_requests"]
    )
    return ok and shot.get("equals_predict", True)


def model_facts(model: Path, standin: bool, weights: str | None, loaded: Any) -> dict[str, Any]:
    from cxr.core.provenance import sha256_file

    return {
        "model": model.name if not standin else "standin.keras",
        "model_sha256": sha256_file(model),
        "standin": standin,
        "standin_backbone_weights": weights,
        "image_size": loaded.image_size,
        "ood_gate": loaded.gate is not None,
        "runtime": loaded.runtime,
    }


def print_table(result: dict[str, Any], run: LoadRun, distinct: int, n_files: int) -> None:
    lat = result["latency_ms"]
    n_good, n_rows = result["good_requests"], result["requests"]
    print(
        table(
            ["figure", "value"],
            [
                (
                    "requests (good / bad), concurrency",
                    f"{n_rows} ({n_good} / {n_rows - n_good}), {result['concurrency']}",
                ),
                ("statuses", ", ".join(f"{k}: {v}" for k, v in result["statuses"].items())),
                (
                    "5xx / connection errors / wrong 4xx",
                    f"{result['server_errors_5xx']} / {result['connection_errors']} / {result['wrong_status']}",
                ),
                (
                    "good answers equal to predict_files",
                    f"{result['good_answers_equal_to_predict']} of {n_good} "
                    f"({distinct} distinct probabilities over {n_files} files)",
                ),
                ("latency p50 / p99, all (ms)", f"{lat['all']['p50']} / {lat['all']['p99']}"),
                ("latency p50 / p99, good (ms)", f"{lat['good']['p50']} / {lat['good']['p99']}"),
                ("latency p50 / p99, bad (ms)", f"{lat['bad']['p50']} / {lat['bad']['p99']}"),
                ("throughput", f"{result['requests_per_s']} requests/s ({run.wall:.1f} s)"),
                (
                    "server RSS before → after (peak), MiB",
                    f"{run.memory_before['VmRSS']} → {run.memory_after['VmRSS']} ({run.memory_after['VmHWM']})",
                ),
                (
                    "model",
                    f"{result['model']}{' (UNTRAINED stand-in)' if result['standin'] else ''}, "
                    f"{result['image_size']} px",
                ),
                ("screenshot", run.shot.get("path") or run.shot.get("why")),
            ],
        )
    )


def main() -> int:
    args = parse_args()
    from cxr.serving.inference import load_model

    tmp = tempfile.TemporaryDirectory(prefix="bench-serve-")
    folder = Path(tmp.name)
    model, standin, weights = choose_model(args.model, folder)
    samples = sample_files()
    # what `cxr predict` and `cxr serve` use by default (the LiteRT export when there is one)
    loaded = load_model(model, runtime="auto")
    want = expected_answers(samples, loaded)
    distinct = len({round(w["probability"], 6) for w in want.values()})
    good = {p.name: p.read_bytes() for p in samples}
    bad = bad_uploads(folder, good[samples[0].name])
    jobs, n_good = shuffled_jobs(good, bad, args.requests)
    run = serve_under_load(model, folder, jobs, args.concurrency, good=good, bad=bad, want=want, sample=samples[0])

    checks = answer_checks(run.rows, n_good, args.concurrency, bad)
    result = {
        **checks,
        "distinct_probabilities_among_samples": f"{distinct} of {len(want)}",
        **server_figures(run),
        "max_upload_mb": MAX_UPLOAD_MB,
        **model_facts(model, standin, weights, loaded),
        "screenshot": run.shot,
        "ok": passed(checks, run.shot),
    }
    tmp.cleanup()
    path = write_result("serve", result, machine_info())
    print_table(result, run, distinct, len(want))
    print(f"wrote {path.relative_to(ROOT)}")
    if not result["ok"]:
        print("error: a check failed (see serve.json)", file=sys.stderr)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
