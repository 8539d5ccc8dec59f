"""dvc.yaml and params.yaml agree: the lists dvc.yaml must spell out cover every variant."""

from __future__ import annotations

import yaml


def load(root, name):
    return yaml.safe_load((root / name).read_text())


def test_preprocess_depends_on_every_variant_size(project_root):
    variants = load(project_root, "params.yaml")["variants"]
    listed = load(project_root, "dvc.yaml")["stages"]["preprocess"]["params"]
    for name in variants:
        assert f"variants.{name}.image_size" in listed, (
            f"add variants.{name}.image_size to preprocess params in dvc.yaml"
        )


def test_report_depends_on_every_model(project_root):
    """Every variant's and every k-fold ensemble's results (ensembles have no training curves)."""
    params = load(project_root, "params.yaml")
    deps = load(project_root, "dvc.yaml")["stages"]["report"]["deps"]
    models = [(name, True) for name in params["variants"]] + [
        (f"{v}_cv", False) for v in params.get("cv", {}).get("variants", [])
    ]
    for name, has_curves in models:
        files = [f"metrics/{name}.json", f"metrics/{name}_stress.json", f"models/{name}.json", f"models/{name}.keras"]
        # its out-of-distribution gate's figures (stage ood@<v>, ood_cv@<v>) and a variant's training curves
        files += [
            f"plots/{name}/roc.csv",
            f"plots/{name}/predictions.csv",
            f"metrics/{name}_ood.json",
            f"plots/{name}/risk_coverage.csv",
        ]
        files += [f"dvclive/{name}/plots/metrics"] if has_curves else []
        for path in files:
            assert path in deps, f"add {path} to the report stage's deps in dvc.yaml"


def test_report_depends_on_its_page_template(project_root):
    """The one non-Python file the report loads (its imports are checked in tests/test_dag.py)."""
    assert "cxr/evaluation/templates/report.html.j2" in load(project_root, "dvc.yaml")["stages"]["report"]["deps"]


def test_every_variant_names_existing_files_and_sections(project_root):
    params = load(project_root, "params.yaml")
    for name, v in params["variants"].items():
        assert v["shared"] in params, name
        init = v["init_from"]
        assert (project_root / init).exists() or init.startswith("models/"), f"{name}: init_from {init}"
        if init.startswith("models/"):
            assert init[len("models/") : -len(".keras")] in params["variants"], f"{name} starts from an unknown variant"


def test_stage_scripts_exist(project_root):
    stages = load(project_root, "dvc.yaml")["stages"]
    for name, stage in stages.items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        assert (project_root / script).exists(), f"stage {name}: {script} is missing"
        assert script in body["deps"], f"stage {name} must list its own script as a dependency"
