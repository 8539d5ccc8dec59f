"""A tiny real pipeline for tests and benchmarks, and the way to run commands in it.

    work, first_repro = build_tiny_pipeline(tmp_folder)   # tests/conftest.py (tiny_pipeline), bench/bench_repro.py
    sh(work, DVC, "status")                               # CommandError if it exits non-zero

`build_tiny_pipeline` copies this checkout's pipeline (PIPELINE_FILES, cxr/, stages/, params.yaml shrunk by
`tiny_params`) into a new git+DVC repository, points it at a synthetic archive (testkit.synth)
and runs `dvc repro --all-pipelines` once (both pipeline files), so it needs the source checkout,
not just the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project checkout this folder sits in
DVC = str(Path(sys.executable).with_name("dvc"))
# The default pipeline, then the opt-in one (its stages run in the project root: wdir ..).
PIPELINE_FILES = ("dvc.yaml", "screened/dvc.yaml")


def stage_name(file: str, name: str) -> str:
    """How DVC names a stage: plain in the root dvc.yaml, `<file>:<name>` in another one."""
    return name if file == PIPELINE_FILES[0] else f"{file}:{name}"


def pipeline_stages(root: Path = ROOT) -> dict[str, dict]:
    """Every stage of both pipeline files as written (foreach templates unexpanded), by DVC's name."""
    import yaml

    return {
        stage_name(file, name): stage
        for file in PIPELINE_FILES
        for name, stage in yaml.safe_load((root / file).read_text())["stages"].items()
    }


def lock_stages(root: Path) -> dict[str, dict]:
    """Every stage recorded in the dvc.lock beside each pipeline file (foreach expanded), by DVC's name."""
    import yaml

    found = {}
    for file in PIPELINE_FILES:
        lock = root / Path(file).with_suffix(".lock")
        if lock.is_file():
            for name, entry in yaml.safe_load(lock.read_text())["stages"].items():
                found[stage_name(file, name)] = entry
    return found


class CommandError(RuntimeError):
    """A command run by `sh` exited non-zero; the message holds the end of its output."""


def sh(
    cwd: Path, *args: str, timeout: int = 900, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a command in `cwd` as `make repro` would: the venv's tools first on PATH, `cxr` imported
    from `cwd` (PYTHONPATH), a throw-away git identity; raise CommandError on failure if `check`."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(cwd),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
        **(env or {}),
    }
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env.setdefault("PYTHONHASHSEED", "0")  # as the Makefile sets it
    done = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise CommandError(
            f"`{' '.join(map(str, args))}` in {cwd} failed "
            f"({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


TINY_SIZE = 48  # the seed's CNN needs ≥ 46 px for its four poolings


def tiny_params(source: Path, backbone_weights: Path) -> dict:
    """The project's params.yaml shrunk so that the whole pipeline runs in about a minute.
    `backbone_weights`: from `write_backbone_weights` (testkit.backbone), at `TINY_SIZE` and
    transfer.alpha."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["source"] = str(source)
    params["split"]["val_fraction"] = 0.3
    params["split"]["folds"] = 2  # each fold of ~19 patients still holds both classes
    params["cv"]["folds"] = [0, 1]
    params["ood"]["family_size"] = 6  # images per non-X-ray family: the logic, not the statistics
    # Nothing to download in a test, yet not `none`: that backbone answers one probability for
    # every image (see testkit/backbone.py).
    params["transfer"]["weights"] = str(backbone_weights)
    params["evaluate"]["bootstrap_samples"] = 50
    params["report"]["gradcam_per_outcome"] = 1
    for v in params["variants"].values():
        v["image_size"] = TINY_SIZE
        v["epochs"] = 1
        v["batch_size"] = 8
        # A variant's own backbone and width: the one weights file must fit it too, so the
        # EfficientNet-Lite probes run on transfer's backbone here (tests/model covers Lite).
        if "backbone" in v or "alpha" in v:
            v["backbone"] = params["transfer"]["backbone"]
            v["alpha"] = params["transfer"]["alpha"]
    return params


def build_tiny_pipeline(folder: Path) -> tuple[Path, subprocess.CompletedProcess]:
    """folder/origin: a git+DVC copy of the project's pipeline with tiny params and a synthetic archive
    (folder/archive.zip), after one `dvc repro`, committed. Returns it and that repro's result.
    That repro runs with CXR_PARAMS_TRACE=folder/params_trace.tsv: the params keys each stage read
    (see cxr.core.params; tests/test_dag.py checks them against dvc.yaml)."""
    import yaml

    from testkit.synth import Counts, make_archive

    archive = make_archive(
        folder / "archive.zip",
        counts={"train": Counts(normal=8, bacteria=6, virus=5), "test": Counts(normal=4, bacteria=3, virus=3)},
    )
    alpha = yaml.safe_load((ROOT / "params.yaml").read_text())["transfer"]["alpha"]
    weights = folder / "backbone.weights.h5"
    sh(ROOT, sys.executable, "-m", "testkit.backbone", str(weights), str(alpha), str(TINY_SIZE))
    work = folder / "origin"
    work.mkdir()
    for name in (*PIPELINE_FILES, ".gitignore"):
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, work / name)
    for sub in ("cxr", "stages"):
        shutil.copytree(ROOT / sub, work / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params(archive, weights), sort_keys=False))
    sh(work, "git", "init", "-q", "-b", "main")
    sh(work, DVC, "init", "-q")
    sh(work, DVC, "config", "core.analytics", "false")
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "tiny project")
    # ~40 stages of both pipelines, most of them importing TensorFlow: minutes on a quiet 2-core
    # machine, more under load
    first = sh(
        work, DVC, "repro", "--all-pipelines", timeout=2400, env={"CXR_PARAMS_TRACE": str(folder / "params_trace.tsv")}
    )
    sh(work, "git", "add", "-A")
    sh(work, "git", "commit", "-qm", "first run")
    return work, first
