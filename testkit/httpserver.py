"""A loopback HTTP server for tests and benchmarks: serves one payload, counts what it sends.

    with LoopbackServer(zip_bytes, ranges=True) as server:
        fetch(server.url, ...)
        server.body_bytes   # body bytes actually written to clients

Modes: honour single `Range` requests (or ignore them, like a plain static server, optionally only
for the first few requests), drop the connection once part-way through a body, answer every
request with a fixed error status or an HTML page, or stall before answering (for timeouts).
Binds 127.0.0.1 on a free port; `stop()` (or leaving the `with`) shuts it down and joins it.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
HTML_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in.</body></html>\n"


@dataclass
class Stats:
    """What the server saw and sent; read it after the client is done."""

    body_bytes: int = 0
    requests: list[tuple[str, str | None, int]] = field(default_factory=list)  # (method, Range, status)
    drops: int = 0


class LoopbackServer:
    """Serve `payload` at `/archive.zip` (any path works) on 127.0.0.1 from a background thread."""

    def __init__(
        self,
        payload: bytes,
        *,
        ranges: bool = True,
        ignore_range_first: int = 0,
        drop_after: int | None = None,
        status: int | None = None,
        html: bool = False,
        delay_s: float = 0.0,
        chunk: int = 64 * 1024,
    ) -> None:
        self.payload = payload
        self.ranges = ranges
        self.ignore_range_first = ignore_range_first
        self.drop_after = drop_after
        self.status = status
        self.html = html
        self.delay_s = delay_s
        self.chunk = chunk
        self.stats = Stats()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/archive.zip"

    @property
    def body_bytes(self) -> int:
        return self.stats.body_bytes

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Wake any stalled handler, stop serving and join the thread (bounded)."""
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                server._answer(self, head=True)

            def do_GET(self) -> None:
                server._answer(self, head=False)

        return Handler

    def _record(self, handler: BaseHTTPRequestHandler, status: int) -> int:
        with self._lock:
            self.stats.requests.append((handler.command, handler.headers.get("Range"), status))
            return len(self.stats.requests)

    def _answer(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        if self.delay_s and self._stopping.wait(self.delay_s):
            return
        if self.status is not None:
            self._record(h, self.status)
            h.send_error(self.status)
            return
        if self.html:
            self._record(h, 200)
            self._send(h, 200, HTML_PAGE, {"Content-Type": "text/html; charset=utf-8"}, head)
            return
        size = len(self.payload)
        with self._lock:
            honour = self.ranges and len(self.stats.requests) >= self.ignore_range_first
        wanted = _parse_range(h.headers.get("Range"), size) if honour else None
        if wanted == "unsatisfiable":
            self._record(h, 416)
            self._send(h, 416, b"", {"Content-Range": f"bytes */{size}"}, head)
            return
        headers = {"Content-Type": "application/zip"}
        if self.ranges:
            headers["Accept-Ranges"] = "bytes"
        if wanted is None:
            self._record(h, 200)
            self._send(h, 200, self.payload, headers, head)
        else:
            start, end = wanted
            self._record(h, 206)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._send(h, 206, self.payload[start : end + 1], headers, head)

    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for key, value in headers.items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if head:
            return
        with self._lock:
            drop_at = (
                self.drop_after
                if self.drop_after is not None and self.stats.drops == 0 and len(body) > self.drop_after
                else None
            )
            if drop_at is not None:
                self.stats.drops += 1
        limit = len(body) if drop_at is None else drop_at
        sent = 0
        try:
            while sent < limit and not self._stopping.is_set():
                piece = body[sent : min(limit, sent + self.chunk)]
                h.wfile.write(piece)
                sent += len(piece)
                with self._lock:
                    self.stats.body_bytes += len(piece)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True
            return
        if drop_at is not None:
            # Cut the connection mid-body, as a flaky network would.
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(first, last) byte of a single `bytes=` range, 'unsatisfiable', or None to send it all."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None  # multiple or malformed ranges: a full answer is allowed
    first, last = m.group(1), m.group(2)
    if first == "":
        n = int(last)
        if n == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - n), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or end < start:
        return "unsatisfiable"
    return start, end
