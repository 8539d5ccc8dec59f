"""`cxr calibrate` and `--site`: the site file, its refusals, and predict/serve at a site threshold.

.venv/bin/pytest tests/test_site.py        # a tiny Keras model; ~20 s on 2 cores
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.errors import CxrError
from cxr.core.provenance import sha256_file
from cxr.serving.cli import cli, main
from cxr.serving.inference import load_model, predict_files
from cxr.serving.site import SiteCalibration, apply_site, read_site, write_site
from test_inference import probe_model, save_model, sidecar, xray


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("site-models")
    a = save_model(probe_model(seed=0), root / "models" / "alpha.keras", sidecar(threshold=0.5, variant="alpha"))
    b = save_model(probe_model(seed=1), root / "models" / "beta.keras", sidecar(threshold=0.5, variant="beta"))
    return a, b


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory) -> Path:
    """8 NORMAL (two of one patient, by the dataset's naming) and 8 PNEUMONIA images."""
    root = tmp_path_factory.mktemp("site-images")
    names = {
        "NORMAL": ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg"] + [f"n{i}.png" for i in range(6)],
        "PNEUMONIA": [f"person{i}_bacteria_{i}.jpeg" for i in range(8)],
    }
    for k, (label, files) in enumerate(names.items()):
        (root / label).mkdir()
        for i, name in enumerate(files):
            Image.fromarray(xray(100 * k + i)).save(root / label / name)
    return root


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_calibrate_writes_a_site_file_that_predict_uses(models, site_folder, tmp_path, capsys):
    alpha, _ = models
    out = tmp_path / "site.json"
    status = cli(["calibrate", str(site_folder), "--model", str(alpha), "--out", str(out), "--rule", "youden"])
    text, _ = capsys.readouterr()
    assert status == 0 and "threshold" in text and "youden" in text
    cal = read_site(out, alpha)
    assert (cal.model, cal.rule, cal.n_normal, cal.n_pneumonia, cal.n_patients) == ("alpha", "youden", 8, 8, 15)
    assert 0 <= cal.sensitivity <= 1 and cal.sensitivity_ci95 is not None and cal.n_out_of_distribution == 0

    images = sorted(site_folder.rglob("*.*"))
    assert cli(["predict", *map(str, images), "--model", str(alpha), "--site", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["threshold"] for r in rows} == {cal.threshold}
    assert {r["threshold_source"] for r in rows} == {f"site:{out}"}
    assert all(r["label"] == ("PNEUMONIA" if r["probability"] >= cal.threshold else "NORMAL") for r in rows)
    assert cli(["predict", str(images[0]), "--model", str(alpha), "--site", str(out)]) == 0
    table, err = capsys.readouterr()
    assert table.splitlines()[0] == f"threshold_source: site:{out}" and "refer band off" in err
    # without --site: the sidecar's threshold, and the answer says so
    assert cli(["predict", str(images[0]), "--model", str(alpha), "--format", "csv"]) == 0
    (row,) = csv.DictReader(capsys.readouterr().out.splitlines())
    assert row["threshold_source"] == "validation" and float(row["threshold"]) == 0.5


def test_site_file_round_trip_and_other_models_refused(models, tmp_path):
    alpha, beta = models
    cal = SiteCalibration(
        "alpha", sha256_file(alpha), "sensitivity:0.97", 0.25, 0.5, 8, 8, 16, 1, 1.0, [0.9, 1.0], 0.5, [0.2, 0.8],
        "in-sample", {"unit": "patient"}, "site/", "2025-01-01T00:00:00+00:00",
    )  # fmt: skip
    path = tmp_path / "s.json"
    write_site(cal, path, alpha)
    assert read_site(path, alpha) == cal
    loaded, _ = apply_site(load_model(alpha, with_gate=False), path)
    assert loaded.threshold == 0.25 and loaded.threshold_source == f"site:{path}"
    with pytest.raises(CxrError, match=r"calibrated for model alpha \(sha256 \w{12}\), not for .*beta.keras"):
        read_site(path, beta)
    path.write_text("{}")
    with pytest.raises(CxrError, match="not a site file"):
        read_site(path, alpha)
    with pytest.raises(CxrError, match="model's own files"):
        write_site(cal, alpha.with_suffix(".json"), alpha)


def test_predict_with_another_models_site_file_is_one_line(models, site_folder, tmp_path, capsys):
    alpha, beta = models
    out = tmp_path / "site.json"
    assert cli(["calibrate", str(site_folder), "--model", str(alpha), "--out", str(out)]) == 0
    capsys.readouterr()
    status, _, err = run_main(["predict", str(site_folder), "--model", str(beta), "--site", str(out)], capsys)
    assert status == 1 and err.count("\n") == 1 and "calibrated for model alpha" in err and "beta.keras" in err


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def refusal_inputs(site_folder: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    good = [(str(p), p.parent.name) for p in sorted(site_folder.rglob("*.*"))]
    few = tmp_path / "few"
    for label in ("NORMAL", "PNEUMONIA"):
        (few / label).mkdir(parents=True)
        for p in sorted((site_folder / label).iterdir())[: 7 if label == "NORMAL" else 8]:
            (few / label / p.name).write_bytes(p.read_bytes())
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    stray = tmp_path / "stray"
    (stray / "OTHER").mkdir(parents=True)
    Image.fromarray(xray(1)).save(stray / "OTHER" / "x.png")
    return {
        "too_few": (few, "7 NORMAL image(s), need at least 8"),
        "bad_label": (write_csv(tmp_path / "bad.csv", [*good[:-1], (good[-1][0], "pneumonia")]), "label 'pneumonia'"),
        "unreadable": (write_csv(tmp_path / "broken.csv", [*good, (str(broken), "NORMAL")]), "could not be read"),
        "stray_folder": (stray, "not under"),
        "missing": (tmp_path / "nowhere", "not found"),
    }


@pytest.mark.parametrize("case", ["too_few", "bad_label", "unreadable", "stray_folder", "missing"])
def test_bad_input_is_one_line_exit_1_and_no_site_file(case, models, site_folder, tmp_path, capsys):
    alpha, _ = models
    source, message = refusal_inputs(site_folder, tmp_path)[case]
    before = sorted(p.name for p in alpha.parent.iterdir())
    out = tmp_path / "site.json"
    status, stdout, err = run_main(["calibrate", str(source), "--model", str(alpha), "--out", str(out)], capsys)
    assert status == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and not list(tmp_path.glob("*site.json*")) and stdout == ""
    assert sorted(p.name for p in alpha.parent.iterdir()) == before  # the model's files untouched


def test_bad_rule_is_a_usage_error(models, site_folder, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["calibrate", str(site_folder), "--model", str(models[0]), "--rule", "stress_youden"])
    assert info.value.code == 2 and "youden or sensitivity" in capsys.readouterr().err


def test_site_turns_the_refer_band_off_but_keeps_the_gate(models, site_folder, tmp_path):
    """With a gate: OOD still labelled, no UNCERTAIN and no band in the answer."""
    from cxr.evaluation import gate as ood
    from cxr.serving.inference import SiteThreshold

    alpha, _ = models
    loaded = load_model(alpha)
    # a stand-in gate whose band covers everything: every in-distribution answer would be UNCERTAIN
    fake = type("FakeGate", (), {"refer_low": 0.0, "refer_high": 1.0})()
    fake.reasons = lambda feats, x, facts: (np.zeros(len(x)), [None] * (len(x) - 1) + ["blank"])
    fake.label = ood.Gate.label.__get__(fake)
    images = sorted(site_folder.rglob("*.*"))[:3]
    gated = dataclasses.replace(loaded, gate=fake, features=loaded.model)
    assert [p.label for p in predict_files(images, gated)][:2] == ["UNCERTAIN"] * 2
    site = dataclasses.replace(gated, site=SiteThreshold(0.3, "youden", "s.json"))
    preds = predict_files(images, site)
    assert [p.label for p in preds][2] == "OUT_OF_DISTRIBUTION"
    assert all(p.label == ("PNEUMONIA" if p.probability >= 0.3 else "NORMAL") for p in preds[:2])
    assert all(p.refer_low is None and p.threshold_source == "site:s.json" for p in preds)


def test_serve_with_a_site_file_answers_at_its_threshold(models, site_folder, tmp_path, capsys):
    import io

    from cxr.serving.serve import Service

    alpha, _ = models
    out = tmp_path / "site.json"
    assert cli(["calibrate", str(site_folder), "--model", str(alpha), "--out", str(out), "--rule", "youden"]) == 0
    loaded, cal = apply_site(load_model(alpha), out)
    service = Service(loaded, alpha, 1 << 20)
    try:
        assert (service.info.threshold, service.info.threshold_rule) == (cal.threshold, "youden")
        assert service.info.threshold_source == f"site:{out}"
        image = next(site_folder.rglob("*.png"))
        status, body = service.predict(io.BytesIO(image.read_bytes()), image.name, gradcam=False)
    finally:
        service.close()
    assert status == 200 and body["threshold"] == cal.threshold and body["threshold_source"] == f"site:{out}"
    assert body["label"] == ("PNEUMONIA" if body["probability"] >= cal.threshold else "NORMAL")
