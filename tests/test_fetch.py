"""Tests of the fetch stage: local sources, ranged and plain HTTP, and every refusal.

.venv/bin/pytest -q tests/test_fetch.py
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import re
import struct
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import yaml

from cxr.core.errors import CxrError
from cxr.data.archive import BudgetExceeded, coalesce, copy_capped, find_root
from cxr.data.fetch import fetch
from cxr.data.transport import TAIL_BYTES
from testkit.httpserver import LoopbackServer
from testkit.synth import Counts, jpeg_bytes, make_archive, make_xray

ROOT = Path(__file__).resolve().parent.parent
CAP = 64 << 20
IMAGE = re.compile(r"^(train|test)/(NORMAL|PNEUMONIA)/([^/.][^/]*\.(?:jpe?g|png))$", re.IGNORECASE)


# ---------------------------------------------------------------- helpers


def run(source: str, dest: Path, cap: int = CAP, timeout_s: float = 10.0):
    return fetch(source, dest, max_uncompressed_bytes=cap, timeout_s=timeout_s, progress=False)


def expected_images(data: bytes, root: str) -> dict[str, bytes]:
    """What fetch should write for an archive whose data folder is `root`: read straight from the zip."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in zf.namelist():
            if name.startswith(root) and (m := IMAGE.match(name[len(root) :])):
                out[f"chest_xray/{m.group(1)}/{m.group(2)}/{m.group(3)}"] = zf.read(name)
    return out


def written(raw: Path) -> dict[str, bytes]:
    return {
        p.relative_to(raw).as_posix(): p.read_bytes() for p in raw.rglob("*") if p.is_file() and p.name != "sha256.csv"
    }


def assert_raw(raw: Path, expected: dict[str, bytes]) -> None:
    """Exactly the expected images, nothing else, and a sorted sha256.csv that matches them."""
    assert sorted(os.listdir(raw)) == ["chest_xray", "sha256.csv"]
    assert written(raw) == expected
    with open(raw / "sha256.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "sha256", "bytes"]
    want = sorted([p, hashlib.sha256(b).hexdigest(), str(len(b))] for p, b in expected.items())
    assert rows[1:] == want


def eocd(data: bytes) -> tuple[int, int]:
    """(size, offset) of the central directory, parsed from the end records (zip64 aware)."""
    sig, _, _, _, _, size, offset, _ = struct.unpack("<4s4H2LH", data[-22:])
    assert sig == b"PK\x05\x06"
    if offset == 0xFFFFFFFF:
        record = struct.unpack("<4sLQL", data[-42:-22])[2]
        size, offset = struct.unpack("<4sQ2H2L4Q", data[record : record + 56])[-2:]
    return size, offset


def needed_bytes(data: bytes, root: str) -> tuple[int, int, int]:
    """(chest members' local headers + data, their compressed size, central directory size)."""
    cd_size, cd_offset = eocd(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    starts = sorted(i.header_offset for i in infos) + [cd_offset]
    chest = [i for i in infos if i.filename.startswith(root) and IMAGE.match(i.filename[len(root) :])]
    spans = sum(starts[starts.index(i.header_offset) + 1] - i.header_offset for i in chest)
    return spans, sum(i.compress_size for i in chest), cd_size


def to_zip64(data: bytes) -> bytes:
    """Rewrite a small zip's end records the way a >4 GB archive has them (zip64 record + locator)."""
    sig, _, _, n_disk, n_total, cd_size, cd_offset, comment = struct.unpack("<4s4H2LH", data[-22:])
    assert sig == b"PK\x05\x06" and comment == 0
    body = data[:-22]
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n_disk, n_total, cd_size, cd_offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, len(body), 1)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0)
    return body + record + locator + end


def patch_central(data: bytes, name: str, offset: int, fmt: str, value: int) -> bytes:
    """Overwrite one field of `name`'s central directory record (offset from the record start)."""
    _, cd_offset = eocd(data)
    pos = cd_offset
    while True:
        n, m, k = struct.unpack("<3H", data[pos + 28 : pos + 34])
        if data[pos + 46 : pos + 46 + n].decode() == name:
            out = bytearray(data)
            struct.pack_into(fmt, out, pos + offset, value)
            return bytes(out)
        pos += 46 + n + m + k


def mini_members(root: str = "CellData/chest_xray/") -> dict[str, bytes]:
    """Two tiny images in each of the four class folders."""
    return {
        f"{root}{s}/{c}/img-{i}.jpeg": jpeg_bytes(make_xray(c, i, (24, 20)))
        for s in ("train", "test")
        for c in ("NORMAL", "PNEUMONIA")
        for i in range(2)
    }


def zip_bytes(
    members: dict[str, bytes], extra: list[tuple[zipfile.ZipInfo | str, bytes]] = (), pad: bool = True
) -> bytes:
    """A zip of `members` and `extra`, then (pad) an incompressible OCT-like member, so that the
    chest members lie well before the end records a ranged fetch reads first."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for info, data in extra:
            zf.writestr(info, data)
        if pad:
            zf.writestr(
                "CellData/OCT/test/CNV/CNV-1-1.jpeg",
                random.Random(0).randbytes(40_000),
                compress_type=zipfile.ZIP_STORED,
            )
    return buf.getvalue()


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The standard synthetic archives: v3 (Mendeley names, big OCT part) and Kaggle."""
    folder = tmp_path_factory.mktemp("archives")
    # Enough v3 members that the central directory outgrows the tail the first request reads.
    v3 = {"train": Counts(normal=16, bacteria=16, virus=8), "test": Counts(normal=8, bacteria=6, virus=6)}
    kaggle = {"train": Counts(normal=5, bacteria=5, virus=3), "test": Counts(normal=3, bacteria=2, virus=2)}
    return {
        "v3": make_archive(folder / "v3.zip", "v3", v3, naming="mendeley", size=(96, 88), oct_bytes=3_000_000, seed=1),
        "kaggle": make_archive(folder / "kaggle.zip", "kaggle", kaggle, naming="kaggle", seed=2),
    }


ROOTS = {"v3": "CellData/chest_xray/", "kaggle": "chest_xray/"}


# ---------------------------------------------------------------- local sources


@pytest.mark.parametrize("layout", ["v3", "kaggle"])
def test_local_zip_keeps_only_chest_images(layout: str, archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives[layout].read_bytes()
    report = run(str(archives[layout]), tmp_path / "raw")
    expected = expected_images(data, ROOTS[layout])
    assert_raw(tmp_path / "raw", expected)
    assert report.root == ROOTS[layout] and report.files_written == len(expected) and not report.used_ranges
    with zipfile.ZipFile(archives[layout]) as zf:
        assert report.pruned == len(zf.namelist()) - len(expected) > 0
    assert sum(report.counts.values()) == len(expected)
    assert report.counts["test/NORMAL"] == sum(1 for p in expected if p.startswith("chest_xray/test/NORMAL/"))


def test_file_url_and_extracted_folders_give_the_same_result(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["v3"].read_bytes()
    expected = expected_images(data, ROOTS["v3"])
    run(archives["v3"].as_uri(), tmp_path / "from_url")
    assert_raw(tmp_path / "from_url", expected)
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(archives["v3"]) as zf:
        zf.extractall(extracted)
    for n, folder in enumerate([extracted, extracted / "CellData", extracted / "CellData" / "chest_xray"]):
        report = run(str(folder), tmp_path / f"from_dir{n}")
        assert_raw(tmp_path / f"from_dir{n}", expected)
        assert report.members == len(expected)


def test_kaggle_folder_takes_the_shallowest_copy(archives: dict[str, Path], tmp_path: Path) -> None:
    extracted = tmp_path / "kaggle"
    with zipfile.ZipFile(archives["kaggle"]) as zf:
        zf.extractall(extracted)
    # Mark the nested duplicate so that picking it would show.
    (extracted / "chest_xray" / "chest_xray" / "train" / "NORMAL" / "only-in-nested.jpeg").write_bytes(b"x")
    run(str(extracted), tmp_path / "raw")
    assert_raw(tmp_path / "raw", expected_images(archives["kaggle"].read_bytes(), "chest_xray/"))


def test_find_root_rules() -> None:
    names = [
        "__MACOSX/chest_xray/train/NORMAL/._a.jpeg",
        "__MACOSX/chest_xray/test/NORMAL/._a.jpeg",
        "x/chest_xray/chest_xray/train/NORMAL/a.jpeg",
        "x/chest_xray/chest_xray/test/NORMAL/a.jpeg",
        "x/chest_xray/train/NORMAL/a.jpeg",
        "x/chest_xray/test/",
        "y/OCT/train/a.jpeg",
    ]
    assert find_root(names, "t") == "x/chest_xray/"
    with pytest.raises(CxrError, match="several 'chest_xray' folders"):
        find_root(
            ["a/chest_xray/train/N/x", "a/chest_xray/test/N/x", "b/chest_xray/train/N/x", "b/chest_xray/test/N/x"], "t"
        )


def test_coalesce_merges_small_gaps_within_the_slack() -> None:
    spans = [(0, 1000), (1000, 2000), (2005, 3000), (9000, 10000)]
    assert coalesce(spans, slack=0.01) == [(0, 3000), (9000, 10000)]  # 5-byte gap within 1% of 4000, 6000 not
    assert coalesce(spans, slack=0.0) == [(0, 2000), (2005, 3000), (9000, 10000)]
    assert coalesce(spans, slack=2.0) == [(0, 10000)]


def test_copy_capped_counts_actual_bytes() -> None:
    payload = os.urandom(3000)
    out = io.BytesIO()
    assert copy_capped(io.BytesIO(payload), out, 3000) == (hashlib.sha256(payload).hexdigest(), 3000)
    with pytest.raises(BudgetExceeded):
        copy_capped(io.BytesIO(payload), io.BytesIO(), 2999)


# ---------------------------------------------------------------- HTTP


def test_ranged_fetch_downloads_only_the_chest_part(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["v3"].read_bytes()
    spans, compressed, cd_size = needed_bytes(data, ROOTS["v3"])
    assert len(data) - spans - cd_size >= 6 * spans  # the OCT part dwarfs what we need
    with LoopbackServer(data, ranges=True) as server:
        report = run(server.url, tmp_path / "raw")
    assert_raw(tmp_path / "raw", expected_images(data, ROOTS["v3"]))
    assert report.used_ranges and report.bytes_transferred == server.body_bytes
    assert server.body_bytes <= 1.05 * (spans + cd_size)
    assert server.body_bytes <= 1.05 * (compressed + cd_size)
    assert server.body_bytes < 0.2 * len(data)
    assert report.central_directory_bytes == cd_size and report.compressed_bytes == compressed
    assert all(status == 206 for _, _, status in server.stats.requests)
    assert cd_size > TAIL_BYTES  # so the central directory needs its own request
    assert len(server.stats.requests) <= 4  # end records, central directory, coalesced members


def test_ranged_fetch_of_interleaved_kaggle_layout_skips_the_duplicates(
    archives: dict[str, Path], tmp_path: Path
) -> None:
    data = archives["kaggle"].read_bytes()
    spans, _, cd_size = needed_bytes(data, "chest_xray/")
    with LoopbackServer(data, ranges=True) as server:
        report = run(server.url, tmp_path / "raw")
    assert report.used_ranges and server.body_bytes <= 1.05 * (spans + cd_size) < 0.75 * len(data)
    assert_raw(tmp_path / "raw", expected_images(data, "chest_xray/"))


def test_ranged_fetch_reads_zip64_end_records(archives: dict[str, Path], tmp_path: Path) -> None:
    data = to_zip64(archives["v3"].read_bytes())
    spans, _, cd_size = needed_bytes(data, ROOTS["v3"])
    with LoopbackServer(data, ranges=True) as server:
        report = run(server.url, tmp_path / "raw")
    assert report.used_ranges and server.body_bytes <= 1.05 * (spans + cd_size)
    assert_raw(tmp_path / "raw", expected_images(data, ROOTS["v3"]))


def test_ranged_fetch_resumes_after_a_dropped_connection(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["v3"].read_bytes()
    spans, _, cd_size = needed_bytes(data, ROOTS["v3"])
    with LoopbackServer(data, ranges=True, drop_after=spans // 2) as server:
        report = run(server.url, tmp_path / "raw")
    assert server.stats.drops == 1 and report.used_ranges
    assert server.body_bytes <= 1.05 * (spans + cd_size)
    assert_raw(tmp_path / "raw", expected_images(data, ROOTS["v3"]))


def test_ranged_fetch_reads_through_small_junk_between_members(tmp_path: Path) -> None:
    members = {}
    for name, data in mini_members().items():
        members[name] = data
        folder, file = name.rsplit("/", 1)
        members[f"{folder}/._{file}"] = b"\x00\x05\x16\x07" + bytes(40)  # macOS AppleDouble junk
    members = {
        k: (jpeg_bytes(make_xray("NORMAL", i, (160, 144))) if "/._" not in k else v)
        for i, (k, v) in enumerate(members.items())
    }
    data = zip_bytes(members)
    spans, _, cd_size = needed_bytes(data, "CellData/chest_xray/")
    with LoopbackServer(data, ranges=True) as server:
        report = run(server.url, tmp_path / "raw")
    assert_raw(tmp_path / "raw", expected_images(data, "CellData/chest_xray/"))
    assert report.pruned == 9 and server.body_bytes <= 1.05 * (spans + cd_size)
    assert len(server.stats.requests) == 3  # the end records, the central directory, every member in one go


def test_plain_server_downloads_whole_archive(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["kaggle"].read_bytes()
    with LoopbackServer(data, ranges=False) as server:
        report = run(server.url, tmp_path / "data" / "raw")
    assert not report.used_ranges and report.bytes_transferred == server.body_bytes == len(data)
    assert_raw(tmp_path / "data" / "raw", expected_images(data, "chest_xray/"))
    assert os.listdir(tmp_path / "data") == ["raw"]  # the temporary download is gone


def test_plain_server_restarts_after_a_dropped_connection(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["kaggle"].read_bytes()
    with LoopbackServer(data, ranges=False, drop_after=len(data) // 2) as server:
        report = run(server.url, tmp_path / "raw")
    assert server.stats.drops == 1 and server.body_bytes == len(data) + len(data) // 2
    assert report.archive_bytes == len(data)  # started over, not appended
    assert_raw(tmp_path / "raw", expected_images(data, "chest_xray/"))


def test_download_resumes_with_range_when_server_allows_it_later(archives: dict[str, Path], tmp_path: Path) -> None:
    data = archives["kaggle"].read_bytes()
    with LoopbackServer(data, ranges=True, ignore_range_first=1, drop_after=len(data) // 2) as server:
        report = run(server.url, tmp_path / "raw")
    assert server.stats.drops == 1 and not report.used_ranges
    assert [status for _, _, status in server.stats.requests] == [200, 206]
    assert server.body_bytes == report.archive_bytes == len(data)  # no byte sent twice
    assert_raw(tmp_path / "raw", expected_images(data, "chest_xray/"))


# ---------------------------------------------------------------- refusals


def bad_archives() -> dict[str, tuple[bytes, str, int]]:
    """name → (zip bytes, expected message pattern, cap)."""
    good = mini_members()
    symlink = zipfile.ZipInfo("CellData/chest_xray/train/NORMAL/link.jpeg")
    symlink.create_system = 3
    symlink.external_attr = 0o120777 << 16
    bomb = dict(good, **{"CellData/chest_xray/train/NORMAL/bomb.jpeg": bytes(300_000)})
    missing = {k: v for k, v in good.items() if "/test/NORMAL/" not in k}
    empty_split = {k: v for k, v in good.items() if "/test/" not in k}
    lying = patch_central(zip_bytes(bomb), "CellData/chest_xray/train/NORMAL/bomb.jpeg", 24, "<L", 1000)
    method9 = patch_central(zip_bytes(good), "CellData/chest_xray/test/NORMAL/img-0.jpeg", 10, "<H", 9)
    corrupt = bytearray(zip_bytes(good, []))
    with zipfile.ZipFile(io.BytesIO(bytes(corrupt))) as zf:
        info = zf.getinfo("CellData/chest_xray/train/PNEUMONIA/img-1.jpeg")
    at = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    corrupt[at] ^= 0xFF
    full = zip_bytes(good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns about the duplicate name
        dup = zip_bytes(good, [("CellData/chest_xray/test/NORMAL/img-0.jpeg", b"other")])
    return {
        "dotdot": (zip_bytes(good, [("../evil.jpeg", b"x")]), r"'\.\./evil\.jpeg'.*zip-slip", CAP),
        "dotdot-inside": (
            zip_bytes(good, [("CellData/chest_xray/train/NORMAL/../../../../evil.jpeg", b"x")]),
            "zip-slip",
            CAP,
        ),
        "absolute": (zip_bytes(good, [(zipfile.ZipInfo("/tmp/evil.jpeg"), b"x")]), r"'/tmp/evil\.jpeg'.*zip-slip", CAP),
        "symlink": (zip_bytes(good, [(symlink, b"/etc/passwd")]), "link.jpeg' is a symbolic link", CAP),
        "bomb-declared": (zip_bytes(bomb), r"declares .* over fetch\.max_uncompressed_mb", 200_000),
        "bomb-lying-header": (lying, r"bomb\.jpeg' is corrupt \(Bad CRC-32", 200_000),
        "truncated": (full[: len(full) * 2 // 3], "truncated", CAP),
        "empty": (zip_bytes({}, pad=False), "the archive is empty", CAP),
        "no-chest": (zip_bytes({"CellData/OCT/train/CNV/a.jpeg": b"x"}), "no 'chest_xray' folder", CAP),
        "missing-class": (zip_bytes(missing), r"CellData/chest_xray/test/NORMAL/ is missing", CAP),
        "empty-split": (
            zip_bytes(
                empty_split, [("CellData/chest_xray/test/", b""), ("CellData/chest_xray/test/NORMAL/.DS_Store", b"x")]
            ),
            r"CellData/chest_xray/test/ holds no images \(empty split\)",
            CAP,
        ),
        "no-test-folder": (zip_bytes(empty_split), r"CellData/chest_xray/ has no test/ folder", CAP),
        "deflate64": (method9, "compression method 9", CAP),
        "corrupt-member": (bytes(corrupt), r"img-1\.jpeg' is corrupt", CAP),
        "duplicate": (dup, r"img-0\.jpeg' appears twice", CAP),
        "html-file": (b"<!DOCTYPE html><html>sign in</html>", "is not a zip archive", CAP),
    }


BAD = bad_archives()


def assert_refused(exc: pytest.ExceptionInfo[CxrError], pattern: str, data_dir: Path, before: bytes | None) -> None:
    """A one-line message, and data/ exactly as it was: no partial or temporary output."""
    message = str(exc.value)
    assert "\n" not in message and re.search(pattern, message), message
    if before is None:
        assert not data_dir.exists() or os.listdir(data_dir) == []
    else:
        assert os.listdir(data_dir) == ["raw"] and written(data_dir / "raw") == {"keep.txt": before}


@pytest.mark.parametrize("preexisting", [False, True], ids=["fresh", "existing-raw"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_local_archive_is_refused_and_leaves_no_output(case: str, preexisting: bool, tmp_path: Path) -> None:
    data, pattern, cap = BAD[case]
    src = tmp_path / "src" / "archive.zip"
    src.parent.mkdir()
    src.write_bytes(data)
    before = None
    if preexisting:
        (tmp_path / "data" / "raw").mkdir(parents=True)
        before = b"good data"
        (tmp_path / "data" / "raw" / "keep.txt").write_bytes(before)
    with pytest.raises(CxrError) as exc:
        run(str(src), tmp_path / "data" / "raw", cap=cap)
    assert_refused(exc, pattern, tmp_path / "data", before)


@pytest.mark.parametrize(
    "case", ["dotdot", "symlink", "bomb-declared", "truncated", "missing-class", "deflate64", "empty", "html-file"]
)
def test_bad_archive_over_ranges_is_refused_before_downloading_members(case: str, tmp_path: Path) -> None:
    data, pattern, cap = BAD[case]
    with LoopbackServer(data, ranges=True) as server:
        with pytest.raises(CxrError) as exc:
            run(server.url, tmp_path / "data" / "raw", cap=cap)
    assert_refused(exc, pattern, tmp_path / "data", None)
    # The end records and central directory only; a truncated archive also costs zipfile's search
    # for an archive comment (the last 64 KiB) and a peek at its first bytes.
    allowed = TAIL_BYTES + ((1 << 16) + 8 if case == "truncated" else 0)
    assert server.body_bytes <= allowed
    if case not in ("truncated", "empty", "html-file"):  # smaller than what is read at the end
        assert server.body_bytes < len(data) / 4


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"status": 404}, r"HTTP 404 Not Found"),
        ({"status": 500}, r"HTTP 500 Internal Server Error; the server failed"),
        ({"html": True}, r"is not a zip archive \(got text/html"),
        ({"delay_s": 30.0}, r"no answer within 0\.3 s \(fetch\.timeout_s\)"),
    ],
    ids=["404", "500", "html", "timeout"],
)
def test_http_errors_name_the_url(options: dict, pattern: str, tmp_path: Path) -> None:
    with LoopbackServer(b"unused", **options) as server:
        with pytest.raises(CxrError) as exc:
            run(server.url, tmp_path / "data" / "raw", timeout_s=0.3)
    assert server.url in str(exc.value)
    assert_refused(exc, pattern, tmp_path / "data", None)


def test_plain_server_html_is_refused(tmp_path: Path) -> None:
    data, pattern, cap = BAD["html-file"]
    with LoopbackServer(data, ranges=False) as server, pytest.raises(CxrError) as exc:
        run(server.url, tmp_path / "data" / "raw")
    assert server.url in str(exc.value)
    assert_refused(exc, pattern, tmp_path / "data", None)


def test_missing_source_and_bad_scheme(tmp_path: Path) -> None:
    with pytest.raises(CxrError, match="does not exist"):
        run(str(tmp_path / "nope.zip"), tmp_path / "raw")
    with pytest.raises(CxrError, match="unsupported URL scheme 'ftp'"):
        run("ftp://example.invalid/a.zip", tmp_path / "raw")


# ---------------------------------------------------------------- the stage script


def stage(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["fetch"]["source"] = source
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "fetch.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stage_script_fetches_and_reports_errors_in_one_line(archives: dict[str, Path], tmp_path: Path) -> None:
    bad = stage(tmp_path, str(tmp_path / "missing.zip"))
    assert bad.returncode == 1 and bad.stdout == ""
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: fetch.source ") and "missing.zip does not exist" in lines[0]
    assert not (tmp_path / "data" / "raw").exists()

    good = stage(tmp_path, str(archives["kaggle"]))
    assert good.returncode == 0, good.stderr
    assert len(good.stdout.strip().splitlines()) == 1 and good.stdout.startswith("fetched ")
    assert_raw(tmp_path / "data" / "raw", expected_images(archives["kaggle"].read_bytes(), "chest_xray/"))


# ---------------------------------------------------------------- the real archive (../shared)

REAL = ROOT.parent / "shared" / "data" / "chest_xray_224.zip"


def test_real_archive_over_ranges_matches_the_local_fetch(tmp_path: Path, require_shared) -> None:
    require_shared(REAL)
    data = REAL.read_bytes()
    spans, compressed, cd_size = needed_bytes(data, ROOTS["v3"])
    local = run(str(REAL), tmp_path / "local")
    with LoopbackServer(data, ranges=True) as server:
        ranged = run(server.url, tmp_path / "ranged")
    assert (
        local.counts
        == ranged.counts
        == {"train/NORMAL": 1341, "train/PNEUMONIA": 3875, "test/NORMAL": 234, "test/PNEUMONIA": 390}
    )
    assert (tmp_path / "local" / "sha256.csv").read_bytes() == (tmp_path / "ranged" / "sha256.csv").read_bytes()
    assert ranged.used_ranges and ranged.compressed_bytes == compressed and ranged.pruned == 8  # the OCT samples
    assert server.body_bytes == ranged.bytes_transferred <= 1.05 * (spans + cd_size)
    assert len(server.stats.requests) <= 4
