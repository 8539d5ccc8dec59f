"""Fetch the chest X-ray data and keep only `chest_xray/{train,test}/{NORMAL,PNEUMONIA}` images.

    python stages/fetch.py        # the DVC stage: params.yaml fetch.* → data/raw

`fetch(source, dest, ...)` takes an http(s) URL, a file:// URL, a local zip or an extracted
folder. Where the bytes come from is cxr.data.transport's job: over HTTP, when the server honours
Range requests, only the end-of-central-directory records, the central directory and the
chest_xray members are downloaded (the Mendeley v3 archive is ~7.9 GB, of which ~6.6 GB are OCT
scans we do not need); otherwise the archive is downloaded whole, resuming after dropped
connections. What to keep, the checks and the writing are cxr.data.archive's: every member is
CRC-checked and hashed, and `dest` appears atomically with `chest_xray/` and `sha256.csv`.
"""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cxr.core.errors import CxrError
from cxr.data.archive import MB, Kept, copy_folder, extract_zip, mb, open_zip
from cxr.data.transport import open_url

__all__ = ["MB", "FetchReport", "fetch"]


@dataclass
class FetchReport(Kept):
    """What one fetch did; `bytes_transferred` counts HTTP body bytes (0 for local sources)."""

    source: str = ""
    dest: str = ""
    used_ranges: bool = False
    bytes_transferred: int = 0
    requests: int = 0
    archive_bytes: int = 0  # size of the archive (or of every file under the folder)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the stage's log."""
        c = self.counts
        how = "local copy"
        if self.requests:
            how = f"{mb(self.bytes_transferred)} of {mb(self.archive_bytes)} transferred in {self.requests} request(s)"
            how += " (ranged)" if self.used_ranges else " (whole archive)"
        return (
            f"fetched {self.files_written} images (train {c.get('train/NORMAL', 0)} "
            f"NORMAL / {c.get('train/PNEUMONIA', 0)} PNEUMONIA, "
            f"test {c.get('test/NORMAL', 0)} / {c.get('test/PNEUMONIA', 0)}) from {self.root} into {self.dest}; "
            f"{self.pruned} entries pruned; {how}; {self.seconds:.1f} s"
        )


def fetch(
    source: str, dest: Path | str, max_uncompressed_bytes: int, timeout_s: float = 60.0, progress: bool = True
) -> FetchReport:
    """Fetch `source` into `dest` (written atomically) and report what was transferred."""
    if max_uncompressed_bytes <= 0:
        raise ValueError(f"max_uncompressed_bytes must be positive, got {max_uncompressed_bytes}")
    started = time.perf_counter()
    dest = Path(dest)
    source = source.strip()
    cap = max_uncompressed_bytes
    if urllib.parse.urlparse(source).scheme.lower() in ("http", "https"):
        with (
            open_url(source, timeout_s, dest, progress) as remote,
            open_zip(remote.file, source, remote.content_type) as zf,
        ):
            kept = extract_zip(zf, source, dest, cap, progress, plan=remote.plan)
        report = FetchReport(
            **vars(kept),
            source=source,
            dest=str(dest),
            used_ranges=remote.ranged,
            bytes_transferred=remote.http.bytes,
            requests=remote.http.requests,
            archive_bytes=remote.size,
        )
    else:
        path = _local_path(source)
        if path.is_dir():
            kept, size = copy_folder(path, source, dest, cap, progress)
        else:
            with open_zip(path, source) as zf:
                kept = extract_zip(zf, source, dest, cap, progress)
            size = path.stat().st_size
        report = FetchReport(**vars(kept), source=source, dest=str(dest), archive_bytes=size)
    report.seconds = time.perf_counter() - started
    return report


def _local_path(source: str) -> Path:
    """The file or folder a non-HTTP source names (a plain path or a file:// URL)."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme.lower() == "file":
        if parsed.netloc not in ("", "localhost"):
            raise CxrError(f"fetch.source {source}: file:// URLs must name a local path (file:///abs/path)")
        path = Path(urllib.request.url2pathname(parsed.path))
    elif len(parsed.scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise CxrError(
            f"fetch.source {source}: unsupported URL scheme '{parsed.scheme}'; "
            "use http(s)://, file://, a zip file or a folder"
        )
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise CxrError(
            f"fetch.source {source} does not exist; point it at the archive URL, a .zip file or an extracted folder"
        )
    return path
