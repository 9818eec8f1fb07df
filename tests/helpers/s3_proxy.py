"""A small HTTP proxy in front of moto's S3 server that answers chosen requests with S3's own errors.

Everything else is relayed to the real server unchanged, so the client under test (s3fs, aiobotocore)
talks real HTTP to a real S3 implementation and meets the failures S3 documents: 503 SlowDown when a
prefix is throttled, 500 InternalError, 503 ServiceUnavailable, 400 RequestTimeout, 403 AccessDenied.
The error bodies follow "Error responses" in the Amazon S3 API reference
(https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html): an XML ``<Error>`` with
``Code``, ``Message``, ``Resource`` and ``RequestId``; a HEAD response carries no body.
"""

from __future__ import annotations

import http.client
import re
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

MESSAGES = {
    "SlowDown": "Please reduce your request rate.",
    "InternalError": "We encountered an internal error. Please try again.",
    "ServiceUnavailable": "Service is unable to handle request.",
    "RequestTimeout": "Your socket connection to the server was not read from or written to within the timeout period.",
    "AccessDenied": "Access Denied",
}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection", "expect"}


@dataclass
class Fault:
    method: str
    path: re.Pattern[str]
    status: int
    code: str
    times: int  # how many matching requests fail; then they pass
    every: int = 1  # fail one matching request in ``every`` (with ``times`` as the cap)
    seen: int = 0


class S3FaultProxy:
    """``with S3FaultProxy(moto_endpoint) as proxy:`` then point the client at ``proxy.url``."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, int]] = []  # (method, path, status answered)
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                proxy._relay(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    def __enter__(self) -> S3FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def fail(self, method: str, path: str, status: int, code: str, times: int = 1, every: int = 1) -> None:
        """Answer ``times`` requests of ``method`` whose path (with query) matches ``path`` with S3's ``code``."""
        with self._lock:
            self.faults.append(Fault(method, re.compile(path), status, code, times, every))

    def requests(self, method: str, path: str) -> list[int]:
        """The statuses answered to the requests of ``method`` whose path matches ``path``, in order."""
        pattern = re.compile(path)
        with self._lock:
            return [status for m, p, status in self.log if m == method and pattern.search(p)]

    # -- relaying -------------------------------------------------------------------------------------

    def _injected(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path.search(path):
                    fault.seen += 1
                    if fault.seen % fault.every == 0:
                        fault.times -= 1
                        return fault
        return None

    def _relay(self, handler: BaseHTTPRequestHandler) -> None:
        method, path = handler.command, handler.path
        body = _read_body(handler)
        fault = self._injected(method, path)
        if fault is not None:
            resource = urlsplit(path).path
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{fault.code}</Code><Message>{MESSAGES.get(fault.code, fault.code)}</Message>"
                f"<Resource>{resource}</Resource><RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
            ).encode()
            payload = b"" if method == "HEAD" else xml
            self._answer(handler, method, path, fault.status, [("Content-Type", "application/xml")], payload)
            return
        upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            upstream.request(method, path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            # a HEAD answer's Content-Length is the object's size, not that of the (empty) body
            dropped = HOP_BY_HOP if method == "HEAD" else HOP_BY_HOP | {"content-length"}
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in dropped]
            self._answer(handler, method, path, response.status, kept, data)
        finally:
            upstream.close()

    def _answer(
        self,
        handler: BaseHTTPRequestHandler,
        method: str,
        path: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> None:
        with self._lock:
            self.log.append((method, path, status))
        handler.send_response(status)
        for key, value in headers:
            handler.send_header(key, value)
        if not any(k.lower() == "content-length" for k, _ in headers):
            handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if method != "HEAD":
            handler.wfile.write(body)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""
