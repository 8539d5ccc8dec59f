"""DICOM through the one image path (cxr.data.images → cxr.data.dicom), and no patient data in any output.

.venv/bin/pytest tests/test_dicom.py
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
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLosslessSV1, RLELossless

from cxr.data.images import load_resized, open_image
from cxr.data.pixels import ImageError
from cxr.serving.cli import cli, collect_images
from test_inference import SIZE, probe_model, save_model, sidecar, xray
from testkit.dicomfiles import PHI, write_dicom

ROOT = Path(__file__).resolve().parents[1]
RAW_SAMPLE = ROOT.parent / "shared" / "data" / "raw_sample"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"


def gray(path: Path) -> np.ndarray:
    return np.asarray(open_image(path), np.int32)


def phi_words() -> set[str]:
    """Every PHI value, and each name/word of it long enough not to occur by chance."""
    words = set(PHI.values())
    for value in PHI.values():
        words |= {w for w in value.replace("^", " ").split() if len(w) >= 5}
    return words


def assert_no_phi(text: str) -> None:
    leaked = sorted(w for w in phi_words() if w.lower() in text.lower())
    assert not leaked, f"patient data in the output: {leaked}"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return save_model(probe_model(), tmp_path_factory.mktemp("model") / "probe.keras", sidecar())


def predict_json(paths: list[Path], model_path: Path, capsys) -> tuple[int, list[dict], str]:
    status = cli(["predict", *map(str, paths), "--model", str(model_path), "--format", "json"])
    out, err = capsys.readouterr()
    return status, json.loads(out), err


# ---- the same array as the equivalent PNG ----------------------------------------------------


def encodings(pixels: np.ndarray, folder: Path) -> dict[str, Path]:
    """One 8-bit picture as a PNG and as DICOM files whose pixel pipeline maps back to it exactly."""
    folder.mkdir(parents=True, exist_ok=True)
    p16 = pixels.astype(np.uint16) * 16  # 12 bits stored
    return {
        "png": _png(pixels, folder / "x.png"),
        "8bit": write_dicom(folder / "x8.dcm", pixels),
        # 16p through the window 2040.5/4081 (output 0..4095) is p again after scaling to 0..255
        "12bit_window": write_dicom(folder / "x12.dcm", p16, bits_stored=12, WindowCenter=2040.5, WindowWidth=4081),
        # the rescale gives p back (as float); the window 128/256 is then the identity
        "rescale_window": write_dicom(
            folder / "xr.dcm",
            p16,
            bits_stored=12,
            RescaleSlope=0.0625,
            RescaleIntercept=0,
            WindowCenter=128,
            WindowWidth=256,
        ),
        "monochrome1": write_dicom(folder / "x1.dcm", 255 - pixels, photometric="MONOCHROME1"),
        "rle": _rle(pixels, folder / "xrle.dcm"),
        "no_suffix": write_dicom(folder / "x_dicom_without_suffix", pixels),
    }


def _png(pixels: np.ndarray, path: Path) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _rle(pixels: np.ndarray, path: Path) -> Path:
    """RLE Lossless: compressed, and decoded by pydicom itself (no plugin needed)."""
    import pydicom

    write_dicom(path, pixels)
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    ds.save_as(path)
    return path


def test_dicom_encodings_give_the_png_array(tmp_path):
    files = encodings(xray(3, (80, 60)), tmp_path)
    want = {s: a for s, a in load_resized(files.pop("png"), [SIZE, 64], "pad").items()}
    for name, path in files.items():
        got = load_resized(path, [SIZE, 64], "pad")
        for s in want:
            np.testing.assert_array_equal(got[s], want[s], err_msg=f"{name} at {s} px")


def test_raw_sample_as_dicom_predicts_what_the_png_does(tmp_path, model_path, capsys, require_shared):
    """Real X-rays (one per class) as PNG and as each DICOM encoding: identical arrays at 224 px
    and identical probabilities from `cxr predict`."""
    require_shared(RAW_SAMPLE)
    sources = [sorted((RAW_SAMPLE / c).glob("*.jpeg"))[0] for c in ("NORMAL", "PNEUMONIA")]
    for n, src in enumerate(sources):
        files = encodings(np.asarray(open_image(src), np.uint8), tmp_path / str(n))
        png = files.pop("png")
        want = load_resized(png, [224])[224]
        for name, path in files.items():
            np.testing.assert_array_equal(load_resized(path, [224])[224], want, err_msg=f"{src.name} as {name}")
        status, rows, _ = predict_json([png, *files.values()], model_path, capsys)
        assert status == 0
        probs = np.array([r["probability"] for r in rows])
        np.testing.assert_allclose(probs[1:], probs[0], rtol=0, atol=1e-6)


# ---- the pixel pipeline, against formulas written out here ---------------------------------


def ramp16(lo: int = 0, hi: int = 4095) -> np.ndarray:
    return np.linspace(lo, hi, 40 * 64).reshape(40, 64).round().astype(np.uint16)


def linear_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto 0..255."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y = np.where(x <= c - 0.5 - (w - 1) / 2, 0, np.where(x > c - 0.5 + (w - 1) / 2, 255, y))
    return np.round(y).astype(np.int32)


def test_window_centre_and_width(tmp_path):
    raw = ramp16()
    got = gray(write_dicom(tmp_path / "w.dcm", raw, bits_stored=12, WindowCenter=1500, WindowWidth=1000))
    np.testing.assert_allclose(got, linear_window(raw.astype(float), 1500, 1000), atol=1)
    assert got.min() == 0 and got.max() == 255  # clipped outside the window
    # several windows: the first one is used
    first = gray(
        write_dicom(tmp_path / "w2.dcm", raw, bits_stored=12, WindowCenter=[1500, 3000], WindowWidth=[1000, 200])
    )
    np.testing.assert_array_equal(first, got)


def test_rescale_slope_and_intercept_come_before_the_window(tmp_path):
    raw = ramp16()
    values = raw * 2.0 - 1024  # what the Modality LUT makes of them
    got = gray(
        write_dicom(
            tmp_path / "r.dcm",
            raw,
            bits_stored=12,
            RescaleSlope=2,
            RescaleIntercept=-1024,
            WindowCenter=2000,
            WindowWidth=3000,
        )
    )
    np.testing.assert_allclose(got, linear_window(values, 2000, 3000), atol=1)


def test_voi_lut_sequence_is_preferred_to_the_window(tmp_path):
    raw = ramp16()
    lut = Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 8])  # LUT Descriptor: 4096 entries from 0, 8 bits out
    lut.add_new(0x00283006, "US", [255 - i // 16 for i in range(4096)])  # LUT Data: an inverting table
    got = gray(
        write_dicom(tmp_path / "lut.dcm", raw, bits_stored=12, VOILUTSequence=[lut], WindowCenter=100, WindowWidth=10)
    )
    np.testing.assert_array_equal(got, 255 - raw // 16)


def test_monochrome1_is_inverted(tmp_path):
    pixels = xray(1)
    m2 = gray(write_dicom(tmp_path / "m2.dcm", pixels))
    m1 = gray(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1, 255 - m2)
    np.testing.assert_array_equal(m2, pixels)


def test_16_bit_without_a_window_is_stretched_like_a_16_bit_png(tmp_path):
    raw = ramp16(300, 3800)
    Image.fromarray(raw).save(tmp_path / "r16.png")  # mode I;16
    got = gray(write_dicom(tmp_path / "r16.dcm", raw, bits_stored=12))
    np.testing.assert_array_equal(got, gray(tmp_path / "r16.png"))
    assert got.min() == 0 and got.max() == 255
    signed = gray(write_dicom(tmp_path / "s16.dcm", (raw.astype(np.int32) - 2048).astype(np.int16), bits_stored=16))
    np.testing.assert_array_equal(signed, got)  # signed pixels: the same picture


def test_rgb_is_grayed_like_a_colour_png(tmp_path):
    rgb = np.stack([xray(1), xray(2), xray(3)], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    np.testing.assert_array_equal(
        gray(write_dicom(tmp_path / "c.dcm", rgb, photometric="RGB")), gray(tmp_path / "c.png")
    )


# ---- files that cannot be used: one clear line each -------------------------------------------


def error_of(path: Path) -> str:
    with pytest.raises(ImageError) as info:
        open_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}") and "\n" not in message
    return message


def test_unusable_dicom_files_get_a_clear_error(tmp_path):
    px = xray(0)
    multi = write_dicom(tmp_path / "multi.dcm", np.stack([px, px, px]))
    assert "3 frames" in error_of(multi) and "single-frame" in error_of(multi)
    sr = write_dicom(tmp_path / "sr.dcm", px, SOPClassUID=BASIC_TEXT_SR, Modality="SR", PixelData=None)
    assert "not an image (Basic Text SR Storage)" in error_of(sr)
    pr = write_dicom(tmp_path / "pr.dcm", px, SOPClassUID=GRAYSCALE_PRESENTATION_STATE, Modality="PR", PixelData=None)
    assert "not an image (Grayscale Softcopy Presentation State Storage)" in error_of(pr)
    ct = write_dicom(tmp_path / "ct.dcm", px, Modality="CT")
    assert "modality CT is not a chest radiograph; cxr reads CR and DX only" in error_of(ct)
    assert "no Modality" in error_of(write_dicom(tmp_path / "none.dcm", px, Modality=None))
    np.testing.assert_array_equal(
        gray(write_dicom(tmp_path / "cr.dcm", 255 - px, photometric="MONOCHROME1", Modality="CR")), px
    )  # CR is read
    not_dicom = tmp_path / "fake.dcm"
    not_dicom.write_bytes(b"just text, no preamble" * 20)
    assert "not a DICOM file" in error_of(not_dicom)


def test_the_error_names_the_sop_instance_uid(tmp_path):
    path = write_dicom(tmp_path / "ct.dcm", xray(0), Modality="CT", SOPInstanceUID="1.2.826.0.1.3680043.8.498.12345")
    assert f"{path} (SOP Instance UID 1.2.826.0.1.3680043.8.498.12345): modality CT" in error_of(path)


@pytest.mark.skipif(get_decoder(JPEGLosslessSV1).is_available, reason="a JPEG Lossless decoder is installed here")
def test_compressed_without_its_decoder_names_the_syntax_and_the_package(tmp_path):
    dummy = encapsulate([b"\xff\xd8\xff\xc3" + bytes(60) + b"\xff\xd9"])  # never decoded
    path = write_dicom(tmp_path / "jpll.dcm", xray(0), syntax=JPEGLosslessSV1, PixelData=dummy)
    message = error_of(path)
    assert (
        f"JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1]) ({JPEGLosslessSV1})"
        in message
    )
    assert "pip install 'pylibjpeg>=2.0' 'pylibjpeg-libjpeg>=2.1'" in message


# ---- patient data never leaves ----------------------------------------------------------------


def phi_files(folder: Path) -> dict[str, Path]:
    """A good PHI-laden DX file and PHI-laden ones failing in each way a DICOM file can."""
    px = xray(4)
    files = {
        "good": write_dicom(folder / "good.dcm", px, **PHI),
        "ct": write_dicom(folder / "ct.dcm", px, **PHI, Modality="CT"),
        "multi": write_dicom(folder / "multi.dcm", np.stack([px, px]), **PHI),
        "sr": write_dicom(folder / "sr.dcm", px, **PHI, SOPClassUID=BASIC_TEXT_SR, Modality="SR", PixelData=None),
        # PHI where a UID or code belongs: never quoted
        "uid": write_dicom(
            folder / "uid.dcm", px, **{**PHI, "Modality": PHI["PatientID"], "SOPInstanceUID": PHI["PatientName"]}
        ),
    }
    truncated = folder / "truncated.dcm"  # the pixel data cut short: pydicom's own error
    truncated.write_bytes(files["good"].read_bytes()[:-500])
    files["truncated"] = truncated
    # header values holding the name where a number or code belongs: pydicom's errors would quote them
    for name, keyword, placeholder in [
        ("badwindow", "WindowCenter", "1234567890.12345"),
        ("badframes", "NumberOfFrames", "123456789012"),
    ]:
        files[name] = with_phi_in(
            write_dicom(folder / f"{name}.dcm", px, **PHI, **{keyword: placeholder, "WindowWidth": 100}), placeholder
        )
    files["photometric"] = with_phi_in(
        write_dicom(folder / "photometric.dcm", px, **PHI, PhotometricInterpretation="MONOCHROME2 "), "MONOCHROME2 "
    )
    return files


def with_phi_in(path: Path, placeholder: str) -> Path:
    """Overwrite the one header value `placeholder` with (as much of) the patient's name (pydicom
    would refuse to write it)."""
    data, name = path.read_bytes(), PHI["PatientName"].replace("^", " ")[: len(placeholder)].encode()
    assert data.count(placeholder.encode()) == 1
    path.write_bytes(data.replace(placeholder.encode(), name))
    return path


def test_phi_never_reaches_an_error_message(tmp_path):
    files = phi_files(tmp_path)
    assert gray(files["good"]).shape == (48, 64)
    for name, path in files.items():
        if name != "good":
            assert_no_phi(error_of(path))


@pytest.mark.parametrize("fmt", ["json", "table", "csv"])
def test_phi_never_reaches_cxr_predict_output(tmp_path, model_path, capsys, fmt):
    files = phi_files(tmp_path / "in")
    status = cli(["predict", str(tmp_path / "in"), "--model", str(model_path), "--format", fmt])
    out, err = capsys.readouterr()
    assert status == 1 and str(files["good"]) in out
    assert_no_phi(out + err)
    if fmt == "csv":
        rows = {Path(r["path"]).name: r for r in csv.DictReader(io.StringIO(out))}
        assert rows["good.dcm"]["error"] == "" and all(rows[p.name]["error"] for n, p in files.items() if n != "good")


def test_phi_never_reaches_stderr_of_the_real_command(tmp_path, model_path):
    """A fresh process: warnings and log lines of pydicom would print here, not in capsys."""
    phi_files(tmp_path / "in")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.serving.cli",
            "predict",
            str(tmp_path / "in"),
            "--model",
            str(model_path),
            "--format",
            "json",
            "--verbose",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 1 and "good.dcm" in done.stdout
    assert_no_phi(done.stdout + done.stderr)


# ---- cxr predict: folders, mixed files ---------------------------------------------------------


def test_folder_with_dicom_png_and_a_bad_dicom(tmp_path, model_path, capsys):
    folder = tmp_path / "mixed"
    good = [
        write_dicom(folder / "a.dcm", xray(1)),
        write_dicom(folder / "b.DICOM", xray(2)),
        _png(xray(3), folder / "c.png"),
    ]
    bad = folder / "d.dcm"
    bad.write_bytes(good[0].read_bytes()[:200])
    (folder / "e").write_bytes(good[0].read_bytes())  # no suffix: only read when named
    assert collect_images([folder]) == [*good, bad]
    status, rows, err = predict_json([folder, folder / "e"], model_path, capsys)
    assert status == 1 and "1 of 5 file(s)" in err
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["d.dcm"]["probability"] is None and "d.dcm" in by_name["d.dcm"]["error"]
    assert all(0 < by_name[n]["probability"] < 1 for n in ("a.dcm", "b.DICOM", "c.png", "e"))
    assert by_name["e"]["probability"] == by_name["a.dcm"]["probability"]


def test_a_jpeg_does_not_load_pydicom(tmp_path):
    path = tmp_path / "x.jpg"
    Image.fromarray(xray(0)).save(path)
    code = f"import sys, cxr.data.images; cxr.data.images.open_image({str(path)!r}); print('pydicom' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert done.stdout.strip() == "False"
