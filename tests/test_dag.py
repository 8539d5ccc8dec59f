"""dvc.yaml cannot go stale: every stage lists every project module it imports and every params
key it reads, both derived from the code, and editing a module makes `dvc status` name every
stage that imports it.

    .venv/bin/pytest -q tests/test_dag.py      # the last two tests run dvc on the tiny pipeline (slow)
"""

from __future__ import annotations

import ast
import graphlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from testkit.pipeline import DVC, ROOT, lock_stages, pipeline_stages, sh

PACKAGE = "cxr"


def _module_file(name: str, root: Path) -> Path | None:
    """`cxr.x` → cxr/x.py (or cxr/x/__init__.py); None for anything outside the project package."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def direct_imports(path: Path, root: Path) -> set[Path]:
    """Project modules that `path` imports anywhere (lazy imports inside functions too), except
    under `if TYPE_CHECKING:`, which never runs."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block)
        for n in ast.walk(block)
    }
    found: set[Path] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from cxr import report` imports the module cxr.evaluation.report; `from cxr.x import y` imports cxr.x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            module = _module_file(name, root)
            if module is not None:
                found.add(module)
    return found


def project_imports(script: Path, root: Path = ROOT) -> set[str]:
    """Every project module `script` imports, transitively, as paths relative to `root`.
    The packages' __init__.py files are left out: they hold only docstrings and the version (test
    below), so editing one changes no output."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in direct_imports(todo.pop(), root):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return {p.relative_to(root).as_posix() for p in seen if p.name != "__init__.py"}


def stage_bodies(root: Path = ROOT) -> dict[str, dict]:
    """The stages of both pipeline files (dvc.yaml, screened/dvc.yaml), `foreach` templates by their name."""
    return {name: stage.get("do", stage) for name, stage in pipeline_stages(root).items()}


def script_of(body: dict) -> str:
    return body["cmd"].split()[1]


@pytest.mark.parametrize("init", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("__init__.py")))
def test_package_inits_hold_no_code(init):
    tree = ast.parse((ROOT / init).read_text())
    for node in tree.body:
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        is_version = isinstance(node, ast.Assign) and [t.id for t in node.targets if isinstance(t, ast.Name)] == [
            "__version__"
        ]
        assert is_doc or is_version, f"{init} is no stage's dependency: keep code out of it"


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the project modules it imports (lazy imports too), as paths relative to `root`."""
    modules = sorted((root / PACKAGE).rglob("*.py"))
    return {
        m.relative_to(root).as_posix(): {d.relative_to(root).as_posix() for d in direct_imports(m, root)}
        - {m.relative_to(root).as_posix()}
        for m in modules
    }


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (its modules in order), or None when there is none."""
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_package_has_no_import_cycle():
    cycle = import_cycle({k: {d for d in v if not d.endswith("__init__.py")} for k, v in import_graph().items()})
    assert cycle is None, f"import circle: {' -> '.join(cycle)}; move what both need into a module below them"


def test_cycle_finder_finds_a_lazy_import_circle(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (tmp_path / PACKAGE / "a.py").write_text("from cxr.b import x\n")
    (tmp_path / PACKAGE / "b.py").write_text("def f():\n    from cxr.a import y\n")
    (tmp_path / PACKAGE / "c.py").write_text("import cxr.a\n")
    graph = import_graph(tmp_path)
    assert set(import_cycle(graph)) >= {"cxr/a.py", "cxr/b.py"}
    del graph["cxr/b.py"]
    assert import_cycle(graph) is None


@pytest.mark.parametrize("stage", sorted(stage_bodies()))
def test_stage_lists_every_module_it_imports(stage):
    body = stage_bodies()[stage]
    missing = sorted(project_imports(ROOT / script_of(body)) - set(body["deps"]))
    assert not missing, f"dvc.yaml stage {stage}: add {missing} to its deps (the stage imports them)"


def test_import_finder_sees_lazy_imports_and_skips_type_checking(tmp_path):
    (tmp_path / PACKAGE).mkdir()
    for name in ("__init__", "a", "b", "c", "d"):
        (tmp_path / PACKAGE / f"{name}.py").write_text("")
    (tmp_path / PACKAGE / "a.py").write_text("from cxr import b\n")
    (tmp_path / PACKAGE / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import cxr.d\n")
    script = tmp_path / "stage.py"
    script.write_text("import os\nfrom cxr.a import thing\n\ndef main():\n    import cxr.c\n")
    assert project_imports(script, tmp_path) == {"cxr/a.py", "cxr/b.py", "cxr/c.py"}


# --- on the tiny pipeline: what the stages really read, and what `dvc status` says ----------


def _stage_of_command(root: Path) -> dict[str, str]:
    """'stages/train.py cnn_baseline' → 'train@cnn_baseline', from the dvc.lock files (foreach expanded)."""
    lock = lock_stages(root)
    return {" ".join(entry["cmd"].split()[1:]): name for name, entry in lock.items()}


@pytest.mark.slow
def test_every_params_key_a_stage_reads_is_declared(tiny_pipeline):
    """Run with CXR_PARAMS_TRACE (see cxr.core.params), every stage recorded the keys it read."""
    work = tiny_pipeline.origin
    lock = lock_stages(work)
    by_command = _stage_of_command(work)
    traced: dict[str, set[str]] = {}
    for line in tiny_pipeline.params_trace.read_text().splitlines():
        command, key = line.split("\t")
        traced.setdefault(by_command[command], set()).add(key)
    assert set(traced) == set(lock), "every stage loads params.yaml"
    for stage, keys in sorted(traced.items()):
        declared = set(lock[stage].get("params", {}).get("params.yaml", {}))
        missing = sorted(k for k in keys if not any(k == d or k.startswith(d + ".") for d in declared))
        assert not missing, f"dvc.yaml stage {stage} reads params {missing} but does not list them under params:"


@pytest.mark.slow
def test_editing_a_module_makes_dvc_status_name_every_stage_that_imports_it(tiny_pipeline, tmp_path):
    work = tiny_pipeline.clone(tmp_path / "clone")
    lock = lock_stages(work)
    by_command = _stage_of_command(work)
    imports = {
        by_command[" ".join(entry["cmd"].split()[1:])]: project_imports(work / entry["cmd"].split()[1], work)
        for entry in lock.values()
    }
    modules = sorted(p.relative_to(work).as_posix() for p in (work / PACKAGE).rglob("*.py"))
    assert len(modules) > 10
    for module in modules:
        importers = {stage for stage, mods in imports.items() if module in mods}
        if not importers:
            continue
        path = work / module
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited by test_dag\n")
        try:
            status = json.loads(sh(work, DVC, "status", "--json").stdout or "{}")
        finally:
            path.write_bytes(original)
        missed = sorted(importers - set(status))
        assert not missed, f"after editing {module}, `dvc status` does not name {missed}, which import it"
    assert json.loads(sh(work, DVC, "status", "--json").stdout or "{}") == {}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cnn_baseline", "transfer_features"])
def test_threshold_was_chosen_on_what_cxr_predict_gives(tiny_pipeline, variant):
    """One forward pass: the validation probabilities behind the saved threshold equal, to 1e-6,
    what `cxr predict` prints for the same files (transfer_features trains a head on cached
    features, yet its threshold too must come from the composed model's own output)."""
    import pandas as pd

    from cxr.data.cache import load_split
    from cxr.evaluation.metrics import binary_metrics, choose_threshold
    from cxr.evaluation.stress import stress_probabilities
    from cxr.model import sidecar
    from cxr.serving.inference import load_model

    work = tiny_pipeline.origin
    meta = sidecar.read(work / "models" / f"{variant}.keras")
    rows = pd.read_csv(work / "data" / "processed" / str(meta.image_size) / "val.csv", dtype=str, keep_default_na=False)
    done = sh(
        work,
        str(Path(sys.executable).with_name("cxr")),
        "predict",
        *rows["path"],
        "--model",
        f"models/{variant}.keras",
        "--format",
        "json",
    )
    printed = json.loads(done.stdout)
    assert [r["path"] for r in printed] == list(rows["path"]) and all(r["error"] is None for r in printed)
    prob = np.array([r["probability"] for r in printed])
    y = (rows["label"] == "PNEUMONIA").to_numpy().astype(int)
    # the stress rule also pools the shifted validation images (from the cache, as training saw them)
    val = load_split(work / "data" / "processed" / str(meta.image_size), "val")
    seed = yaml.safe_load((work / "params.yaml").read_text())["base"]["seed"]
    stressed = stress_probabilities(load_model(work / "models" / f"{variant}.keras").model, val.x, seed)
    assert choose_threshold(meta.threshold_rule, y, prob, stressed) == pytest.approx(meta.threshold, abs=1e-6)
    m = binary_metrics(y, prob, meta.threshold)
    assert {k: m[k] for k in ("roc_auc", "accuracy", "sensitivity", "specificity", "n")} == pytest.approx(
        meta.val.__dict__, abs=1e-6
    )
