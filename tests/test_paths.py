"""cxr.core.paths (where every stage writes) agrees with dvc.yaml's outs, metrics and plots, and
every stage script parses its arguments through cxr.core.stage.

    .venv/bin/pytest -q tests/test_paths.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cxr.core import paths
from cxr.core.stage import stage_args
from testkit.pipeline import pipeline_stages

ROOT = Path(__file__).resolve().parents[1]
VARIANT, CV, FOLD = "cnn_baseline", "modern", 0  # any names do: dvc.yaml's templates are filled in with them


def declared(stage: dict) -> set[str]:
    """A stage's outs, metrics and plots, as dvc.yaml spells them (templates filled in)."""
    entries = [e for kind in ("outs", "metrics", "plots") for e in stage.get(kind, [])]
    names = [e if isinstance(e, str) else next(iter(e)) for e in entries]
    fill = {"${key}": VARIANT, "${item.variant}": VARIANT, "${item.fold}": str(FOLD), "${item}": CV}
    out = set()
    for name in names:
        for template, value in fill.items():
            name = name.replace(template, value)
        out.add(name)
    return out


def written(stage: str) -> set[Path]:
    """What each stage script writes, composed from cxr.core.paths as the scripts compose it."""
    v, cv = VARIANT, f"{CV}_cv"
    model, ensemble = paths.model_path(v), paths.model_path(cv)
    evaluate = [paths.metrics_path(v)] + [
        paths.plots_dir(v) / f"{t}.csv" for t in ("roc", "pr", "calibration", "predictions")
    ]
    ood = [paths.gate_path(model), paths.metrics_path(v, "ood"), paths.plots_dir(v) / "risk_coverage.csv"]
    export = [paths.lite_path(model), paths.lite_meta_path(model), paths.metrics_path(v, "export")]
    live = paths.live_dir(v)
    return {
        "fetch": {paths.RAW},
        "split": {paths.MANIFEST, paths.AUDIT},
        "preprocess": {paths.PROCESSED},
        "train": {
            model,
            paths.sidecar_path(model),
            paths.metrics_path(v, "stress"),
            live / "metrics.json",  # DVCLive's own layout inside the folder
            live / "plots" / "metrics",
        },
        "train_fold": set(paths.fold_paths(v, FOLD)),
        "ensemble": {
            ensemble,
            paths.sidecar_path(ensemble),
            paths.metrics_path(cv, "oof"),
            paths.metrics_path(cv, "stress"),
        },
        "evaluate": set(evaluate),
        "evaluate_cv": {Path(str(p).replace(v, cv)) for p in evaluate},
        "ood": set(ood),
        "ood_cv": {Path(str(p).replace(v, cv)) for p in ood},
        "export": set(export),
        "export_cv": {Path(str(p).replace(v, cv)) for p in export},
        "report": {paths.REPORT_PAGE, paths.FIGURES, paths.SUMMARY},
        # stages/report.py all: the same names one folder down
        "report_all": {p.parent / "all" / p.name for p in (paths.REPORT_PAGE, paths.FIGURES, paths.SUMMARY)},
        "site_curve": {paths.metrics_path("site_curve")},
        "blend": {paths.metrics_path("blend")}
        | {paths.plots_dir("blend") / f"{t}.csv" for t in ("roc", "pr", "calibration", "predictions")},
    }[stage]


STAGES = pipeline_stages(ROOT)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_writes_what_dvc_yaml_declares(stage):
    body = STAGES[stage].get("do", STAGES[stage])
    # the screened pipeline's stages run in the project root (wdir: ..), so their paths read the same
    assert {p.as_posix() for p in written(stage.rpartition(":")[2])} == declared(body)


def test_files_beside_a_model_follow_its_path():
    model = Path("elsewhere/x.keras")
    assert paths.sidecar_path(model) == Path("elsewhere/x.json")
    assert paths.gate_path(model) == Path("elsewhere/x.ood.npz")
    assert (paths.lite_path(model), paths.lite_meta_path(model)) == (
        Path("elsewhere/x.tflite"),
        Path("elsewhere/x.tflite.json"),
    )
    assert paths.model_path("a", Path("/scratch")) == Path("/scratch/models/a.keras")


def test_stage_args(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/stages/train.py", "modern", "--fold", "2", "--verbose"])
    args = stage_args("doc", variant="a variant", fold=True)
    assert (args.variant, args.fold, args.verbose) == ("modern", 2, True)
    monkeypatch.setattr(sys, "argv", ["stages/train.py", "modern", "--fold", "two"])
    with pytest.raises(
        ValueError, match=r"^argument --fold: invalid int value: 'two' \(usage: python stages/train.py "
    ):
        stage_args("doc", variant="a variant", fold=True)
    monkeypatch.setattr(sys, "argv", ["stages/report.py", "extra"])
    with pytest.raises(ValueError, match="unrecognized arguments: extra"):
        stage_args("doc")


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "stages").glob("*.py")))
def test_every_stage_has_help_and_one_line_usage_errors(script, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(ROOT / "stages" / script), *args],
            cwd=tmp_path,
            env={"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=300,
        )

    shown = run("--help")
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: python stages/{script} "), shown.stderr[-2000:]
    bad = run("--no-such-option")
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 1 and len(lines) == 1, bad.stderr[-2000:]
    assert lines[0].startswith("error: ") and lines[0].endswith(f"(usage: {shown.stdout.splitlines()[0][7:]})")
