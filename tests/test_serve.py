"""cxr.serving.serve: the HTTP service and its page, on a tiny probe model served on 127.0.0.1.

.venv/bin/pytest tests/test_serve.py
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr.core.provenance import sha256_file
from cxr.evaluation.gradcam import GradCam, overlay
from cxr.serving.cli import build_parser
from cxr.serving.inference import load_model, predict_files
from cxr.serving.serve import INTENDED_USE, Service, create_app, safe_name
from test_dicom import BASIC_TEXT_SR, assert_no_phi
from test_inference import probe_model, save_model, sidecar, xray
from testkit.dicomfiles import PHI, write_dicom
from testkit.serveapp import chromium_paths, headless_chromium, post_file, running, upload_in_page

ROOT = Path(__file__).resolve().parents[1]
RAW_SAMPLE = ROOT.parent / "shared" / "data" / "raw_sample"
LIMIT = 1_000_000  # the service's upload limit in these tests


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.status == 200
        return json.loads(response.read())


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (300, 240)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(xray(seed, size)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb as far as any
    decoder can tell before inflating it."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(
        4, "big"
    )  # IHDR follows the 8-byte signature and 8-byte chunk head
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_model(probe_model(), tmp_path_factory.mktemp("model") / "probe.keras", sidecar(threshold=0.3))


@pytest.fixture(scope="module")
def service(model_path):
    svc = Service(load_model(model_path), model_path, LIMIT)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def url(service):
    with running(create_app(service)) as base:
        yield base


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> Path:
    """A raw_sample original when ../shared is here, else a synthetic JPEG."""
    if RAW_SAMPLE.is_dir():
        return sorted(RAW_SAMPLE.rglob("*.jpeg"))[0]
    path = tmp_path_factory.mktemp("img") / "synthetic.jpeg"
    path.write_bytes(jpeg_bytes())
    return path


def expected(path: Path, model_path: Path) -> dict:
    """What `cxr predict` answers for the file (its JSON row)."""
    (pred,) = predict_files([path], load_model(model_path))
    return pred.as_dict()


def assert_same_prediction(answer: dict, want: dict) -> None:
    assert answer["probability"] == pytest.approx(want["probability"], abs=1e-6)
    for key in ("label", "threshold", "ood_score", "ood", "ood_reason", "refer_low", "refer_high", "error"):
        assert answer[key] == want[key], key


def assert_serving(url: str) -> None:
    assert get_json(url + "/health") == {"status": "ok"}


def test_health_version_and_openapi(url, model_path):
    assert_serving(url)
    version = get_json(url + "/version")
    assert version["model"] == "probe" and version["model_sha256"] == sha256_file(model_path)
    assert version["threshold"] == 0.3 and version["image_size"] == 32 and version["ood_gate"] is False
    assert version["intended_use"] == INTENDED_USE and version["max_upload_bytes"] == LIMIT
    schema = get_json(url + "/openapi.json")
    assert {"/", "/predict", "/health", "/version"} <= set(schema["paths"])
    upload = schema["paths"]["/predict"]["post"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"413", "415", "422"} <= set(upload["responses"])


def test_predict_equals_cxr_predict(url, model_path, good_file):
    status, answer = post_file(url + "/predict", good_file.name, good_file.read_bytes())
    assert status == 200, answer
    assert_same_prediction(answer, expected(good_file, model_path))
    assert answer["path"] == good_file.name and "gradcam_png" not in answer
    assert answer["model"] == "probe" and answer["model_sha256"] == sha256_file(model_path)


def test_gradcam_overlay_is_the_cli_overlay(url, model_path, good_file):
    status, answer = post_file(url + "/predict?gradcam=true", good_file.name, good_file.read_bytes())
    assert status == 200, answer
    assert answer["gradcam_error"] is None
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["gradcam_png"]))))
    loaded, images = load_model(model_path), {}
    predict_files([good_file], loaded, on_image=images.__setitem__)
    np.testing.assert_array_equal(png, overlay(images[0], GradCam(loaded.model)(images[0])))


def test_a_model_without_grad_cam_still_answers(tmp_path, good_file):
    import keras

    inputs = keras.Input((32, 32, 1))
    dense = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(keras.layers.Flatten()(inputs)))
    path = save_model(dense, tmp_path / "dense.keras", sidecar())
    svc = Service(load_model(path), path, LIMIT)
    try:
        with open(good_file, "rb") as f:
            status, answer = svc.predict(f, good_file.name, gradcam=True)
    finally:
        svc.close()
    assert status == 200 and answer["gradcam_png"] is None and "Grad-CAM is not available" in answer["gradcam_error"]
    assert_same_prediction(answer, expected(good_file, path))


def test_different_images_get_different_answers(url, model_path, tmp_path):
    probabilities = set()
    for seed in range(3):
        path = tmp_path / f"x{seed}.jpeg"
        path.write_bytes(jpeg_bytes(seed))
        status, answer = post_file(url + "/predict", path.name, path.read_bytes())
        assert status == 200
        assert_same_prediction(answer, expected(path, model_path))
        probabilities.add(round(answer["probability"], 6))
    assert len(probabilities) == 3


def bad_requests(tmp_path: Path) -> list[tuple[str, dict, int, str]]:
    """(case, post_file kwargs, status, words in the detail)."""
    good = jpeg_bytes()
    no_pixels = write_dicom(
        tmp_path / "sr.dcm", xray(0), SOPClassUID=BASIC_TEXT_SR, Modality="SR", PixelData=None
    ).read_bytes()
    return [
        ("no file", {"filename": None, "data": None}, 422, "no file"),
        ("another field", {"filename": "a.jpeg", "data": good, "field": "image"}, 422, "no file"),
        ("empty file", {"filename": "empty.jpeg", "data": b""}, 422, "empty file"),
        (
            "not an image",
            {"filename": "notes.txt", "data": b"just some text\n" * 50},
            415,
            "notes.txt: cannot decode image",
        ),
        (
            "text named .jpeg",
            {"filename": "fake.jpeg", "data": b"\x00\x01garbage" * 100},
            415,
            "fake.jpeg: cannot decode image",
        ),
        (
            "truncated JPEG",
            {"filename": "cut.jpeg", "data": good[: len(good) // 2]},
            415,
            "cut.jpeg: cannot decode image",
        ),
        (
            "over MAX_PIXELS",
            {"filename": "bomb.png", "data": png_claiming(10_000, 6_000)},
            415,
            "over 50,000,000 pixels",
        ),
        (
            "Pillow's bomb guard",
            {"filename": "bomb2.png", "data": png_claiming(40_000, 40_000)},
            415,
            "decompression-bomb guard",
        ),
        ("DICOM without pixels", {"filename": "sr.dcm", "data": no_pixels}, 415, "not an image"),
        (
            "just over the limit",
            {"filename": "big.jpeg", "data": good + b"\x00" * (LIMIT + 1 - len(good))},
            413,
            "big.jpeg: over the upload limit of 1,000,000 bytes",
        ),
        (
            "far over the limit",
            {"filename": "huge.jpeg", "data": b"\x00" * (3 * LIMIT)},
            413,
            "over the upload limit of 1,000,000 bytes",
        ),
    ]


def test_bad_requests_get_a_clear_4xx_and_the_service_keeps_serving(url, model_path, good_file, service, tmp_path):
    for case, kwargs, status, words in bad_requests(tmp_path):
        got, answer = post_file(url + "/predict", **kwargs)
        assert (got, case) == (status, case), answer
        assert words in answer["detail"], (case, answer)
        assert str(service.workdir) not in answer["detail"] and "/tmp" not in answer["detail"], case
        assert_serving(url)
    status, answer = post_file(url + "/predict", good_file.name, good_file.read_bytes())
    assert status == 200
    assert_same_prediction(answer, expected(good_file, model_path))
    assert list(service.workdir.iterdir()) == []  # every upload deleted


def test_a_chunked_body_over_the_limit_gets_413(url):
    """No Content-Length to check: the middleware counts the body as it arrives."""
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="c.jpeg"\r\n\r\n'
    chunks = [head] + [b"\0" * 100_000] * 30 + [b"\r\n--b--\r\n"]
    request = urllib.request.Request(
        url + "/predict", data=iter(chunks), method="POST", headers={"Content-Type": "multipart/form-data; boundary=b"}
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 413 and json.loads(info.value.read())["detail"].startswith(
        "request body over the upload limit"
    )  # the middleware, not the copy
    assert_serving(url)


def test_dicom_answers_carry_no_patient_data(url, model_path, tmp_path, caplog):
    good = write_dicom(tmp_path / "good.dcm", xray(1, (200, 160)), **PHI)
    bad = write_dicom(tmp_path / "sr.dcm", xray(1), **PHI, SOPClassUID=BASIC_TEXT_SR, Modality="SR", PixelData=None)
    with caplog.at_level(logging.INFO):
        status, answer = post_file(url + "/predict?gradcam=true", good.name, good.read_bytes())
        assert status == 200
        assert_same_prediction(answer, expected(good, model_path))
        status, refused = post_file(url + "/predict", bad.name, bad.read_bytes())
        assert status == 415 and "sr.dcm" in refused["detail"]
        time.sleep(0.2)  # the access log line is written after the response
    assert "predict 200" in caplog.text and "predict 415" in caplog.text  # the log was captured
    for text in (json.dumps(answer), json.dumps(refused), caplog.text):
        assert_no_phi(text)


def test_concurrent_mixed_requests(url, model_path, tmp_path):
    files = {f"c{i}.jpeg": jpeg_bytes(i) for i in range(4)}
    want = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        want[name] = expected(tmp_path / name, model_path)
    jobs = [(name, data, 200) for name, data in files.items()] * 6 + [("bad.jpeg", b"nope" * 10, 415)] * 8

    def one(job):
        name, data, status = job
        got, answer = post_file(url + "/predict", name, data)
        return name, status, got, answer

    with ThreadPoolExecutor(8) as pool:
        for name, status, got, answer in pool.map(one, jobs):
            assert got == status, answer
            if status == 200:
                assert_same_prediction(answer, want[name])


def test_safe_name_keeps_the_base_name_and_suffix():
    assert safe_name("IM-0001.jpeg") == "IM-0001.jpeg"
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\scans\\a.dcm") == "a.dcm"
    assert safe_name(None) == "upload"
    assert safe_name(".hidden.dcm") == "upload.dcm"
    assert safe_name("x" * 300 + ".png") == "upload.png"


def test_cli_serve_options():
    parser = build_parser()
    args = parser.parse_args(["serve"])
    assert (args.host, args.port, args.max_upload_mb) == ("127.0.0.1", 8000, 64.0)
    for bad in (
        ["--port", "0"],
        ["--port", "70000"],
        ["--max-upload-mb", "-1"],
        ["--max-upload-mb", "nan"],
        ["--model", "m.keras", "--variant", "v"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", *bad])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cxr_serve_command_binds_loopback(model_path, good_file):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxr.serving.cli", "serve", "--model", str(model_path), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            try:
                assert_serving(base)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "cxr serve did not start"
                time.sleep(0.5)
        status, answer = post_file(base + "/predict", good_file.name, good_file.read_bytes())
        assert status == 200 and answer["model_sha256"] == sha256_file(model_path)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0].decode()
    assert (
        f"Uvicorn running on http://127.0.0.1:{port}" in out and "model probe (sha256" in out
    )  # bound to loopback only


@pytest.mark.slow
def test_page_in_headless_chromium(url, model_path, good_file, tmp_path):
    """Choose a file in the page's file input in a real Chromium and read the answer from the DOM."""
    if chromium_paths() is None:
        if os.environ.get("CXR_REQUIRE_CHROMIUM"):
            pytest.fail("chromium/chromedriver not on PATH but CXR_REQUIRE_CHROMIUM is set (.ci/run installs them)")
        pytest.skip("chromium and chromedriver not installed (apt-get install chromium chromium-driver)")
    want = expected(good_file, model_path)
    with headless_chromium() as driver:
        page = upload_in_page(driver, url, good_file)
        shot = tmp_path / "serve_page.png"
        driver.save_screenshot(str(shot))
        bad = tmp_path / "notes.txt"
        bad.write_text("not an x-ray")
        refused = upload_in_page(driver, url, bad)
    assert page["state"] == "done", page
    assert page["name"] == good_file.name
    assert page["probability"] == f"{want['probability']:.4f}" and page["label"] == want["label"]
    assert page["threshold"] == "0.3000" and page["ood"] == "no OOD gate" and "threshold 0.3000" in page["reason"]
    assert page["intended-use"] == INTENDED_USE and int(page["overlay_width"]) == 32
    assert Image.open(shot).size[0] > 500  # the screenshot is a real picture of the page
    assert refused["state"] == "error" and "HTTP 415" in refused["error"] and "notes.txt" in refused["error"]
