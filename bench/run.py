"""Every speed and quality figure against its goal, side by side.

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--reuse]     # or: make bench BENCH_ARGS=--quick

Benchmarks (NAME), each its own script run as a subprocess, or a reader of the pipeline's outputs:
  fetch       bench/bench_fetch.py       bytes sent ÷ compressed chest_xray size over a loopback Range server
  preprocess  bench/bench_preprocess.py  cxr.data.preprocess.decode_all on full-resolution JPEGs, vs plain PIL
  training    reads models/<v>.json (train_seconds, epochs_run) and metrics/summary.json
  repro       bench/bench_repro.py       no-op `dvc repro`; what one variant's param change reruns
  predict     bench/bench_predict.py     `cxr predict` batch throughput, single-image latency, cold start
  serve       bench/bench_serve.py       `cxr serve` on loopback: 2,000 good and bad uploads at concurrency 16
  quality     reads metrics/summary.json and metrics/<best>.json (test set, validation threshold)

--quick runs the scripts with fewer images and repeats (minutes instead of tens of minutes).
--reuse runs nothing and tabulates the JSON the scripts last wrote under bench/results/.
Prints ONE table "figure | goal | measured | met?" and writes bench/results/summary.json with the
machine (cores, CPU, load average), the git commit, the time and each benchmark's own JSON.
Exit status 0 whether goals are met or not; 1 if a benchmark script failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import RESULTS, ROOT, load_average, machine_info, machine_line, table

BENCH = ROOT / "bench"
NOT_RUN = "not run yet"
Row = dict[str, str]


def row(figure: str, goal: str, measured: str, met: bool | str | None) -> Row:
    if isinstance(met, bool):
        met = "yes" if met else "NO"
    return {"figure": figure, "goal": goal, "measured": measured, "met": met if met is not None else "n/a"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- rows per benchmark


def rows_fetch(r: dict[str, Any]) -> list[Row]:
    ranged, full = r["ranged"], r["full"]
    return [
        row(
            "fetch: bytes sent ÷ compressed chest_xray members (ranged, loopback, synthetic v3 archive)",
            "≤ 1.05",
            f"{ranged['ratio_to_chest_compressed']:.3f} ({ranged['requests']} "
            f"requests; whole download {full['ratio_to_chest_compressed']:.2f})",
            ranged["ratio_to_chest_compressed"] <= 1.05,
        ),
        row(
            "fetch: wall time, ranged vs whole download (loopback: no latency/bandwidth limit)",
            "ranged < whole",
            f"{ranged['seconds_median']:.2f} s vs {full['seconds_median']:.2f} "
            f"s ({r['speedup']}x, median of {r['repeats']})",
            ranged["seconds_median"] < full["seconds_median"],
        ),
    ]


def rows_preprocess(r: dict[str, Any]) -> list[Row]:
    m = r["methods"]
    names = list(m)
    real, plain_1, plain_n = m[names[0]], m[names[2]], m[names[3]]
    return [
        row(
            f"preprocess: decode_all, {r['images']} full-res JPEGs → "
            f"{r['sizes']} ({r['resize']}), {r['workers']} workers",
            "≥ 150 images/s",
            f"{real['images_per_s']:.0f} img/s ({real['cpu_ms_per_image']:.1f} CPU "
            f"ms/img); plain PIL {plain_n['images_per_s']:.0f} ({r['workers']} proc), "
            f"{plain_1['images_per_s']:.0f} (1 proc)",
            r["goal_met"],
        )
    ]


def rows_repro(r: dict[str, Any]) -> list[Row]:
    noop, pc = r["noop_repro"], r["param_change"]
    project = "real project" if r["project"] == "real" else "tiny synthetic project (lower bound)"
    out = [
        row(
            f"`dvc repro`, nothing changed ({project})",
            "≤ 3 s, no stage runs",
            f"{noop['seconds_median']:.2f} s median of {len(noop['seconds_all'])} "
            f"({noop.get('cpu_s_median', '?')} CPU s); ran: {', '.join(noop['stages_ran']) or 'nothing'}",
            noop["goal_met"],
        ),
        row(
            f"one variant's param changed ({pc['param']} ×10, scratch copy of the {r['project']} project)",
            "reruns only " + ", ".join(pc["expected"]),
            "would rerun: "
            + (", ".join(pc["would_rerun"]) or "nothing")
            + ("; ran: " + ", ".join(pc["actually_ran"]) if "actually_ran" in pc else ""),
            pc["goal_met"],
        ),
    ]
    if "full_repro_s" in r:  # bench_repro.py --full (not rerun by bench/run.py: ~30 min)
        full = r["full_repro"]
        out.append(
            row(
                f"default `make repro` from a fresh clone ({full['stages_run']} stages, {full['commit']}; "
                "bench_repro.py --full)",
                f"≤ {full['goal_s'] // 60} min",
                f"{r['full_repro_s'] / 60:.1f} min",
                full["goal_met"],
            )
        )
    else:
        out.append(row("default `make repro` from a fresh clone", "≤ 30 min", "run bench_repro.py --full", None))
    return out


def rows_predict(r: dict[str, Any]) -> list[Row]:
    model = "UNTRAINED stand-in" if r.get("standin") else r.get("model", "?")
    if "runtimes" not in r:  # written before the LiteRT runtime: rerun bench_predict
        return [row("`cxr predict` (LiteRT runtime)", "rerun bench/bench_predict.py", NOT_RUN, None)]
    k, lite = r["runtimes"]["keras"], r["runtimes"]["litert"]
    return [
        row(
            f"`cxr predict` batch ÷ ceiling 1/(1/decode + 1/model): {r['images']} full-res files ({model}, "
            f"{r['image_size']} px), LiteRT",
            "≥ 0.9",
            f"{lite['throughput_over_ceiling']:.2f} ({lite['files_images_per_s']:.0f} vs "
            f"{lite['ceiling_images_per_s']:.0f} img/s; Keras {k['throughput_over_ceiling']:.2f})",
            r["meets_throughput_goal"],
        )
        if "throughput_over_ceiling" in lite
        else row("`cxr predict` batch ÷ ceiling (LiteRT)", "≥ 0.9", "rerun bench/bench_predict.py", None),
        row(
            "`cxr predict` one image after load, decode + model (median), LiteRT",
            "≤ 10 ms",
            f"{lite['single_file_ms_median']:.1f} ms (Keras {k['single_file_ms_median']:.1f} ms)",
            r["meets_single_goal"],
        ),
        row(
            "`cxr predict` cold start, 1 image (process start → exit), LiteRT",
            "≤ 1.0 s",
            f"{lite['cold_start_cli_s_median']:.2f} s wall, {lite['cold_start_cli_cpu_s_median']:.2f} "
            f"CPU s (Keras {k['cold_start_cli_s_median']:.1f} s)",
            r["meets_cold_goal"],
        ),
    ]


def rows_serve(r: dict[str, Any]) -> list[Row]:
    model = "UNTRAINED stand-in" if r.get("standin") else r.get("model", "?")
    lat = r["latency_ms"]["all"]
    return [
        row(
            f"`cxr serve`: {r['requests']} uploads ({r['bad_requests']} bad, {len(r['bad_kinds'])} "
            f"kinds) at concurrency {r['concurrency']}, loopback ({model}, {r['image_size']} px)",
            "0 5xx; every bad one its 4xx; answers = `cxr predict`",
            f"{r['server_errors_5xx']} 5xx, {r['connection_errors']} dropped, {r['wrong_status']} wrong 4xx; "
            f"{r['good_answers_equal_to_predict']} of {r['good_requests']} equal",
            r["ok"],
        ),
        row(
            "`cxr serve` latency p50 / p99 under that load; server RSS before → after",
            "(no goal set)",
            f"{lat['p50']:.0f} / {lat['p99']:.0f} ms, {r['requests_per_s']:.0f} requests/s; "
            f"{r['server_rss_mib_before']:.0f} → {r['server_rss_mib_after']:.0f} MiB",
            None,
        ),
    ]


def variant_names() -> list[str]:
    """Every model of the default pipeline: the variants and the k-fold ensembles (cxr.core.params)."""
    from cxr.core import params as cxr_params

    return cxr_params.load(ROOT / "params.yaml").model_names


def read_sidecar(name: str) -> Any:
    """models/<name>.json through cxr.model.sidecar (its one reader), or None when not trained yet."""
    from cxr.core.errors import CxrError
    from cxr.model import sidecar

    try:
        return sidecar.read(ROOT / "models" / f"{name}.keras")
    except CxrError:
        return None


def fetch_source() -> str | None:
    """The fetch.source the last repro used (dvc.lock), else params.yaml's."""
    import yaml

    lock = ROOT / "dvc.lock"
    try:
        if lock.is_file():
            return yaml.safe_load(lock.read_text())["stages"]["fetch"]["params"]["params.yaml"]["fetch"]["source"]
    except (KeyError, TypeError, ValueError):
        pass
    return None


def read_training() -> tuple[list[Row], dict[str, Any]]:
    names = variant_names()
    sidecars = {v: read_sidecar(v) for v in names}
    summary = read_json(ROOT / "metrics" / "summary.json")
    done = {
        v: {"train_seconds": s.train_seconds, "epochs_run": s.epochs_run, "image_size": s.image_size}
        for v, s in sidecars.items()
        if s is not None
    }
    data = {
        "variants": done,
        "source": fetch_source(),
        "best": (summary or {}).get("best"),
    }
    if not done:
        return [
            row(
                "training: each default variant's wall time and epochs",
                "total ≤ 45 min; best ≤ 15 min",
                NOT_RUN + " (no models/<v>.json)",
                NOT_RUN,
            )
        ], data
    src = f" (source {data['source']})" if data["source"] else ""
    rows = [
        row(
            f"training: {v} ({s.get('image_size')} px)",
            "",
            f"{s['train_seconds'] / 60:.1f} min, {s.get('epochs_run')} epochs",
            None,
        )
        for v, s in done.items()
    ]
    total = sum(s["train_seconds"] for s in done.values())
    missing = [v for v in names if v not in done]
    data["total_seconds"] = total
    rows.append(
        row(
            f"training: all {len(names)} default models (an ensemble counts its fold models), total{src}",
            "≤ 45 min",
            f"{total / 60:.1f} min" + (f" (missing: {', '.join(missing)})" if missing else ""),
            (total <= 45 * 60) if not missing else "incomplete",
        )
    )
    best = data["best"]
    if best in done:
        rows.append(
            row(
                f"training: best model ({best}), all it needs",
                "≤ 15 min",
                f"{done[best]['train_seconds'] / 60:.1f} min",
                done[best]["train_seconds"] <= 900,
            )
        )
    else:
        rows.append(row("training: best model", "≤ 15 min", NOT_RUN + " (no metrics/summary.json)", NOT_RUN))
    return rows, data


QUALITY_GOALS = (
    ("accuracy", 0.95, "acc"),
    ("sensitivity", 0.97, "sens"),
    ("specificity", 0.92, "spec"),
    ("roc_auc", 0.985, "AUC"),
)


def read_quality() -> tuple[list[Row], dict[str, Any]]:
    summary = read_json(ROOT / "metrics" / "summary.json")
    best = (summary or {}).get("best")
    metrics = read_json(ROOT / "metrics" / f"{best}.json") if best else None
    if not best or not isinstance(metrics, dict):
        return [
            row(
                "quality of the best variant on the official test set",
                "acc ≥ 95%, sens ≥ 97%, spec ≥ 92%, AUC ≥ 0.985",
                NOT_RUN + " (no metrics/summary.json)",
                NOT_RUN,
            )
        ], {}
    rows, data = [], {"best": best, "threshold": metrics.get("threshold"), "n_test": metrics.get("n_test")}
    for key, goal, short in QUALITY_GOALS:
        value = metrics.get(key)
        ci = (metrics.get("ci95") or {}).get(key)
        data[key] = value
        shown = "n/a" if value is None else (f"{value:.4f}" if key == "roc_auc" else f"{100 * value:.1f}%")
        if ci and value is not None:
            shown += (
                f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})"
                if key == "roc_auc"
                else f" (95% CI {100 * ci[0]:.1f}–{100 * ci[1]:.1f}%)"
            )
        goal_s = f"≥ {goal}" if key == "roc_auc" else f"≥ {100 * goal:.0f}%"
        rows.append(
            row(
                f"quality: {best} test {short} (threshold {metrics.get('threshold', float('nan')):.3f} "
                f"from validation, n={metrics.get('n_test')})",
                goal_s,
                shown,
                None if value is None else value >= goal,
            )
        )
    return rows, data


# ----------------------------------------------------------------------------- runner


@dataclass
class Bench:
    name: str
    script: str | None = None  # bench/<script>, run as a subprocess
    args: list[str] = field(default_factory=list)
    quick_args: list[str] = field(default_factory=list)
    result: str | None = None  # bench/results/<result>
    rows: Callable[[dict[str, Any]], list[Row]] | None = None
    reader: Callable[[], tuple[list[Row], dict[str, Any]]] | None = None


BENCHES = [
    Bench("fetch", "bench_fetch.py", [], ["--repeats", "2"], "fetch.json", rows_fetch),
    Bench("preprocess", "bench_preprocess.py", ["--profile"], ["--quick"], "preprocess.json", rows_preprocess),
    Bench("training", reader=read_training),
    Bench("repro", "bench_repro.py", ["--run"], ["--quick"], "repro.json", rows_repro),
    Bench(
        "predict",
        "bench_predict.py",
        [],
        ["--images", "64", "--repeats", "10", "--cold-runs", "1"],
        "predict.json",
        rows_predict,
    ),
    Bench("serve", "bench_serve.py", [], ["--quick"], "serve.json", rows_serve),
    Bench("quality", reader=read_quality),
]


def subprocess_env() -> dict[str, str]:
    """What `make bench` exports (Makefile), for when run.py is called directly."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("PYTHONHASHSEED", "0")
    keras = ROOT.parent / "shared" / "keras"
    if "KERAS_HOME" not in env and (keras / "models").is_dir():
        env["KERAS_HOME"] = str(keras)
    return env


def run_one(b: Bench, quick: bool, reuse: bool, timeout: int) -> dict[str, Any]:
    record: dict[str, Any] = {"name": b.name}
    if b.reader:
        rows, data = b.reader()
        record.update(rows=rows, data=data, ok=True)
        return record
    assert b.script and b.result and b.rows
    path = RESULTS / b.result
    record["result_file"] = str(path.relative_to(ROOT))
    if not reuse:
        cmd = [sys.executable, str(BENCH / b.script), *(b.quick_args if quick else b.args)]
        record.update(command=" ".join(cmd[1:]), load_average_before=load_average())
        print(f"\n=== {b.name}: {' '.join(cmd[1:])}", flush=True)
        started = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), timeout=timeout)
            record["returncode"] = proc.returncode
        except subprocess.TimeoutExpired:
            record["returncode"] = "timeout"
        record["seconds"] = round(time.time() - started, 1)
        record["load_average_after"] = load_average()
        fresh = path.is_file() and path.stat().st_mtime >= started
        if record["returncode"] != 0 or not fresh:
            why = (
                f"exit {record['returncode']}"
                if record["returncode"] != 0
                else f"{record['result_file']} not rewritten"
            )
            record.update(ok=False, rows=[row(f"{b.name}", "", f"FAILED ({why}); see the output above", "failed")])
            return record
    data = read_json(path)
    if not isinstance(data, dict):
        # a missing result in --reuse mode is not a failure; an unreadable fresh one is
        record.update(ok=reuse, rows=[row(b.name, "", NOT_RUN + f" (no {record['result_file']})", NOT_RUN)])
        return record
    try:
        rows = b.rows(data)
    except (KeyError, TypeError, ValueError) as exc:
        record.update(ok=False, rows=[row(b.name, "", f"unreadable {record['result_file']} ({exc!r})", "failed")])
        return record
    loads = [record.get("load_average_before"), record.get("load_average_after")]
    if not reuse and all(loads):
        note = f"; load {loads[0][0]}→{loads[1][0]}"
    else:
        m = data.get("machine") or {}
        note = f"; load {m['load_average_1_5_15'][0]}" if m.get("load_average_1_5_15") else ""
    for r in rows:
        r["measured"] += note
    if reuse:
        stamp = (data.get("machine") or {}).get("timestamp") or time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime)
        ) + " (file time)"
        for r in rows:
            r["figure"] += f" [from {stamp}]"
    record.update(ok=True, rows=rows, data=data)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(b.name for b in BENCHES)}",
    )
    parser.add_argument("--quick", action="store_true", help="fewer images and repeats")
    parser.add_argument(
        "--reuse", action="store_true", help="run nothing; tabulate bench/results/*.json as last written"
    )
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark script (default 3600)")
    args = parser.parse_args()
    known = {b.name for b in BENCHES}
    only = {n.strip() for item in args.only for n in item.split(",") if n.strip()}
    if only - known:
        parser.error(
            f"unknown benchmark(s) {', '.join(sorted(only - known))}; known: {', '.join(b.name for b in BENCHES)}"
        )

    machine = machine_info()
    started = time.time()
    records = [run_one(b, args.quick, args.reuse, args.timeout) for b in BENCHES if not only or b.name in only]
    rows = [r for rec in records for r in rec["rows"]]
    machine_after = machine_info()

    print(
        f"\n{machine_line(machine)}; load average after: "
        f"{machine_after['load_average_1_5_15'][0] if machine_after['load_average_1_5_15'] else '?'}"
        f"{'; --quick' if args.quick else ''}{'; --reuse (figures from earlier runs)' if args.reuse else ''}"
    )
    print(
        table(["figure", "goal", "measured", "met?"], [(r["figure"], r["goal"], r["measured"], r["met"]) for r in rows])
    )
    summary = {
        "timestamp": machine["timestamp"],
        "git_commit": machine["git_commit"],
        "machine": machine,
        "machine_after": machine_after,
        "quick": args.quick,
        "reuse": args.reuse,
        "only": sorted(only),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "benchmarks": {rec["name"]: {k: v for k, v in rec.items() if k not in ("name", "rows")} for rec in records},
    }
    from cxr.core.io import write_json

    write_json(RESULTS / "summary.json", summary)
    print(f"wrote {(RESULTS / 'summary.json').relative_to(ROOT)}")
    return 0 if all(rec["ok"] for rec in records) else 1


if __name__ == "__main__":
    sys.exit(main())
