"""`cxr predict`: model choice, folder search, output formats, exit codes, Grad-CAM files.

.venv/bin/pytest tests/test_cli.py
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.data.images import load_resized
from cxr.serving.cli import cli, collect_images, gradcam_names, main
from cxr.serving.inference import load_model, predict_arrays
from test_inference import SIZE, probe_model, save_model, sidecar, xray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with dvc.yaml, two trained-looking models and a report summary."""
    root = tmp_path_factory.mktemp("project")
    (root / "dvc.yaml").write_text("stages: {}\n")
    save_model(probe_model(seed=0), root / "models" / "alpha.keras", sidecar(threshold=0.4, variant="alpha"))
    save_model(probe_model(seed=1), root / "models" / "beta.keras", sidecar(threshold=0.6, variant="beta"))
    (root / "metrics").mkdir()
    (root / "metrics" / "summary.json").write_text(json.dumps({"best": "beta"}))
    return root


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    """Three good images in a small tree (with case-mixed extensions) plus files to ignore."""
    (tmp_path / "in" / "sub" / "deeper").mkdir(parents=True)
    paths = [
        tmp_path / "in" / "b.PNG",
        tmp_path / "in" / "sub" / "a.jpg",
        tmp_path / "in" / "sub" / "deeper" / "c.Jpeg",
    ]
    for i, p in enumerate(paths):
        Image.fromarray(xray(i)).save(p, format="PNG" if p.suffix.lower() == ".png" else "JPEG")
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden").mkdir()
    Image.fromarray(xray(9)).save(tmp_path / "in" / ".hidden" / "x.png")
    return paths


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli(argv)
    out, err = capsys.readouterr()
    return status, out, err


def expected_probs(paths: list[Path], model_path: Path) -> np.ndarray:
    """What evaluation would compute from the preprocessed cache: load_resized → predict_arrays."""
    loaded = load_model(model_path)
    x = np.stack([load_resized(p, [SIZE], "squash")[SIZE] for p in paths])
    return predict_arrays(loaded.model, x)


def test_folder_search_is_recursive_sorted_and_filtered(tmp_path, images):
    found = collect_images([tmp_path / "in"])
    assert found == sorted(images, key=lambda p: p.as_posix())
    # a file named on its own comes first, and is not repeated by the folder search
    assert (
        collect_images([images[2], tmp_path / "in"])[0] == images[2]
        and len(collect_images([images[2], tmp_path / "in"])) == 3
    )


def test_json_output_matches_predict_arrays(project, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    status, out, _ = run(["predict", str(tmp_path / "in"), "--format", "json", "--batch-size", "2"], capsys)
    assert status == 0
    rows = json.loads(out)
    order = sorted(images, key=lambda p: p.as_posix())
    assert [r["path"] for r in rows] == [str(p) for p in order]
    probs = np.array([r["probability"] for r in rows])
    np.testing.assert_allclose(probs, expected_probs(order, project / "models" / "beta.keras"), atol=1e-6)
    assert all(r["threshold"] == 0.6 and r["error"] is None for r in rows)  # the best variant: beta
    assert [r["label"] for r in rows] == ["PNEUMONIA" if p >= 0.6 else "NORMAL" for p in probs]


def test_csv_output_parses_back(project, images, capsys, monkeypatch):
    monkeypatch.chdir(project)
    status, out, _ = run(["predict", *map(str, images), "--variant", "alpha", "--format", "csv"], capsys)
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in rows] == [str(p) for p in images]
    np.testing.assert_allclose(
        [float(r["probability"]) for r in rows], expected_probs(images, project / "models" / "alpha.keras"), atol=1e-6
    )
    assert {r["threshold"] for r in rows} == {"0.4"} and {r["error"] for r in rows} == {""}


def test_table_output_and_explicit_model(project, images, capsys):
    status, out, _ = run(["predict", str(images[0]), "--model", str(project / "models" / "alpha.keras")], capsys)
    assert status == 0
    header, line = out.splitlines()
    assert header.split() == ["path", "probability", "label", "threshold", "ood", "reason"]
    prob = float(expected_probs(images[:1], project / "models" / "alpha.keras")[0])
    label = "PNEUMONIA" if prob >= 0.4 else "NORMAL"
    assert line.split()[:7] == [str(images[0]), f"{prob:.4f}", label, "0.4000", "no", "OOD", "gate"]
    assert f"P(pneumonia) {prob:.4f} is" in line and "threshold 0.4000 (chosen on the validation X-rays)" in line
    assert "no OOD gate beside the model" in line  # no OOD gate beside alpha


def test_gate_beside_the_model_labels_out_of_distribution_and_uncertain(tmp_path, capsys):
    """With models/<v>.ood.npz beside the model: a black image and a colour photo are
    OUT_OF_DISTRIBUTION, X-ray-like pictures get a score, and --strict turns OOD into exit 1."""
    from sklearn.datasets import load_sample_images

    from cxr.evaluation import gate as ood

    model = probe_model(seed=2)
    path = save_model(model, tmp_path / "models" / "gamma.keras", sidecar(threshold=0.5, variant="gamma"))
    gate = xray_gate(model, tmp_path)
    gate.save(ood.gate_path(path))
    black, photo, good = tmp_path / "black.png", tmp_path / "photo.jpg", tmp_path / "good.png"
    Image.fromarray(np.zeros((512, 512), np.uint8)).save(black)
    Image.fromarray(load_sample_images().images[1]).save(photo)
    Image.fromarray(xray(200)).save(good)
    status, out, err = run(
        ["predict", str(black), str(photo), str(good), "--model", str(path), "--format", "json"], capsys
    )
    rows = json.loads(out)
    assert status == 0 and "warning: 2 of 3" in err and "no OOD gate" not in err
    assert [r["label"] for r in rows[:2]] == ["OUT_OF_DISTRIBUTION"] * 2 and [r["ood"] for r in rows] == [
        True,
        True,
        False,
    ]
    assert "blank" in rows[0]["ood_reason"] and "colour" in rows[1]["ood_reason"] and rows[2]["ood_reason"] is None
    assert rows[2]["label"] == gate.label(rows[2]["probability"], 0.5, None) and rows[2]["ood_score"] <= 1
    assert all(r["probability"] is not None and r["refer_low"] == gate.refer_low for r in rows)
    status, out, err = run(["predict", str(black), "--model", str(path), "--strict"], capsys)
    assert status == 1 and "OUT_OF_DISTRIBUTION" in out and "blank" in out and "error: 1 of 1" in err


def cached(img: np.ndarray, folder: Path) -> np.ndarray:
    """What preprocess caches for a picture: through a PNG file and load_resized."""
    Image.fromarray(img).save(folder / "cached.png")
    return load_resized(folder / "cached.png", [SIZE], "squash")[SIZE]


def predict_features(features, x: np.ndarray) -> np.ndarray:
    from cxr.serving.inference import forward_arrays

    return forward_arrays(features, x)


def xray_gate(model, folder: Path):
    """A gate (threshold 0.5) for `model` fitted on 60 synthetic X-rays, thresholded on 40 more,
    each through the cache's PNG round trip."""
    from cxr.evaluation import gate as ood

    features = ood.penultimate(model)
    train_x = np.stack([cached(xray(i), folder) for i in range(60)])
    val_x = np.stack([cached(xray(i), folder) for i in range(60, 100)])
    val_p = predict_arrays(model, val_x)
    feats = [ood.flatten(predict_features(features, x)) for x in (train_x, val_x)]
    checks = ood.Checks(min_std=6.0, max_colourfulness=12.0, max_aspect=2.5)
    return ood.fit_gate(feats[0], train_x, feats[1], val_x, val_p, 0.5, 0.99, 0.9, checks)


def test_bad_files_are_reported_and_the_rest_predicted(project, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    corrupt, empty = tmp_path / "in" / "broken.jpg", tmp_path / "in" / "empty.png"
    corrupt.write_bytes(b"GIF89a-but-not-really" * 20)
    empty.write_bytes(b"")
    status, out, err = run(["predict", str(tmp_path / "in"), "--format", "json"], capsys)
    assert status == 1
    rows = {Path(r["path"]).name: r for r in json.loads(out)}
    assert set(rows) == {"a.jpg", "b.PNG", "c.Jpeg", "broken.jpg", "empty.png"}
    assert "cannot decode image" in rows["broken.jpg"]["error"] and rows["broken.jpg"]["probability"] is None
    assert "empty file" in rows["empty.png"]["error"]
    assert all(rows[n]["error"] is None and 0 < rows[n]["probability"] < 1 for n in ("a.jpg", "b.PNG", "c.Jpeg"))
    assert "2 of 5 file(s) could not be predicted" in err
    status, out, _ = run(["predict", str(corrupt), str(images[0])], capsys)  # the table shows the reason
    assert status == 1 and "ERROR" in out and "cannot decode image" in out


def test_missing_file_argument_is_a_failed_row(project, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    status, out, _ = run(["predict", str(images[0]), str(tmp_path / "nope.png"), "--format", "json"], capsys)
    assert status == 1 and "no such file" in json.loads(out)[1]["error"]


@pytest.mark.parametrize(
    "argv",
    [
        ["predict"],
        ["predict", "x.png", "--variant", "a", "--model", "b.keras"],
        ["predict", "x.png", "--format", "xml"],
        ["predict", "x.png", "--batch-size", "0"],
        [],
    ],
    ids=["no_path", "variant_and_model", "format", "batch_size", "no_command"],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_folder_without_images_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as info:
        cli(["predict", str(tmp_path / "empty"), "--model", "unused.keras"])
    assert info.value.code == 2 and "no images" in capsys.readouterr().err


def test_no_summary_and_no_model_is_one_clear_line(tmp_path, images, capsys, monkeypatch):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cxr"])  # run_main looks for --verbose there
    monkeypatch.delenv("CXR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(images[0])])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert err.count("\n") == 1 and "summary.json not found" in err and "dvc repro" in err and "--model" in err


def test_tampered_model_is_one_clear_line(project, images, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "models" / "gamma.keras"
    bad.parent.mkdir()
    bad.write_bytes((project / "models" / "alpha.keras").read_bytes()[:500])
    bad.with_suffix(".json").write_text(json.dumps(sidecar()))
    monkeypatch.setattr(sys, "argv", ["cxr"])
    monkeypatch.delenv("CXR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(images[0]), "--model", str(bad)])
    captured = capsys.readouterr()
    assert info.value.code == 1 and captured.out == ""
    assert (
        captured.err.startswith("error: ") and "gamma.keras" in captured.err and "dvc repro train@gamma" in captured.err
    )
    assert "Traceback" not in captured.err


def test_gradcam_writes_one_png_per_image(project, images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(project)
    twin = tmp_path / "in" / "a.png"  # same stem as sub/a.jpg: must not overwrite it
    Image.fromarray(xray(5)).save(twin)
    (tmp_path / "in" / "bad.png").write_bytes(b"")
    out_dir = tmp_path / "cams"
    import cxr.data.images

    decoded = []
    real_open = cxr.data.images.open_image
    monkeypatch.setattr(
        cxr.data.images, "open_image", lambda path, *a, **k: decoded.append(str(path)) or real_open(path, *a, **k)
    )
    status, out, err = run(["predict", str(tmp_path / "in"), "--gradcam", str(out_dir), "--format", "json"], capsys)
    assert status == 1  # bad.png
    assert len(decoded) == len(set(decoded)) == 5, "each file is decoded once, Grad-CAM included"
    rows = json.loads(out)
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == sorted(["a_gradcam.png", "a-2_gradcam.png", "b_gradcam.png", "c_gradcam.png"])
    assert {Path(r["gradcam"]).name for r in rows if r["gradcam"]} == set(written)
    assert next(r for r in rows if r["path"].endswith("bad.png"))["gradcam"] is None
    with Image.open(out_dir / "b_gradcam.png") as png:
        assert png.mode == "RGB" and png.size == (SIZE, SIZE)
    assert "wrote 4 Grad-CAM overlay(s)" in err


def test_gradcam_names_are_unique():
    assert gradcam_names([Path("x/a.png"), Path("y/a.jpg"), Path("b.png"), Path("z/a.tif")]) == [
        "a_gradcam.png",
        "a-2_gradcam.png",
        "b_gradcam.png",
        "a-3_gradcam.png",
    ]


def test_python_dash_m_runs_and_hides_the_traceback(tmp_path, images):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXR_DEBUG": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "cxr.serving.cli", "predict", str(images[0])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert "error: " in proc.stderr and "summary.json not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "cxr.serving.cli", "predict", str(images[0]), "--verbose"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_gradcam_of_a_dense_model_fails_before_any_output(images, tmp_path, capsys, monkeypatch):
    import keras
    from keras import layers

    dense = keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1)),
            layers.Rescaling(1.0 / 255),
            layers.Flatten(),
            layers.Dense(1, activation="sigmoid"),
        ]
    )
    path = save_model(dense, tmp_path / "models" / "dense_baseline.keras", sidecar())
    monkeypatch.setattr(sys, "argv", ["cxr"])
    monkeypatch.delenv("CXR_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info:
        main(["predict", str(images[0]), "--model", str(path), "--gradcam", str(tmp_path / "cams")])
    captured = capsys.readouterr()
    assert info.value.code == 1 and captured.out == "" and "no convolution layer" in captured.err
    assert not (tmp_path / "cams").exists()
