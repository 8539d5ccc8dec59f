"""HTTP(S) transport for fetch: a seekable ranged reader and a resumable whole download.

    used by cxr/data/fetch.py (python stages/fetch.py → data/raw)

`open_url(url, ...)` yields a seekable file for zipfile: over ranges when the server honours
them (only the bytes the caller reads, and plans, are downloaded), else the archive downloaded
whole next to `beside`. Both resume after a dropped connection from the byte they stopped at.
Hand-written on urllib rather than fsspec's HTTPFileSystem: fsspec neither retries nor resumes
a dropped body, and sends a whole archive to a server without Range support before it refuses
(figures in docs/design.md, "fetch").
"""

from __future__ import annotations

import bisect
import http.client
import io
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from cxr.core.errors import CxrError
from cxr.core.io import sweep_stale
from cxr.data.archive import CHUNK, not_zip

# The first request reads this much of the archive's end: the end-of-central-directory record,
# the zip64 locator and record (98 bytes) and a short comment. Small, because whatever of it is
# not central directory is wasted.
TAIL_BYTES = 1024
MAX_FAILURES = 5  # consecutive dropped connections without progress before giving up


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
                raise TransientError(
                    f"{self.url}: no answer within {self.timeout_s:g} s "
                    "(fetch.timeout_s); check the URL and network, or raise the timeout"
                ) from None
            raise TransientError(
                f"{self.url}: cannot download "
                f"({' '.join(str(reason).split()) or type(reason).__name__}); check the URL and network"
            ) from None
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
            raise CxrError(
                f"{self.http.url}: the server stopped honouring Range requests "
                f"(HTTP {response.status} for bytes {start}-{end - 1}); fetch again"
            )
        self._response, self._at, self._end = response, start, end

    def _drop(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None


@dataclass
class Remote:
    """An opened URL: a seekable file, whether it is read over ranges, and the traffic so far."""

    file: BinaryIO | Path  # the RangeReader, or the downloaded archive
    ranged: bool
    size: int
    content_type: str
    http: Http

    def plan(self, spans: list[tuple[int, int]]) -> None:
        """Tell a ranged reader which byte ranges come next (a download needs no plan)."""
        if isinstance(self.file, RangeReader):
            self.file.plan(spans)


@contextmanager
def open_url(url: str, timeout_s: float, beside: Path, progress: bool) -> Iterator[Remote]:
    """Open `url` over ranges when the server honours them, else download it whole into a
    temporary folder next to `beside` (removed afterwards, or by the next run if killed)."""
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
        raise not_zip(url, head, content_type)
    start, last, total = _content_range(first) if first.status == 206 else (-1, -1, None)
    if first.status == 206 and (total is None or last != total - 1):
        first.close()  # a partial answer we cannot place: fetch it all instead
        first, total = http.open(fresh=True), None
    if total is None:
        beside.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(beside)  # a download a killed fetch left behind (it can be gigabytes)
        with tempfile.TemporaryDirectory(prefix=f".{beside.name}.{os.getpid()}-download.", dir=beside.parent) as tmp:
            path = Path(tmp) / "archive.zip"
            download(http, first, path, progress)
            yield Remote(path, False, path.stat().st_size, content_type, http)
        return
    tail = bytearray(last - start + 1)
    got = 0
    while got < len(tail) and (k := http.read(first, memoryview(tail)[got:])):
        got += k
    first.close()
    if got != len(tail):
        raise CxrError(f"{url}: the connection dropped while reading the end of the archive; try again")
    with tqdm(
        desc="download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, initial=http.bytes
    ) as bar:
        with RangeReader(http, total, bytes(tail), bar) as reader:
            yield Remote(reader, True, total, content_type, http)


def download(http: Http, response: http.client.HTTPResponse, path: Path, progress: bool) -> None:
    """Stream a whole file to `path`; after a dropped connection resume with Range, or restart
    when the server ignores it, giving up after MAX_FAILURES tries in a row that gain nothing."""
    have, best, failures = 0, 0, 0
    total: int | None = None
    with (
        open(path, "wb") as fh,
        tqdm(desc="download", unit="B", unit_scale=True, unit_divisor=1024, disable=not progress) as bar,
    ):
        while True:
            if response is not None:
                first, _, resumed_total = _content_range(response)
                if response.status == 206 and first != have:
                    response.close()
                    raise CxrError(
                        f"{http.url}: asked to resume at byte {have}, the "
                        f"server answered from byte {first}; fetch again"
                    )
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
                    raise not_zip(
                        http.url, bytes(view[: min(k, 8)]), response.headers.get("Content-Type", "unknown type")
                    )
                check_zip = False
            fh.write(view[:k])
            bar.update(k)
    finally:
        response.close()
