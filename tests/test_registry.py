"""The model registry: dvc.yaml's `artifacts:` section (docs/models.md).

- every model of params.yaml (each variant and each k-fold ensemble `<v>_cv`) is declared as five
  artifacts, `<name>` (type model, with its metrics file), `<name>-sidecar`, `<name>-gate`,
  `<name>-litert` (the LiteRT export) and `<name>-litert-record` (its .tflite.json), under names
  DVC accepts and at paths that are stage outputs;
- end to end on the tiny pipeline: the pusher registers a version (`gto register`), pushes git to a
  bare "hub" repository and the data to a local DVC remote; from an empty folder, with no clone,
  `dvc artifacts get <hub> <name>` fetches the five files from the remote byte for byte, and
  `cxr predict --model` on the fetched file answers as it does in the project, on LiteRT;
- the section is metadata only: `dvc status` is the same with and without it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from cxr.evaluation.gate import gate_path
from cxr.model.sidecar import path_for
from cxr.serving.runtime import lite_meta_path, lite_path
from testkit.pipeline import DVC, ROOT, sh
from testkit.synth import make_xray

GTO = str(Path(DVC).with_name("gto"))  # installed with dvc; writes the version tags DVC reads
# DVC's docs: "Artifact IDs must consist of letters and numbers, and use '-' as separator".
# (gto would also take '_' and '/', but Studio and the docs use dashes.)
NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
VERSION = "v1.0.0"


def model_ids(root: Path) -> list[str]:
    """Every model the pipeline writes as models/<id>.keras: the variants, then the k-fold ensembles."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    return [*params["variants"], *(f"{v}_cv" for v in params["cv"]["variants"])]


def artifact_name(model_id: str) -> str:
    return model_id.replace("_", "-")


def declared(root: Path) -> dict[str, dict]:
    return yaml.safe_load((root / "dvc.yaml").read_text())["artifacts"]


# --- the declaration --------------------------------------------------------------------------


def test_every_model_is_declared_with_its_sidecar_gate_and_litert_export(project_root):
    artifacts = declared(project_root)
    expected = set()
    for model_id in model_ids(project_root):
        name, keras = artifact_name(model_id), f"models/{model_id}.keras"
        expected |= {name, f"{name}-sidecar", f"{name}-gate", f"{name}-litert", f"{name}-litert-record"}
        model = artifacts.get(name)
        assert model is not None, f"add artifact {name} ({keras}) to dvc.yaml"
        assert model["path"] == keras and model["type"] == "model"
        assert model["desc"] and model["labels"], f"artifact {name}: give it a desc and labels"
        assert model["meta"]["metrics"] == f"metrics/{model_id}.json"
        assert artifacts[f"{name}-sidecar"]["path"] == path_for(keras).as_posix()
        assert artifacts[f"{name}-gate"]["path"] == gate_path(keras).as_posix()
        assert artifacts[f"{name}-litert"]["path"] == lite_path(keras).as_posix()
        assert artifacts[f"{name}-litert-record"]["path"] == lite_meta_path(keras).as_posix()
    assert set(artifacts) == expected, f"artifacts of no model: {sorted(set(artifacts) - expected)}"


def test_artifact_names_are_valid_and_paths_are_stage_outputs(project_root):
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format

    with Repo(str(project_root)) as repo:
        read = repo.artifacts.read()["dvc.yaml"]
        outs = {Path(out.fs_path).relative_to(project_root).as_posix(): out for out in repo.index.outs}
    assert set(read) == set(declared(project_root))  # DVC parses every entry
    for name, artifact in read.items():
        check_name_format(name)  # what `dvc artifacts get` and gto accept
        assert NAME_RE.match(name), f"artifact {name}: lowercase letters, digits and single dashes only"
        assert artifact.path in outs and outs[artifact.path].use_cache, (
            f"artifact {name}: {artifact.path} is no cached stage output"
        )
        if artifact.type == "model":
            metrics = artifact.meta["metrics"]
            assert metrics in outs and outs[metrics].metric, f"artifact {name}: {metrics} is no stage's metrics file"


# --- end to end: register, push, fetch without a clone, predict --------------------------------


def predict_json(cwd: Path, model: Path, image: Path) -> tuple[list[dict], str]:
    """`cxr predict --format json --runtime litert` run from `cwd` with this checkout's cxr; its rows
    and stderr. LiteRT in both places: the teammate fetched the export beside the model."""
    done = sh(
        cwd,
        sys.executable,
        "-m",
        "cxr.serving.cli",
        "predict",
        str(image),
        "--model",
        str(model),
        "--format",
        "json",
        "--runtime",
        "litert",
        env={"PYTHONPATH": str(ROOT)},
    )
    return json.loads(done.stdout), done.stderr


@pytest.mark.slow
def test_a_teammate_gets_a_registered_model_from_the_remote_without_a_clone(tiny_pipeline, tmp_path):
    origin = tiny_pipeline.origin
    model_id = model_ids(origin)[-1]  # the k-fold ensemble, modern_cv
    name = artifact_name(model_id)
    trio = {
        name: f"{model_id}.keras",
        f"{name}-sidecar": f"{model_id}.json",
        f"{name}-gate": f"{model_id}.ood.npz",
        f"{name}-litert": f"{model_id}.tflite",
        f"{name}-litert-record": f"{model_id}.tflite.json",
    }

    # The pusher: a clone with the pipeline's outputs, a default remote, a version registered.
    pusher = tmp_path / "pusher"
    sh(tmp_path, "git", "clone", "-q", str(origin), str(pusher))
    sh(pusher, DVC, "cache", "dir", "--local", str(origin / ".dvc" / "cache"))
    sh(pusher, DVC, "checkout", "-q")
    sh(pusher, DVC, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
    sh(pusher, "git", "commit", "-qam", "DVC remote")
    for artifact in trio:
        sh(pusher, GTO, "register", artifact, "--version", VERSION)
    hub = tmp_path / "hub.git"  # stands for GitHub: a bare repository, no DVC cache anywhere near it
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(hub))
    sh(pusher, "git", "push", "-q", str(hub), "main", "--tags")

    teammate = tmp_path / "teammate"
    teammate.mkdir()
    before = sh(teammate, DVC, "artifacts", "get", str(hub), name, "--rev", VERSION, check=False)
    assert before.returncode != 0 and not (teammate / trio[name]).exists(), (
        "fetched before the push: not from the remote"
    )

    sh(pusher, DVC, "push", "-q")
    for artifact, file in trio.items():
        done = sh(teammate, DVC, "artifacts", "get", str(hub), artifact, "--rev", VERSION)
        assert f"Downloaded 1 file(s) to '{file}'" in done.stdout
        assert (teammate / file).read_bytes() == (origin / "models" / file).read_bytes(), file
    latest = sh(teammate, DVC, "artifacts", "get", str(hub), name, "-o", "latest.keras")  # no --rev: the latest version
    assert "Downloaded 1 file(s)" in latest.stdout
    assert (teammate / "latest.keras").read_bytes() == (origin / "models" / trio[name]).read_bytes()
    assert sorted(p.name for p in teammate.iterdir()) == sorted([*trio.values(), "latest.keras"])  # nothing else came

    image = tmp_path / "xray.png"
    make_xray("PNEUMONIA", seed=7).save(image)
    fetched, note = predict_json(teammate, teammate / trio[name], image)
    in_project, _ = predict_json(origin, origin / "models" / trio[name], image)
    assert "no OOD gate" not in note, note  # the gate beside the fetched model is read
    assert fetched == in_project and fetched[0]["probability"] is not None


@pytest.mark.slow
def test_the_registry_is_metadata_only(tiny_pipeline, tmp_path):
    """dvc.lock written with the section stays up to date without it (and so the other way round):
    adding or editing artifacts reruns no stage."""
    work = tiny_pipeline.clone(tmp_path / "work")
    assert sh(work, DVC, "status", "--json").stdout.strip() in ("{}", "")
    spec = yaml.safe_load((work / "dvc.yaml").read_text())
    assert spec.pop("artifacts")
    (work / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    status = sh(work, DVC, "status", "--json").stdout.strip()
    assert status in ("{}", ""), f"removing the artifacts section made stages stale: {status}"
