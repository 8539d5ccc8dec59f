"""Fetch the chest X-ray data and keep only `chest_xray/{train,test}/{NORMAL,PNEUMONIA}` images.

    python stages/fetch.py        # the DVC stage: params.yaml fetch.* → data/raw

`fetch(source, dest, ...)` takes an http(s) URL, a file:// URL, a local zip or an extracted
folder. Over HTTP, when the server honours Range requests, only the end-of-central-directory
records, the central directory and the chest_xray members are downloaded (the Mendeley v3
archive is ~7.9 GB, of which ~6.6 GB are OCT scans we do not need); otherwise the archive is
downloaded whole, resuming after dropped connections. Every member is CRC-checked (zipfile does
it on read) and hashed; `dest` appears atomically with `chest_xray/` and `sha256.csv`.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import http.client
import io
import os
import re
import stat
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cxr.errors import CxrError
from cxr.io import atomic_dir, sweep_stale

SPLITS = ("train", "test")
CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
ROOT_NAME = "chest_xray"
# The first request reads this much of the archive's end: the end-of-central-directory record,
# the zip64 locator and record (98 bytes) and a short comment. Small, because whatever of it is
# not central directory is wasted.
TAIL_BYTES = 1024
# Gaps between wanted members (macOS "._" files, a stray .DS_Store) are read through while they
# stay within this fraction of the wanted bytes: each request costs a round trip, and this leaves
# room under the 5 % overhead we allow for local headers.
GAP_SLACK = 0.03
MAX_FAILURES = 5  # consecutive dropped connections without progress before giving up
CHUNK = 1 << 20
METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
MB = 1 << 20


@dataclass
class FetchReport:
    """What one fetch did; `bytes_transferred` counts HTTP body bytes (0 for local sources)."""

    source: str
    dest: str
    root: str  # the chest_xray folder that was kept, as named in the archive
    used_ranges: bool
    bytes_transferred: int
    requests: int
    archive_bytes: int  # size of the archive (or of every file under the folder)
    central_directory_bytes: int
    members: int  # images kept
    compressed_bytes: int  # their compressed size (= uncompressed for a folder)
    uncompressed_bytes: int
    files_written: int
    pruned: int  # archive entries (or files) not kept
    counts: dict[str, int] = field(default_factory=dict)  # "train/NORMAL" → images
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the stage's log."""
        c = self.counts
        how = "local copy"
        if self.requests:
            how = f"{_mb(self.bytes_transferred)} of {_mb(self.archive_bytes)} transferred in {self.requests} request(s)"
            how += " (ranged)" if self.used_ranges else " (whole archive)"
        return (
            f"fetched {self.files_written} images (train {c.get('train/NORMAL', 0)} NORMAL / {c.get('train/PNEUMONIA', 0)} PNEUMONIA, "
            f"test {c.get('test/NORMAL', 0)} / {c.get('test/PNEUMONIA', 0)}) from {self.root} into {self.dest}; "
            f"{self.pruned} entries pruned; {how}; {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class Pick:
    """One image to keep: its name in the source and its path under `dest`."""

    name: str
    out: str


def _mb(n: int) -> str:
    return f"{n / MB:.1f} MB"


def fetch(source: str, dest: Path | str, max_uncompressed_bytes: int, timeout_s: float = 60.0, progress: bool = True) -> FetchReport:
    """Fetch `source` into `dest` (written atomically) and report what was transferred."""
    if max_uncompressed_bytes <= 0:
        raise ValueError(f"max_uncompressed_bytes must be positive, got {max_uncompressed_bytes}")
    started = time.perf_counter()
    dest = Path(dest)
    source = source.strip()
    scheme = urllib.parse.urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        report = _fetch_http(source, dest, max_uncompressed_bytes, timeout_s, progress)
    else:
        path = _local_path(source)
        if path.is_dir():
            report = _fetch_folder(path, source, dest, max_uncompressed_bytes, progress)
        else:
            with _open_local_zip(path, source) as zf:
                report = _extract_zip(zf, source, dest, max_uncompressed_bytes, progress, archive_bytes=path.stat().st_size)
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
        raise CxrError(f"fetch.source {source}: unsupported URL scheme '{parsed.scheme}'; use http(s)://, file://, a zip file or a folder")
    else:
        path = Path(source).expanduser()
    if not path.exists():
        raise CxrError(f"fetch.source {source} does not exist; point it at the archive URL, a .zip file or an extracted folder")
    return path


# ---------------------------------------------------------------- choosing what to keep


def check_names(names: Iterable[str], display: str) -> None:
    """Refuse an archive with absolute or '..' member paths (zip-slip)."""
    for name in names:
        parts = re.split(r"[\\/]", name)
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            raise CxrError(f"{display}: member '{name}' has an absolute or '..' path (zip-slip); refusing the archive, get it from its original source")


def find_root(names: Iterable[str], display: str) -> str:
    """The shallowest `chest_xray/` folder (a name prefix ending in '/') that holds train/ and test/."""
    splits: dict[str, set[str]] = {}
    for name in names:
        parts = name.split("/")
        for i, part in enumerate(parts[:-1]):
            if part == "__MACOSX":
                break  # macOS resource forks, never the data
            if part == ROOT_NAME:
                prefix = "/".join(parts[: i + 1]) + "/"
                found = splits.setdefault(prefix, set())
                if i + 2 < len(parts):
                    found.add(parts[i + 1])
    if not splits:
        raise CxrError(f"{display}: no '{ROOT_NAME}' folder in it; point fetch.source at the Mendeley chest X-ray archive (or the Kaggle copy)")
    complete = [p for p, s in splits.items() if set(SPLITS) <= s]
    if not complete:
        shallowest = min(splits, key=lambda p: (p.count("/"), p))
        missing = ", ".join(f"{s}/" for s in SPLITS if s not in splits[shallowest])
        raise CxrError(f"{display}: {shallowest} has no {missing} folder; the archive is incomplete, fetch it again")
    depth = min(p.count("/") for p in complete)
    best = sorted(p for p in complete if p.count("/") == depth)
    if len(best) > 1:
        raise CxrError(f"{display}: several '{ROOT_NAME}' folders at the same depth ({', '.join(best)}); point fetch.source at one of them")
    return best[0]


def select(names: Iterable[str], root: str, display: str) -> tuple[list[Pick], dict[str, int]]:
    """The images under `root` in {train,test}/{NORMAL,PNEUMONIA}/ and their count per folder."""
    picks: list[Pick] = []
    seen: set[str] = set()
    counts = {f"{s}/{c}": 0 for s in SPLITS for c in CLASSES}
    for name in names:
        if not name.startswith(root):
            continue
        parts = name[len(root) :].split("/")
        if len(parts) != 3 or parts[0] not in SPLITS or parts[1] not in CLASSES:
            continue
        file = parts[2]
        if not file or file.startswith(".") or not file.lower().endswith(IMAGE_SUFFIXES):
            continue
        if name in seen:
            raise CxrError(f"{display}: member '{name}' appears twice; the archive is damaged, fetch it again")
        seen.add(name)
        counts[f"{parts[0]}/{parts[1]}"] += 1
        picks.append(Pick(name, f"{ROOT_NAME}/{parts[0]}/{parts[1]}/{file}"))
    for split in SPLITS:
        if not any(counts[f"{split}/{c}"] for c in CLASSES):
            raise CxrError(f"{display}: {root}{split}/ holds no images (empty split); the archive is incomplete, fetch it again")
        for cls in CLASSES:
            if not counts[f"{split}/{cls}"]:
                raise CxrError(f"{display}: {root}{split}/{cls}/ is missing or holds no images; the archive is incomplete, fetch it again")
    return picks, counts


def _cap_error(display: str, cap: int, declared: int | None = None) -> CxrError:
    what = f"declares {_mb(declared)} uncompressed" if declared is not None else "unpacks to more than that"
    return CxrError(f"{display}: the chest_xray part {what}, over fetch.max_uncompressed_mb = {cap / MB:g}; refusing it as a possible zip bomb (raise the limit if the archive is genuine)")


# ---------------------------------------------------------------- writing


class BudgetExceeded(Exception):
    """More bytes came than the budget allows."""


def copy_capped(src: BinaryIO, dst: BinaryIO, budget: int) -> tuple[str, int]:
    """Copy src to dst, returning (sha256, bytes); BudgetExceeded once more than `budget` bytes come."""
    digest = hashlib.sha256()
    n = 0
    while chunk := src.read(CHUNK):
        n += len(chunk)
        if n > budget:
            raise BudgetExceeded(n)
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest(), n


def _write_all(picks: list[Pick], opener: Callable[[Pick], BinaryIO], dest: Path, cap: int, display: str, progress: bool) -> list[tuple[str, str, int]]:
    """Write every pick under a temporary sibling of dest plus sha256.csv, then swap it in."""
    rows: list[tuple[str, str, int]] = []
    left = cap
    with atomic_dir(dest) as tmp:
        for pick in tqdm(picks, desc="extract", unit="file", disable=not progress):
            out = tmp / pick.out
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                with opener(pick) as src, open(out, "xb") as dst:
                    sha, n = copy_capped(src, dst, left)
            except BudgetExceeded:
                raise _cap_error(display, cap) from None
            left -= n
            rows.append((pick.out, sha, n))
        rows.sort()
        with open(tmp / "sha256.csv", "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(("path", "sha256", "bytes"))
            writer.writerows(rows)
    return rows


def _fetch_folder(folder: Path, display: str, dest: Path, cap: int, progress: bool) -> FetchReport:
    """Copy the chest_xray images out of an extracted folder (the folder itself may be chest_xray)."""
    base = Path(os.path.abspath(folder))
    files: dict[str, Path] = {}
    for dirpath, _dirs, filenames in os.walk(base):
        for f in filenames:
            path = Path(dirpath, f)
            files[path.relative_to(base.parent).as_posix()] = path
    root = find_root(files, display)
    picks, counts = select(sorted(files), root, display)
    for pick in picks:
        if files[pick.name].is_symlink():
            raise CxrError(f"{display}: {files[pick.name]} is a symbolic link; copy the real files instead")
    declared = sum(files[p.name].stat().st_size for p in picks)
    if declared > cap:
        raise _cap_error(display, cap, declared)
    rows = _write_all(picks, lambda p: open(files[p.name], "rb"), dest, cap, display, progress)
    written = sum(n for _, _, n in rows)
    return FetchReport(
        source=display, dest=str(dest), root=root, used_ranges=False, bytes_transferred=0, requests=0,
        archive_bytes=sum(p.stat().st_size for p in files.values() if not p.is_symlink()), central_directory_bytes=0,
        members=len(picks), compressed_bytes=written, uncompressed_bytes=written, files_written=len(rows),
        pruned=len(files) - len(picks), counts=counts,
    )


# ---------------------------------------------------------------- zip archives


def _open_local_zip(path: Path, display: str) -> zipfile.ZipFile:
    with open(path, "rb") as fh:
        head = fh.read(4)
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise _not_zip(display, head) from None


def _not_zip(display: str, head: bytes, content_type: str = "") -> CxrError:
    """Tell a truncated zip (it starts like one) from something that is no zip at all."""
    if head.startswith(b"PK\x03\x04"):
        return CxrError(f"{display}: the zip archive is truncated (no end of central directory); download it again")
    got = f" (got {content_type.split(';')[0]}, starting {head[:8]!r})" if content_type else f" (it starts with {head[:8]!r})"
    return CxrError(f"{display} is not a zip archive{got}; check fetch.source")


def check_members(infos: list[zipfile.ZipInfo], display: str) -> None:
    """Refuse zip-slip paths and symbolic links anywhere in the archive."""
    check_names((i.filename for i in infos), display)
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise CxrError(f"{display}: member '{info.filename}' is a symbolic link; refusing the archive, get it from its original source")


def central_directory_bytes(infos: list[zipfile.ZipInfo]) -> int:
    """Size of the central directory: a 46-byte record plus name, extra and comment per entry."""
    total = 0
    for i in infos:
        name = i.orig_filename.encode("utf-8" if i.flag_bits & 0x800 else "cp437")
        total += 46 + len(name) + len(i.extra) + len(i.comment)
    return total


def member_spans(infos: list[zipfile.ZipInfo], wanted: list[zipfile.ZipInfo], cd_start: int) -> list[tuple[int, int]]:
    """[start, end) of each wanted member's local header + data: up to where the next entry starts."""
    starts = sorted({i.header_offset for i in infos} | {cd_start})
    spans = []
    for info in wanted:
        k = bisect.bisect_right(starts, info.header_offset)
        spans.append((info.header_offset, starts[k] if k < len(starts) else cd_start))
    return spans


def coalesce(spans: list[tuple[int, int]], slack: float = GAP_SLACK) -> list[tuple[int, int]]:
    """Merge neighbouring spans, smallest gaps first, while the gap bytes stay within `slack` of the wanted bytes."""
    spans = sorted(spans)
    if not spans:
        return []
    allowance = slack * sum(e - s for s, e in spans)
    gaps = sorted((max(0, spans[i + 1][0] - spans[i][1]), i) for i in range(len(spans) - 1))
    joined = set()
    for gap, i in gaps:
        if gap > allowance:
            break
        allowance -= gap
        joined.add(i)
    merged = [spans[0]]
    for i in range(1, len(spans)):
        if i - 1 in joined:
            merged[-1] = (merged[-1][0], max(merged[-1][1], spans[i][1]))
        else:
            merged.append(spans[i])
    return merged


def _extract_zip(zf: zipfile.ZipFile, display: str, dest: Path, cap: int, progress: bool, archive_bytes: int, reader: RangeReader | None = None) -> FetchReport:
    """Check the archive's listing, then write the chest_xray images (ranged reads planned first)."""
    infos = zf.infolist()
    if not infos:
        raise CxrError(f"{display}: the archive is empty; check fetch.source")
    check_members(infos, display)
    root = find_root((i.filename for i in infos), display)
    picks, counts = select((i.filename for i in infos), root, display)
    by_name = {i.filename: i for i in infos}
    wanted = sorted((by_name[p.name] for p in picks), key=lambda i: i.header_offset)
    for info in wanted:
        if info.flag_bits & 0x1:
            raise CxrError(f"{display}: member '{info.filename}' is encrypted; use an unencrypted archive")
        if info.compress_type not in METHODS:
            raise CxrError(f"{display}: member '{info.filename}' uses compression method {info.compress_type}, which Python's zipfile cannot read (Deflate64 = 9 comes from Windows Explorer); re-pack it with plain deflate")
    declared = sum(i.file_size for i in wanted)
    if declared > cap:
        raise _cap_error(display, cap, declared)
    if reader is not None:
        reader.plan(coalesce(member_spans(infos, wanted, zf.start_dir)))
    out_of = {p.name: p for p in picks}
    picks = [out_of[i.filename] for i in wanted]  # archive order: ranged reads stream forward

    def opener(pick: Pick) -> BinaryIO:
        try:
            return _Checked(zf.open(by_name[pick.name]), display, pick.name)
        except (zipfile.BadZipFile, NotImplementedError) as exc:  # a local header that does not match
            raise _corrupt(display, pick.name, exc) from None

    rows = _write_all(picks, opener, dest, cap, display, progress)
    return FetchReport(
        source=display, dest=str(dest), root=root, used_ranges=reader is not None,
        bytes_transferred=reader.http.bytes if reader else 0, requests=reader.http.requests if reader else 0,
        archive_bytes=archive_bytes, central_directory_bytes=central_directory_bytes(infos), members=len(wanted),
        compressed_bytes=sum(i.compress_size for i in wanted), uncompressed_bytes=sum(n for _, _, n in rows),
        files_written=len(rows), pruned=len(infos) - len(wanted), counts=counts,
    )


def _corrupt(display: str, name: str, exc: Exception) -> CxrError:
    return CxrError(f"{display}: member '{name}' is corrupt ({' '.join(str(exc).split())}); download the archive again")


class _Checked(io.RawIOBase):
    """A member being read; corrupt-data errors name the member."""

    def __init__(self, inner: BinaryIO, display: str, name: str) -> None:
        self._inner, self._display, self._name = inner, display, name

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._inner.read(n)
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # CRC mismatch, bad deflate data, cut short
            raise _corrupt(self._display, self._name, exc) from None

    def close(self) -> None:
        self._inner.close()
        super().close()


# ---------------------------------------------------------------- HTTP


class HttpStatusError(CxrError):
    """The server answered with an error status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class TransientError(CxrError):
    """A timeout or a broken connection: worth another try."""


class Http:
    """Requests to one URL (after redirects), counting requests and body bytes."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.resolved = url  # where redirects led; retries start again from `url`
        self.timeout_s = timeout_s
        self.requests = 0
        self.bytes = 0

    def open(self, byte_range: str | None = None, fresh: bool = False) -> http.client.HTTPResponse:
        """GET with an optional `Range: bytes=...`; errors become one-line CxrErrors naming the URL."""
        headers = {"User-Agent": "cxr-fetch", "Accept-Encoding": "identity"}
        if byte_range:
            headers["Range"] = f"bytes={byte_range}"
        request = urllib.request.Request(self.url if fresh else self.resolved, headers=headers)
        self.requests += 1
        try:
            response = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            hint = "the server failed, try again later" if exc.code >= 500 else "check fetch.source"
            raise HttpStatusError(f"{self.url}: HTTP {exc.code} {exc.reason}; {hint}", exc.code) from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                raise TransientError(f"{self.url}: no answer within {self.timeout_s:g} s (fetch.timeout_s); check the URL and network, or raise the timeout") from None
            raise TransientError(f"{self.url}: cannot download ({' '.join(str(reason).split()) or type(reason).__name__}); check the URL and network") from None
        self.resolved = response.geturl()
        return response

    def read(self, response: http.client.HTTPResponse, view: memoryview) -> int:
        """readinto with a dropped connection or a stalled read reported as 0 bytes."""
        try:
            n = response.readinto(view)
        except (http.client.HTTPException, OSError):
            return 0
        self.bytes += n
        return n


def _content_range(response: http.client.HTTPResponse) -> tuple[int, int, int | None]:
    """(first, last, total) from a 206 answer's Content-Range."""
    m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("Content-Range", ""))
    if not m:
        return -1, -1, None
    return int(m.group(1)), int(m.group(2)), None if m.group(3) == "*" else int(m.group(3))


def _pause(failures: int) -> None:
    time.sleep(min(0.25 * 2 ** (failures - 1), 5.0))


class RangeReader(io.RawIOBase):
    """A seekable view of a remote file, read with HTTP Range requests.

    A read inside a planned span streams the rest of that span in one request (so members read
    in archive order cost one request per span); any other read fetches just what it asks for.
    The file's last bytes, fetched by the first request, are served from memory.
    """

    def __init__(self, http: Http, size: int, tail: bytes, bar: tqdm) -> None:
        self.http = http
        self._size = size
        self._tail = tail
        self._tail_start = size - len(tail)
        self._pos = 0
        self._spans: list[tuple[int, int]] = []
        self._response: http.client.HTTPResponse | None = None
        self._at = 0  # offset the open response will deliver next
        self._end = 0  # offset where it stops
        self._bar = bar

    def plan(self, spans: list[tuple[int, int]]) -> None:
        """The byte ranges about to be read, sorted; each becomes one request."""
        self._spans = sorted((s, min(e, self._tail_start)) for s, e in spans if s < self._tail_start)
        self._bar.total = self.http.bytes + sum(e - s for s, e in self._spans)
        self._bar.refresh()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < n:
            p = self._pos
            if p >= self._tail_start:
                k = n - done
                view[done : done + k] = self._tail[p - self._tail_start : p - self._tail_start + k]
            else:
                k = self._remote(view[done : done + min(n - done, self._tail_start - p)])
            done += k
            self._pos += k
        return done

    def close(self) -> None:
        self._drop()
        super().close()

    def _span_end(self, p: int, n: int) -> int:
        k = bisect.bisect_right(self._spans, (p, float("inf"))) - 1
        if k >= 0 and self._spans[k][0] <= p < self._spans[k][1]:
            return self._spans[k][1]
        return p + n

    def _remote(self, view: memoryview) -> int:
        """Fill part of view from offset self._pos, reusing the open response when it is ahead of us."""
        p = self._pos
        if self._response is not None and self._at < p < self._end:
            self._skip(p - self._at)  # a small gap inside a coalesced span
        if self._response is None or self._at != p or self._at >= self._end:
            self._open(p, self._span_end(p, len(view)))
        want = view[: min(len(view), self._end - p)]
        got = 0
        failures = 0
        while got < len(want):
            k = self.http.read(self._response, want[got:])
            if k:
                got += k
                self._at += k
                self._bar.update(k)
                failures = 0
                continue
            failures += 1
            if failures > MAX_FAILURES:
                raise CxrError(f"{self.http.url}: the connection kept dropping at byte {self._at}; try again later")
            _pause(failures)
            self._open(self._at, self._end, fresh=True)
        return got

    def _skip(self, n: int) -> None:
        scratch = bytearray(min(n, CHUNK))
        while n:
            k = self.http.read(self._response, memoryview(scratch)[: min(n, len(scratch))])
            if not k:
                self._drop()
                return
            self._at += k
            self._bar.update(k)
            n -= k

    def _open(self, start: int, end: int, fresh: bool = False) -> None:
        """Start streaming bytes [start, end), retrying timeouts and server errors a few times."""
        self._drop()
        for attempt in range(1, MAX_FAILURES + 2):
            try:
                response = self.http.open(f"{start}-{end - 1}", fresh=fresh or attempt > 1)
                break
            except (TransientError, HttpStatusError) as exc:
                if isinstance(exc, HttpStatusError) and exc.status < 500 or attempt > MAX_FAILURES:
                    raise
                _pause(attempt)
        first, last, _ = _content_range(response)
        if response.status != 206 or first != start or last != end - 1:
            response.close()
            raise CxrError(f"{self.http.url}: the server stopped honouring Range requests (HTTP {response.status} for bytes {start}-{end - 1}); fetch again")
        self._response, self._at, self._end = response, start, end

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


def _fetch_http(url: str, dest: Path, cap: int, timeout_s: float, progress: bool) -> FetchReport:
    """Ranged fetch when the server honours Range requests, else a resumable full download."""
    http = Http(url, timeout_s)
    try:
        first = http.open(f"-{TAIL_BYTES}")
    except HttpStatusError as exc:
        if exc.status != 416:  # a suffix longer than an empty file
            raise
        first = http.open()
    content_type = first.headers.get("Content-Type", "")
    if content_type.startswith("text/html"):
        head = first.read(8)
        first.close()
        raise _not_zip(url, head, content_type)
    start, last, total = _content_range(first) if first.status == 206 else (-1, -1, None)
    if first.status == 206 and (total is None or last != total - 1):
        first.close()  # a partial answer we cannot place: fetch it all instead
        first, total = http.open(fresh=True), None
    if total is None:
        return _download_and_extract(http, first, dest, cap, progress)
    tail = bytearray(last - start + 1)
    got = 0
    while got < len(tail) and (k := http.read(first, memoryview(tail)[got:])):
        got += k
    first.close()
    if got != len(tail):
        raise CxrError(f"{url}: the connection dropped while reading the end of the archive; try again")
    with tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, initial=http.bytes) as bar:
        with RangeReader(http, total, bytes(tail), bar) as reader:
            try:
                zf = zipfile.ZipFile(reader)
            except zipfile.BadZipFile:
                reader.seek(0)
                raise _not_zip(url, reader.read(8), content_type) from None
            with zf:
                return _extract_zip(zf, url, dest, cap, progress, archive_bytes=total, reader=reader)


def _download_and_extract(http: Http, first: http.client.HTTPResponse, dest: Path, cap: int, progress: bool) -> FetchReport:
    """Download the whole archive next to dest, then extract it like a local zip."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)  # a download a killed fetch left behind (it can be gigabytes)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.{os.getpid()}-download.", dir=dest.parent) as tmp:
        path = Path(tmp) / "archive.zip"
        download(http, first, path, progress)
        with _open_local_zip(path, http.url) as zf:
            report = _extract_zip(zf, http.url, dest, cap, progress, archive_bytes=path.stat().st_size)
    report.bytes_transferred, report.requests = http.bytes, http.requests
    return report


def download(http: Http, response: http.client.HTTPResponse, path: Path, progress: bool) -> None:
    """Stream a whole file to `path`; after a dropped connection resume with Range, or restart
    when the server ignores it, giving up after MAX_FAILURES tries in a row that gain nothing."""
    have, best, failures = 0, 0, 0
    total: int | None = None
    with open(path, "wb") as fh, tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar:
        while True:
            if response is not None:
                first, _, resumed_total = _content_range(response)
                if response.status == 206 and first != have:
                    response.close()
                    raise CxrError(f"{http.url}: asked to resume at byte {have}, the server answered from byte {first}; fetch again")
                if response.status == 206:
                    total = resumed_total
                else:  # a full answer: start over
                    fh.seek(0)
                    fh.truncate()
                    bar.reset()
                    length = response.headers.get("Content-Length")
                    total = int(length) if length else None
                bar.total = total
                _stream(http, response, fh, bar, check_zip=fh.tell() == 0)
                have = fh.tell()
                if total is None or have >= total:
                    return
                if have > best:
                    best, failures = have, 0
            failures += 1
            if failures > MAX_FAILURES:
                raise CxrError(f"{http.url}: the download kept breaking off ({have} of {total} bytes); try again later")
            _pause(failures)
            try:
                response = http.open(f"{have}-", fresh=True)
            except (TransientError, HttpStatusError) as exc:
                if isinstance(exc, HttpStatusError) and exc.status < 500:
                    raise
                response = None


def _stream(http: Http, response: http.client.HTTPResponse, fh: BinaryIO, bar: tqdm, check_zip: bool) -> None:
    """Append the body to fh until it ends or the connection drops; refuse a body that is no zip."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    try:
        while k := http.read(response, view):
            if check_zip:
                if not bytes(view[: min(k, 8)]).startswith(b"PK"):
                    raise _not_zip(http.url, bytes(view[: min(k, 8)]), response.headers.get("Content-Type", "unknown type"))
                check_zip = False
            fh.write(view[:k])
            bar.update(k)
    finally:
        response.close()
