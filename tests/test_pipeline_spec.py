"""dvc.yaml, screened/dvc.yaml and params.yaml agree: the lists the pipeline files must spell out
cover every variant, and the default pipeline stands on its own."""

from __future__ import annotations

import pytest
import yaml

from testkit.pipeline import pipeline_stages


def load(root, name):
    return yaml.safe_load((root / name).read_text())


def test_preprocess_depends_on_every_variant_size(project_root):
    variants = load(project_root, "params.yaml")["variants"]
    listed = load(project_root, "dvc.yaml")["stages"]["preprocess"]["params"]
    for name in variants:
        assert f"variants.{name}.image_size" in listed, (
            f"add variants.{name}.image_size to preprocess params in dvc.yaml"
        )


def report_files(name: str, has_curves: bool) -> list[str]:
    """What a report reads of one model: its results as train, evaluate and ood wrote them."""
    files = [f"metrics/{name}.json", f"metrics/{name}_stress.json", f"models/{name}.json", f"models/{name}.keras"]
    # its out-of-distribution gate's figures (stage ood@<v>, ood_cv@<v>) and a variant's training curves
    files += [
        f"plots/{name}/roc.csv",
        f"plots/{name}/predictions.csv",
        f"metrics/{name}_ood.json",
        f"plots/{name}/risk_coverage.csv",
    ]
    return files + ([f"dvclive/{name}/plots/metrics"] if has_curves else [])


def test_the_pipelines_split_the_variants(project_root):
    """Every variant is built by exactly one pipeline, and the headline candidate by the default one."""
    params = load(project_root, "params.yaml")
    default, screened = (list(params["pipeline"][k]) for k in ("default", "screened"))
    assert sorted(default + screened) == sorted(params["variants"]), "list each variant once under pipeline:"
    assert params["report"]["incumbent"] in default
    for name in default + screened:
        kind = "default" if name in default else "screened"
        # one definition (a YAML anchor under pipeline, its alias under variants): one edit changes both
        assert params["pipeline"][kind][name] is params["variants"][name], f"variants.{name}: use the alias *{name}"


def test_dvc_exp_run_set_param_on_a_variant_changes_both_views(project_root, tmp_path):
    """`dvc exp run -S variants.<v>.<key>=...` goes through DVC's apply_overrides, which writes every
    key of the file back in order: the alias under `variants` must come after its anchor, or the
    pipeline's copy would silently undo the change."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text((project_root / "params.yaml").read_text())
    apply_overrides(path, ["variants.modern.epochs=9", "variants.lite0_probe.batch_size=7"])
    params = load(tmp_path, "params.yaml")
    assert params["variants"]["modern"]["epochs"] == params["pipeline"]["default"]["modern"]["epochs"] == 9
    assert params["pipeline"]["screened"]["lite0_probe"]["batch_size"] == 7
    before = load(project_root, "params.yaml")
    before["variants"]["modern"]["epochs"], before["variants"]["lite0_probe"]["batch_size"] = 9, 7
    assert params == before  # nothing else moved


@pytest.mark.parametrize(
    "stage, models",
    [
        ("report", lambda p: [(n, True) for n in p["pipeline"]["default"]]),
        (
            "screened/dvc.yaml:report_all",
            lambda p: [(n, True) for n in p["variants"]] + [(f"{v}_cv", False) for v in p["cv"]["variants"]],
        ),
    ],
)
def test_report_depends_on_every_model_it_compares(project_root, stage, models):
    """The default report: the default pipeline's models; report_all: every variant and k-fold
    ensemble (ensembles have no training curves)."""
    deps = pipeline_stages(project_root)[stage]["deps"]
    for name, has_curves in models(load(project_root, "params.yaml")):
        for path in report_files(name, has_curves):
            assert path in deps, f"add {path} to the {stage} stage's deps"


def test_the_default_pipeline_reads_nothing_the_screened_one_writes(project_root):
    """`make repro` must not need the opt-in pipeline: no default stage depends on a screened output."""
    stages = pipeline_stages(project_root)
    params = load(project_root, "params.yaml")
    screened_names = list(params["pipeline"]["screened"]) + [f"{v}_cv" for v in params["cv"]["variants"]]
    for name, stage in stages.items():
        if ":" in name:
            continue
        deps = " ".join(str(d) for d in stage.get("do", stage)["deps"])
        for model in screened_names:
            assert f"/{model}." not in deps and f"/{model}/" not in deps, f"default stage {name} reads {model}'s files"
    default_report = stages["report"]
    assert not any("/all/" in str(d) for d in default_report["deps"])


def test_report_depends_on_its_page_template(project_root):
    """The one non-Python file the report loads (its imports are checked in tests/test_dag.py)."""
    stages = pipeline_stages(project_root)
    for name in ("report", "screened/dvc.yaml:report_all"):
        assert "cxr/evaluation/templates/report.html.j2" in stages[name]["deps"], name


def test_every_variant_names_existing_files_and_sections(project_root):
    params = load(project_root, "params.yaml")
    for name, v in params["variants"].items():
        assert v["shared"] in params, name
        init = v["init_from"]
        assert (project_root / init).exists() or init.startswith("models/"), f"{name}: init_from {init}"
        if init.startswith("models/"):
            assert init[len("models/") : -len(".keras")] in params["variants"], f"{name} starts from an unknown variant"


def test_stage_scripts_exist(project_root):
    for name, stage in pipeline_stages(project_root).items():
        body = stage.get("do", stage)
        script = body["cmd"].split()[1]
        assert (project_root / script).exists(), f"stage {name}: {script} is missing"
        assert script in body["deps"], f"stage {name} must list its own script as a dependency"


def test_blend_depends_on_its_members_and_the_incumbent_s_validation_figures(project_root):
    params = load(project_root, "params.yaml")
    deps = pipeline_stages(project_root)["screened/dvc.yaml:blend"]["deps"]
    members, incumbent = params["blend"]["members"], params["report"]["incumbent"]
    assert len(members) >= 2 and all(m in params["variants"] for m in members)
    for path in [f"models/{m}.{ext}" for m in members for ext in ("keras", "json")] + [
        f"models/{incumbent}.json",
        f"metrics/{incumbent}_stress.json",
        "data/processed",
    ]:
        assert path in deps, f"add {path} to the blend stage's deps"
