"""DVC overhead: a no-op `dvc repro`, and what one variant's parameter change makes rerun; with
--full, the whole default pipeline from a fresh clone.

    .venv/bin/python bench/bench_repro.py [--repeats 3] [--variant cnn_baseline] [--run] [--quick]
    .venv/bin/python bench/bench_repro.py --full [--source ../shared/data/chest_xray_224.zip]

Which project it measures (stated in the output and the JSON as "project"):
  real  when dvc.lock exists in the project root and `dvc status` there is clean: `dvc repro`
        is timed in place (it has nothing to do, so it changes nothing; rechecked before each run).
  tiny  otherwise: a throw-away git+DVC project in a temp folder, the tests' tiny_pipeline
        (testkit.pipeline.build_tiny_pipeline: synthetic archive, every variant at a few dozen px for
        1 epoch), fully reproduced once, then timed. Its data folders hold a few dozen files, so hashing
        costs less than in the real project with ~5,900 images: read it as a lower bound.

Goal 1: a no-op `dvc repro` takes ≤ 3 s (median of --repeats) and runs no stage.
Goal 2: after changing one variant's parameter (learning_rate × 10, in a scratch copy: the
project's params.yaml is never touched) only train@<v>, evaluate@<v> and report would rerun.
Measured with `dvc status --json` (the stages whose own inputs changed) and
`dvc repro --dry --force-downstream` (those plus every stage downstream of them: what a real
repro reruns once the new model differs). --run (tiny project only) also runs the repro and
lists the stages that actually ran. Writes bench/results/repro.json.

--full (goal 3: the default `make repro` within 30 minutes on 2 cores): `git clone` of this
checkout's last commit into a temporary folder (no outputs, an empty DVC cache, no run cache),
then what `make repro SOURCE=...` runs once the venv exists, `dvc exp run -S fetch.source=...`,
with this venv's tools and the clone's own code (PYTHONPATH). Installing the venv is left out
(it depends on the network, not on the pipeline). Wall time per stage, from the moment DVC
starts it to the next one, goes to repro.json `full_repro` (minutes) and the total to
`full_repro_s`; the other keys of repro.json are kept, and --full keeps theirs. Run it on an
otherwise idle machine: the figure is about the cores, and a neighbour's load lands in it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from common import RESULTS, ROOT, children_cpu, machine_info, machine_line, median, table, write_result
from testkit.pipeline import DVC, CommandError, build_tiny_pipeline, sh

GOAL_NOOP_S = 3.0
GOAL_FULL_S = 30 * 60
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "chest_xray_224.zip"


def ran(done: subprocess.CompletedProcess) -> list[str]:
    return sorted(set(re.findall(r"Running stage '([^']+)'", done.stdout + done.stderr)))


def status(work: Path) -> dict[str, Any]:
    out = sh(work, DVC, "status", "--json").stdout.strip()
    return json.loads(out[out.index("{") :]) if "{" in out else {}


# ----------------------------------------------------------------------------- projects


def real_project_clean() -> tuple[bool, str]:
    if not (ROOT / "dvc.lock").is_file():
        return False, "no dvc.lock in the project (the pipeline has not been run here)"
    try:
        st = status(ROOT)
    except CommandError as exc:
        return False, f"`dvc status` failed: {str(exc).splitlines()[0]}"
    if st:
        return False, f"`dvc status` is not clean ({', '.join(sorted(st))} changed)"
    return True, "dvc.lock present and `dvc status` clean"


def build_tiny(folder: Path) -> tuple[Path, float]:
    """The tests' tiny pipeline (testkit.pipeline.build_tiny_pipeline), reproduced once."""
    start = time.perf_counter()
    work, _ = build_tiny_pipeline(folder)
    return work, time.perf_counter() - start


def scratch_copy(origin: Path, dest: Path) -> Path:
    """A working copy of `origin` (its git-visible files, committed or not) sharing its DVC cache;
    outputs are checked out as symlinks into that cache, so nothing large is copied."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=origin, capture_output=True, text=True, check=True
    ).stdout
    for rel in filter(None, listed.split("\0")):
        src = origin / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel in ("dvc.lock", ".dvc/config"):
        if (origin / rel).is_file() and not (dest / rel).exists():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin / rel, dest / rel)
    # a commit, not just `git init`: DVCLive (train stage) fails in a repo without one
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "scratch copy")
    sh(dest, DVC, "cache", "dir", "--local", str(origin / ".dvc" / "cache"))
    sh(dest, DVC, "config", "--local", "cache.type", "symlink")
    sh(dest, DVC, "config", "--local", "core.analytics", "false")
    sh(dest, DVC, "checkout", "-q")
    # outputs with `cache: false` (metrics, plots, audit.json) are not in the cache, and some
    # sit under git-ignored folders (/data/): copy those the checkout could not restore
    lock = yaml.safe_load((origin / "dvc.lock").read_text()) if (origin / "dvc.lock").is_file() else {}
    for stage in (lock or {}).get("stages", {}).values():
        for out in stage.get("outs", []):
            src, dst = origin / out["path"], dest / out["path"]
            if src.exists() and not dst.exists() and not dst.is_symlink():
                dst.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return dest


# ----------------------------------------------------------------------------- measurements


def time_noop(work: Path, repeats: int, recheck: bool) -> dict[str, Any]:
    seconds, cpu, stages_ran = [], [], []
    for _ in range(repeats):
        if recheck and status(work):
            raise CommandError(f"`dvc status` in {work} is no longer clean; not running `dvc repro` there")
        start, cpu0 = time.perf_counter(), children_cpu()
        done = sh(work, DVC, "repro")
        seconds.append(time.perf_counter() - start)
        cpu.append(children_cpu() - cpu0)  # less dependent on the neighbours than wall time
        stages_ran += ran(done)
    start = time.perf_counter()
    status(work)
    status_s = time.perf_counter() - start
    med = median(seconds)
    return {
        "seconds_median": round(med, 2),
        "seconds_all": [round(s, 2) for s in seconds],
        "cpu_s_median": round(median(cpu), 2),
        "stages_ran": sorted(set(stages_ran)),
        "dvc_status_s": round(status_s, 2),
        "goal_s": GOAL_NOOP_S,
        "goal_met": med <= GOAL_NOOP_S and not stages_ran,
    }


def param_change(origin: Path, variant: str, run: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-repro-scratch-") as tmp:
        work = scratch_copy(origin, Path(tmp) / "work")
        baseline = status(work)
        params = yaml.safe_load((work / "params.yaml").read_text())
        if variant not in params["variants"]:
            raise SystemExit(f"--variant {variant}: not in params.yaml variants ({', '.join(params['variants'])})")
        old = params["variants"][variant]["learning_rate"]
        params["variants"][variant]["learning_rate"] = old * 10
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        direct = sorted(status(work))
        dry = sh(work, DVC, "repro", "--dry", "--force-downstream")
        would = ran(dry)
        result: dict[str, Any] = {
            "param": f"variants.{variant}.learning_rate",
            "old": old,
            "new": old * 10,
            "status_before_change": sorted(baseline),
            "dvc_status_changed": direct,
            "would_rerun": would,
            "expected": sorted({f"train@{variant}", f"evaluate@{variant}", "report"}),
        }
        # init_from chains (transfer_finetuned starts from models/transfer_frozen.keras) rerun by design
        chained = sorted(
            f"train@{k}" for k, v in params["variants"].items() if v.get("init_from") == f"models/{variant}.keras"
        )
        if chained:
            result["expected"] = sorted(
                set(result["expected"]) | set(chained) | {f"evaluate@{c.split('@')[1]}" for c in chained}
            )
        result["goal_met"] = not baseline and set(would) == set(result["expected"])
        if run:
            try:
                result["actually_ran"] = ran(sh(work, DVC, "repro"))
            except CommandError as exc:
                result["actually_ran"] = []
                result["run_error"] = [line for line in str(exc).splitlines() if line.strip()][-3:]
            result["goal_met"] = result["goal_met"] and set(result["actually_ran"]) == set(result["expected"])
        return result


def full_repro(source: Path) -> dict[str, Any]:
    """The default pipeline from a fresh clone, timed per stage (see the module docstring)."""
    if not source.exists():
        raise SystemExit(f"--source {source}: not found (the mirror zip is ../shared/data/chest_xray_224.zip)")
    env = {
        "KERAS_HOME": os.environ.get("KERAS_HOME", str(ROOT.parent / "shared" / "keras")),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONHASHSEED": "0",
    }
    with tempfile.TemporaryDirectory(prefix="bench-repro-full-") as tmp:
        work = Path(tmp) / "clone"
        sh(Path(tmp), "git", "clone", "-q", str(ROOT), str(work))
        commit = sh(work, "git", "rev-parse", "--short", "HEAD").stdout.strip()
        command = [DVC, "exp", "run", "-S", f'fetch.source="{source.resolve()}"']
        full_env = {
            **os.environ,
            **env,
            "PYTHONPATH": str(work),
            "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        }
        print(f"full repro of {commit} in {work}: {' '.join(command[1:])}", flush=True)
        starts: list[tuple[str, float]] = []
        tail: list[str] = []
        start = time.perf_counter()
        with subprocess.Popen(
            command, cwd=work, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail = (tail + [line.rstrip()])[-30:]
                found = re.search(r"Running stage '([^']+)'", line)
                if found:
                    starts.append((found.group(1), time.perf_counter() - start))
                    print(f"[{starts[-1][1] / 60:5.1f} min] {found.group(1)}", flush=True)
        total = time.perf_counter() - start
        if proc.returncode != 0:
            raise CommandError("the full repro failed:\n" + "\n".join(tail))
    ends = [s for _, s in starts[1:]] + [total]
    minutes = {name: round((end - begin) / 60, 2) for (name, begin), end in zip(starts, ends)}
    kinds: dict[str, float] = {}
    for name, m in minutes.items():
        kinds[name.split("@")[0]] = round(kinds.get(name.split("@")[0], 0) + m, 2)
    return {
        "full_repro_s": round(total, 1),
        "full_repro": {
            "commit": commit,
            "source": str(source),
            "command": "dvc exp run -S fetch.source=<source> (what `make repro SOURCE=...` runs after the venv)",
            "stages_run": len(minutes),
            "minutes_per_stage": minutes,
            "minutes_per_kind": kinds,
            "goal_s": GOAL_FULL_S,
            "goal_met": total <= GOAL_FULL_S,
        },
    }


def keep_other_keys(result: dict[str, Any], full: bool) -> dict[str, Any]:
    """repro.json holds both measurements: a run of one kind keeps the other kind's keys."""
    path = RESULTS / "repro.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return result
    if full:
        kept = {k: v for k, v in old.items() if not k.startswith("full_repro") and k != "machine"}
        return {**kept, **result, "machine_noop": old.get("machine_noop", old.get("machine"))}
    kept = {k: v for k, v in old.items() if k.startswith("full_repro") or k == "machine_full"}
    return {**result, **kept}


def main_full(source: Path) -> int:
    before = machine_info()
    result = full_repro(source)
    after = machine_info()
    full = result["full_repro"]
    print(f"{machine_line(before)}")
    rows = [(f"  {kind}", f"{m:.1f} min", "", "") for kind, m in full["minutes_per_kind"].items()]
    rows.insert(
        0,
        (
            f"default `make repro` from a fresh clone ({full['stages_run']} stages, {full['commit']})",
            f"{result['full_repro_s'] / 60:.1f} min",
            f"≤ {GOAL_FULL_S // 60} min",
            "met" if full["goal_met"] else "NOT met",
        ),
    )
    print(table(["figure", "measured", "goal", "met?"], rows))
    result["machine_full"] = {**before, "load_average_after": after["load_average_1_5_15"]}
    path = write_result("repro", keep_other_keys(result, full=True), after)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="no-op repro runs (median)")
    parser.add_argument(
        "--variant", default="cnn_baseline", help="variant whose learning_rate is changed in the scratch copy"
    )
    parser.add_argument("--run", action="store_true", help="tiny project only: also run the repro after the change")
    parser.add_argument("--tiny", action="store_true", help="use the tiny project even when the real one is clean")
    parser.add_argument(
        "--tiny-dir", type=Path, help="build the tiny project here and keep it; reuse it when it is already built"
    )
    parser.add_argument(
        "--quick", action="store_true", help="same as the defaults without --run (the tiny build dominates)"
    )
    parser.add_argument(
        "--full", action="store_true", help="time the whole default pipeline from a fresh clone (~30 min)"
    )
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="fetch.source for --full")
    args = parser.parse_args()
    if args.full:
        return main_full(args.source)
    before = machine_info()
    clean, why = (False, "--tiny given") if args.tiny else real_project_clean()
    result: dict[str, Any] = {"project": "real" if clean else "tiny", "why": why}
    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmp:
        if clean:
            origin = ROOT
        elif args.tiny_dir and (args.tiny_dir / "origin" / "dvc.lock").is_file():
            origin = args.tiny_dir / "origin"
            print(f"real project not usable ({why}): reusing the tiny project in {origin}", flush=True)
        else:
            folder = args.tiny_dir or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            print(
                f"real project not usable ({why}): building the tiny synthetic project in {folder} (a few minutes)…",
                flush=True,
            )
            origin, build_s = build_tiny(folder)
            result["tiny_first_repro_s"] = round(build_s, 1)
        result["noop_repro"] = time_noop(origin, args.repeats, recheck=clean)
        result["param_change"] = param_change(origin, args.variant, run=args.run and not clean)
    after = machine_info()
    result["machine_before"] = before
    noop, pc = result["noop_repro"], result["param_change"]
    print(f"project: {result['project']} ({why}); {machine_line(before)}")
    rows = [
        (
            "no-op `dvc repro` (median)",
            f"{noop['seconds_median']:.2f} s {noop['seconds_all']}, {noop['cpu_s_median']:.2f} CPU s",
            f"≤ {GOAL_NOOP_S:.0f} s, no stage runs",
            f"{'met' if noop['goal_met'] else 'NOT met'}; stages run: {noop['stages_ran'] or 'none'}",
        ),
        ("`dvc status` (no-op)", f"{noop['dvc_status_s']:.2f} s", "", ""),
        (f"{pc['param']} ×10: `dvc status`", ", ".join(pc["dvc_status_changed"]) or "nothing", "", ""),
        (
            "  would rerun (repro --dry --force-downstream)",
            ", ".join(pc["would_rerun"]) or "nothing",
            ", ".join(pc["expected"]),
            "met" if pc["goal_met"] else "NOT met",
        ),
    ]
    if "actually_ran" in pc:
        rows.append(("  actually ran (`dvc repro`)", ", ".join(pc["actually_ran"]), "", ""))
    print(table(["figure", "measured", "goal", "met?"], rows))
    print(f"load average after: {after['load_average_1_5_15']}")
    path = write_result("repro", keep_other_keys(result, full=False), after)
    print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
