"""Benchmark the fetch stage: a ranged fetch of the chest_xray part against downloading it all.

    .venv/bin/python bench/bench_fetch.py [--repeats 3]     # → table on stdout, bench/results/fetch.json

Builds a synthetic archive in the Mendeley v3 layout whose OCT part is about 6× the chest_xray
part (testkit/synth.py), serves it from a loopback HTTP server (testkit/httpserver.py) once with
Range support and once without, and fetches it with `cxr.data.fetch.fetch` both ways. A third row
("fsspec") runs the same archive logic (`cxr.data.archive.extract_zip`) over fsspec's HTTP file
(cache "bytes", 5 MiB blocks), the library transport cxr.data.transport is measured against. Reports
the bytes transferred ÷ the compressed size of the chest_xray members (goal ≤ 1.05), the
requests and the wall time of each way. Loopback has no latency or bandwidth limit, so the time saved on a real
network is larger than measured here: there it scales with the bytes not sent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import fsspec

from common import write_result
from cxr.data.archive import MB, extract_zip, open_zip
from cxr.data.fetch import fetch
from testkit.httpserver import LoopbackServer
from testkit.synth import Counts, make_archive

COUNTS = {
    "train": Counts(normal=30, bacteria=30, virus=20, images_per_patient=2),
    "test": Counts(normal=10, bacteria=8, virus=6, images_per_patient=2),
}
IMAGE_SIZE = (384, 352)
OCT_FACTOR = 6.5
FSSPEC_BLOCK = 5 << 20  # fsspec's default block size


def build(folder: Path) -> tuple[Path, int, int]:
    """The archive, the compressed size of its chest_xray images and of its OCT part."""
    probe = make_archive(folder / "probe.zip", "v3", COUNTS, naming="mendeley", size=IMAGE_SIZE, oct_bytes=8)
    with zipfile.ZipFile(probe) as zf:
        chest = sum(i.compress_size for i in zf.infolist() if "/chest_xray/" in i.filename)
    probe.unlink()
    path = make_archive(
        folder / "ZhangLabData.zip", "v3", COUNTS, naming="mendeley", size=IMAGE_SIZE, oct_bytes=int(OCT_FACTOR * chest)
    )
    with zipfile.ZipFile(path) as zf:
        oct_part = sum(i.compress_size for i in zf.infolist() if "/OCT/" in i.filename)
        chest_images = sum(
            i.compress_size for i in zf.infolist() if "/chest_xray/" in i.filename and i.filename.endswith(".jpeg")
        )
    return path, chest_images, oct_part


def fsspec_fetch(url: str, dest: Path) -> None:
    """cxr.data.archive's extraction over fsspec's HTTPFileSystem instead of cxr.data.transport."""
    fs = fsspec.filesystem("http", skip_instance_cache=True)
    with fs.open(url, "rb", block_size=FSSPEC_BLOCK, cache_type="bytes") as fh, open_zip(fh, url) as zf:
        extract_zip(zf, url, dest, 1024 * MB, progress=False)


def timed_fetch(data: bytes, mode: str, dest: Path) -> dict:
    """One fetch from a fresh server; wall time, bytes and requests as the server counted them."""
    report = None
    with LoopbackServer(data, ranges=mode != "full") as server:
        started = time.perf_counter()
        if mode == "fsspec":
            fsspec_fetch(server.url, dest)
        else:
            report = fetch(server.url, dest, max_uncompressed_bytes=1024 * MB, timeout_s=30, progress=False)
        seconds = time.perf_counter() - started
        return {
            "seconds": seconds,
            "server_bytes": server.body_bytes,
            "requests": len(server.stats.requests),
            "report": report,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="fetches per mode; the median time is reported")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as tmp:
        folder = Path(tmp)
        archive, chest, oct_part = build(folder)
        data = archive.read_bytes()
        runs: dict[str, list[dict]] = {"ranged": [], "full": [], "fsspec": []}
        for i in range(args.repeats):
            for mode in runs:  # alternate, so background load hits all alike
                runs[mode].append(timed_fetch(data, mode, folder / f"raw-{mode}-{i}"))
    ranged, full = runs["ranged"][0]["report"], runs["full"][0]["report"]
    result = {
        "archive_bytes": len(data),
        "chest_compressed_bytes": chest,
        "oct_bytes": oct_part,
        "oct_to_chest": round(oct_part / chest, 2),
        "images": ranged.files_written,
        "central_directory_bytes": ranged.central_directory_bytes,
        "repeats": args.repeats,
    }
    for mode, items in runs.items():
        result[mode] = {
            "bytes_transferred": items[0]["server_bytes"],
            "ratio_to_chest_compressed": round(items[0]["server_bytes"] / chest, 4),
            "ratio_to_chest_compressed_plus_cd": round(
                items[0]["server_bytes"] / (chest + ranged.central_directory_bytes), 4
            ),
            "requests": items[0]["requests"],
            "seconds_median": round(statistics.median(r["seconds"] for r in items), 3),
            "seconds_all": [round(r["seconds"], 3) for r in items],
        }
    result["goal_ratio_met"] = result["ranged"]["ratio_to_chest_compressed"] <= 1.05
    result["speedup"] = round(result["full"]["seconds_median"] / result["ranged"]["seconds_median"], 2)
    if ranged.counts != full.counts:
        raise SystemExit(f"ranged and full fetches disagree: {ranged.counts} vs {full.counts}")

    print(
        f"archive {len(data) / MB:.1f} MB: chest_xray {chest / MB:.1f} MB compressed "
        f"({ranged.files_written} images), OCT {oct_part / MB:.1f} MB ({result['oct_to_chest']}x)"
    )
    print(f"{'mode':<8} {'MB sent':>9} {'÷ chest':>8} {'requests':>9} {'median s':>9}  all s")
    for mode in runs:
        r = result[mode]
        print(
            f"{mode:<8} {r['bytes_transferred'] / MB:>9.2f} {r['ratio_to_chest_compressed']:>8.3f} "
            f"{r['requests']:>9} {r['seconds_median']:>9.3f}  {r['seconds_all']}"
        )
    print(
        f"ranged ÷ chest compressed = {result['ranged']['ratio_to_chest_compressed']:.3f} (goal ≤ 1.05: "
        f"{'met' if result['goal_ratio_met'] else 'NOT met'}); ranged is {result['speedup']}x faster on loopback"
    )
    print(
        f"fsspec moves {result['fsspec']['ratio_to_chest_compressed']:.3f}x in {result['fsspec']['requests']} "
        "requests but neither resumes a dropped connection nor falls back to a whole download (docs/design.md, fetch)"
    )
    write_result("fetch", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
