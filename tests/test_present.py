"""cxr.serving.present: one presentation of an answer for the page, `cxr predict` (table, JSON,
CSV) and POST /predict, on a tiny probe model with a real gate whose refer band is placed around
one image's probability (so UNCERTAIN is deterministic).

.venv/bin/pytest tests/test_present.py                 # unit tests + CLI/API agreement (~30 s)
.venv/bin/pytest tests/test_present.py -m slow         # the page in headless Chromium; screenshots in
                                                       # test-artifacts/ (or $CXR_TEST_ARTIFACTS)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.constants import NEGATIVE, OUT_OF_DISTRIBUTION, POSITIVE, UNCERTAIN
from cxr.evaluation.gate import OOD_REASONS
from cxr.serving.cli import TABLE, cli
from cxr.serving.inference import Prediction, load_model, predict_arrays
from cxr.serving.present import CAPTIONS, FIELDS, NOT_MEANINGFUL, answer, ood_level
from cxr.serving.serve import Service, create_app
from test_cli import cached, xray_gate
from test_inference import probe_model, save_model, sidecar, xray
from testkit.pipeline import ROOT
from testkit.serveapp import chromium_paths, headless_chromium, post_file, running, upload_in_page

OCT_ZIP = ROOT.parent / "shared" / "data" / "chest_xray_224.zip"
OCT_MEMBER = "CellData/OCT/test/CNV/CNV-placeholder-test-1.jpeg"
ARTIFACTS = Path(os.environ.get("CXR_TEST_ARTIFACTS") or ROOT / "test-artifacts")
COVERAGE = 0.9012  # the refer band's validation coverage written into the test gate
# compared exactly between the CLI's JSON, the API and the page (the probability to 1e-6)
RAW = ("label", "threshold", "threshold_source", "ood_score", "ood", "ood_reason", "ood_detector", "refer_low")
SHOWN = FIELDS


# --- unit tests of the presentation -------------------------------------------------------------


def pred(label: str, probability: float = 0.7, **kw) -> Prediction:
    base = {"threshold": 0.4655, "refer_low": 0.0331, "refer_high": 0.9568}
    return Prediction("x.png", probability, label, **{**base, **kw})


def test_out_of_distribution_hides_the_finding_and_names_the_detector():
    p = pred(OUT_OF_DISTRIBUTION, 0.0103, ood=True, ood_score=12238825563519.12, ood_detector="features")
    p = dataclasses.replace(p, ood_reason=OOD_REASONS["features"])
    a = answer(p, COVERAGE)
    assert a["finding"] is False and a["shown_probability"] == NOT_MEANINGFUL and a["gradcam_caption"] is None
    assert a["ood_level"] == "> 100x the limit" and a["ood_score"] == 12238825563519.12  # raw only in the JSON
    assert "0.0103" not in a["reason"] and "12238825563519" not in a["reason"]
    assert OOD_REASONS["features"] in a["reason"] and "the feature check" in a["reason"]
    assert "not meaningful for this input" in a["reason"]


def test_ood_score_is_shown_bounded():
    assert ood_level(0.3512) == "0.35x the limit" and ood_level(1.0) == "1.00x the limit"
    assert ood_level(45.4) == "45x the limit" and ood_level(100.0) == "100x the limit"
    assert ood_level(100.01) == "> 100x the limit" and ood_level(float("inf")) == "> 100x the limit"
    assert ood_level(float("nan")) == "> 100x the limit" and ood_level(None) == "no OOD gate"
    assert max(len(ood_level(s)) for s in np.logspace(-3, 20, 200)) <= len("> 100x the limit")


def test_uncertain_says_refer_with_the_band_and_its_coverage():
    a = answer(pred(UNCERTAIN, 0.9517, threshold=0.624, refer_low=0.2, refer_high=0.9599, ood=False), COVERAGE)
    assert a["finding"] is True and a["shown_probability"] == "0.9517"
    assert a["reason"].startswith("refer: P(pneumonia) 0.9517 is between the low and high edge of the refer band")
    assert "0.2000 and 0.9599" in a["reason"] and "90.1% of the validation X-rays" in a["reason"]
    assert a["refer_band"] == "0.2000 to 0.9599 (outside it the model answers 90.1% of the validation X-rays)"
    assert a["refer_val_coverage"] == COVERAGE and a["gradcam_caption"] == CAPTIONS[UNCERTAIN]


def test_classes_are_explained_by_the_threshold_and_where_it_came_from():
    pos = answer(pred(POSITIVE, 0.99, ood=False, ood_score=0.35), COVERAGE)
    neg = answer(pred(NEGATIVE, 0.01, ood=False, ood_score=0.2), COVERAGE)
    assert pos["reason"] == (
        "P(pneumonia) 0.9900 is at or above the threshold 0.4655 (chosen on the validation X-rays), "
        "outside the refer band 0.0331 to 0.9568."
    )
    assert neg["reason"].startswith("P(pneumonia) 0.0100 is below the threshold 0.4655")
    assert "raised P(pneumonia)" in pos["gradcam_caption"] and "not evidence of disease" in neg["gradcam_caption"]
    assert pos["ood_level"] == "0.35x the limit" and pos["shown_threshold"] == "0.4655"


def test_site_threshold_has_no_band():
    p = pred(NEGATIVE, 0.2, threshold=0.3, refer_low=None, refer_high=None, ood=False, threshold_source="site:s.json")
    a = answer(p, None)
    assert a["refer_band"] is None and a["refer_val_coverage"] is None
    assert "set by the site file s.json" in a["reason"] and "no refer band with a site threshold" in a["reason"]
    assert "refer:" not in a["reason"]


def test_no_gate_and_errors():
    a = answer(Prediction("x.png", 0.8, POSITIVE, 0.5), None)
    assert a["ood_level"] == "no OOD gate" and "no OOD gate beside the model" in a["reason"] and a["finding"]
    e = answer(Prediction("bad.png", None, None, 0.5, error="bad.png: cannot decode image"), None)
    assert e["finding"] is None and e["shown_probability"] == "-" and e["reason"] == "bad.png: cannot decode image"
    assert e["gradcam_caption"] is None


# --- a tiny gated model and the files of the issue ---------------------------------------------


@pytest.fixture(scope="module")
def gated(tmp_path_factory) -> Path:
    """probe model + a gate fitted on synthetic X-rays; threshold and refer band placed around
    the probability of `refer.png`, with `xray.png` below the band (NORMAL)."""
    from cxr.evaluation import gate as ood

    tmp = tmp_path_factory.mktemp("gated")
    model = probe_model(seed=2)
    path = save_model(model, tmp / "models" / "gated.keras", sidecar(threshold=0.5, variant="gated"))
    gate = xray_gate(model, tmp)
    p_x, p_r = predict_arrays(model, np.stack([cached(xray(s, (300, 240)), tmp) for s in (200, 205)]))
    half = abs(float(p_r) - float(p_x)) / 2
    assert half > 1e-3  # far from float noise
    band = {"refer_low": float(p_r) - half, "refer_high": float(p_r) + half}
    gate = dataclasses.replace(gate, **band, meta={**gate.meta, "val_coverage": COVERAGE})
    gate.save(ood.gate_path(path))
    path.with_suffix(".json").write_text(json.dumps(sidecar(threshold=float(p_r), variant="gated")))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The uploads without ../shared: an X-ray, one in the refer band, a blank image."""
    folder = tmp_path_factory.mktemp("uploads")
    out = {"xray": folder / "xray.png", "refer": folder / "refer.png", "blank": folder / "blank.png"}
    Image.fromarray(xray(200, (300, 240))).save(out["xray"])
    Image.fromarray(xray(205, (300, 240))).save(out["refer"])
    Image.fromarray(np.full((400, 400), 30, np.uint8)).save(out["blank"])
    return out


def oct_file(folder: Path, require_shared) -> Path:
    """A retinal OCT scan (the mirror's placeholder), extracted from ../shared's archive (in CI a
    missing ../shared fails the test in one line, elsewhere it skips: tests/conftest.py)."""
    require_shared(OCT_ZIP)
    target = folder / "oct.jpeg"
    with zipfile.ZipFile(OCT_ZIP) as archive:
        target.write_bytes(archive.read(OCT_MEMBER))
    return target


@pytest.fixture(scope="module")
def service(gated):
    svc = Service(load_model(gated), gated, 1 << 22)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def url(service):
    with running(create_app(service)) as base:
        yield base


def cli_rows(paths: list[Path], model: Path, fmt: str, capsys) -> tuple[str, list[dict]]:
    """`cxr predict` in batches of one, as the service answers each upload: the same floats to the bit."""
    status = cli(["predict", *map(str, paths), "--model", str(model), "--format", fmt, "--batch-size", "1"])
    out = capsys.readouterr().out
    assert status == 0
    if fmt == "json":
        return out, json.loads(out)
    if fmt == "csv":
        return out, list(csv.DictReader(io.StringIO(out)))
    return out, table_rows(out)


def table_rows(text: str) -> list[dict[str, str]]:
    """The table's cells by the header's column starts (the reason is the rest of the line)."""
    header, *lines = text.splitlines()
    starts = [header.index(head) for head, _ in TABLE]
    ends = [*starts[1:], None]
    return [{key: line[a:b].strip() for (_, key), a, b in zip(TABLE, starts, ends)} for line in lines]


def api_answer(url: str, path: Path) -> dict:
    status, body = post_file(url + "/predict?gradcam=true", path.name, path.read_bytes())
    assert status == 200, body
    return body


def assert_same(got: dict, want: dict, keys: tuple[str, ...] = RAW + SHOWN) -> None:
    assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
    for key in keys:
        assert got[key] == want[key], (key, got[key], want[key])


def test_the_labels_of_the_issue(gated, files, capsys):
    _, rows = cli_rows(list(files.values()), gated, "json", capsys)
    by = {Path(r["path"]).stem: r for r in rows}
    assert [by[k]["label"] for k in ("xray", "refer", "blank")] == [NEGATIVE, UNCERTAIN, OUT_OF_DISTRIBUTION]
    assert by["refer"]["reason"].startswith("refer: P(pneumonia)") and "90.1%" in by["refer"]["reason"]
    assert by["blank"]["finding"] is False and by["blank"]["ood_detector"] == "blank"
    assert "below the threshold" in by["xray"]["reason"] and by["xray"]["finding"] is True


def test_cli_json_csv_table_and_api_agree_field_for_field(gated, files, url, capsys):
    paths = list(files.values())
    _, rows = cli_rows(paths, gated, "json", capsys)
    _, csv_rows = cli_rows(paths, gated, "csv", capsys)
    table, table_cells = cli_rows(paths, gated, "table", capsys)
    for path, row, crow, trow in zip(paths, rows, csv_rows, table_cells):
        body = api_answer(url, path)
        assert body["path"] == path.name and row["path"] == str(path)
        assert_same(body, row)
        for key in RAW + SHOWN:  # the CSV: every field, None as "", floats by repr
            want = row[key]
            text = "" if want is None else (repr(want) if isinstance(want, float) else str(want))
            assert crow[key] == text, key
        assert trow == {
            "path": str(path),
            "shown_probability": row["shown_probability"],
            "label": row["label"],
            "shown_threshold": row["shown_threshold"],
            "ood_level": row["ood_level"],
            "reason": row["reason"],
        }
        if row["finding"]:
            assert body["gradcam_png"] and body["gradcam_error"] is None
        else:  # out of distribution: no overlay to read as evidence
            assert body["gradcam_png"] is None and NOT_MEANINGFUL in body["gradcam_error"]
    assert str(ROOT) not in table.splitlines()[0]


def test_cli_gradcam_writes_no_overlay_for_out_of_distribution(gated, files, tmp_path, capsys):
    cams = tmp_path / "cams"
    status = cli(
        ["predict", *map(str, files.values()), "--model", str(gated), "--format", "json", "--gradcam", str(cams)]
    )
    rows = json.loads(capsys.readouterr().out)
    assert status == 0
    assert sorted(p.name for p in cams.iterdir()) == ["refer_gradcam.png", "xray_gradcam.png"]
    assert [r["gradcam"] is None for r in rows] == [not r["finding"] for r in rows]


# --- the page in headless Chromium ------------------------------------------------------------


@pytest.mark.slow
def test_page_explains_every_answer_in_headless_chromium(gated, files, url, tmp_path, capsys, require_shared):
    """Upload an X-ray, a retinal OCT scan, a blank image and an image in the refer band through the
    page; read label, reason and the cells from the DOM; compare them with the API and `cxr predict`."""
    if chromium_paths() is None:
        if os.environ.get("CXR_REQUIRE_CHROMIUM"):
            pytest.fail("chromium/chromedriver not on PATH but CXR_REQUIRE_CHROMIUM is set (.ci/run installs them)")
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    uploads = {**files, "oct": oct_file(tmp_path, require_shared)}
    _, rows = cli_rows(list(uploads.values()), gated, "json", capsys)
    want = {Path(r["path"]).stem: r for r in rows}
    _, csv_rows = cli_rows(list(uploads.values()), gated, "csv", capsys)
    _, table_cells = cli_rows(list(uploads.values()), gated, "table", capsys)
    in_csv = {Path(r["path"]).stem: r for r in csv_rows}
    in_table = {Path(r["path"]).stem: r for r in table_cells}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = {}
    with headless_chromium() as driver:
        for name, path in uploads.items():
            pages[name] = upload_in_page(driver, url, path)
            driver.save_screenshot(str(ARTIFACTS / f"present_{name}.png"))
    for name, page in pages.items():
        row, body = want[name], api_answer(url, uploads[name])
        assert_same(body, row)
        assert page["state"] == "done", page
        cells = {
            "label": "label",
            "reason": "reason",
            "probability": "shown_probability",
            "threshold": "shown_threshold",
            "ood": "ood_level",
        }
        for cell, key in cells.items():  # the page shows what JSON, CSV, table and API say
            assert page[cell] == row[key] == body[key] == in_csv[name][key], (name, cell)
            assert page[cell] == in_table[name][key], (name, cell)
        assert page["band"] == (row["refer_band"] or "") and page["caption"] == (row["gradcam_caption"] or "")
    assert [pages[k]["label"] for k in ("xray", "refer", "blank", "oct")] == [
        NEGATIVE,
        UNCERTAIN,
        OUT_OF_DISTRIBUTION,
        OUT_OF_DISTRIBUTION,
    ]
    for name in ("blank", "oct"):  # no pneumonia evidence: no probability as a finding, no Grad-CAM
        page = pages[name]
        assert page["finding"] == "no" and page["probability"] == NOT_MEANINGFUL
        assert page["probability_class"] == "not-meaningful" and page["overlay_width"] == "0"
        assert page["caption"] == "" and "Grad-CAM" not in page["caption"]
        assert "P(pneumonia) and Grad-CAM are not meaningful" in page["reason"] and "x the limit" in page["ood"]
        assert "e+" not in page["ood"] and len(page["ood"]) <= len("> 100x the limit")
    assert "blank" in pages["blank"]["reason"] and "check" in pages["oct"]["reason"]
    refer = pages["refer"]
    assert refer["reason"].startswith("refer: P(pneumonia)") and "between the low and high edge" in refer["reason"]
    assert "90.1%" in refer["band"] and int(refer["overlay_width"]) == 32 and "refer" in refer["caption"]
    assert pages["xray"]["finding"] == "yes" and int(pages["xray"]["overlay_width"]) == 32
    assert "not evidence of disease" in pages["xray"]["caption"] and "below the threshold" in pages["xray"]["reason"]
    for name in uploads:
        assert Image.open(ARTIFACTS / f"present_{name}.png").size[0] > 500
