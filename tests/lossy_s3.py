"""A loopback HTTP proxy in front of the tests' S3 server that loses answers: the store applied a write, and the
client never heard so (a 500 instead of its answer), so the SDK (botocore's retries) sends the same request again.

    proxy = LossyS3Proxy(upstream_endpoint)             # forwards every request to the S3 server
    proxy.lose_answer("PUT", "/_lease.json", condition="If-None-Match")   # the next such request: applied, answer lost
    env = {"AWS_ENDPOINT_URL_S3": proxy.endpoint}       # a job (or s3fs) pointed at it
    proxy.log                                           # (method, path, condition headers, store's status, sent status)
    proxy.stop()

The product code on the path is unchanged: the request reaches the real S3-protocol server, which applies it, and
only its answer is replaced. Test infrastructure only (a store's lost answer is not something a job can cause).
"""
from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse
from dataclasses import dataclass

_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "expect"}
_CONDITIONS = ("if-match", "if-none-match")
LOST_ANSWER = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code><Message>We encountered an '
               b"internal error. Please try again.</Message><RequestId>lossy-proxy</RequestId></Error>")


@dataclass
class _Rule:
    method: str
    path_suffix: str
    condition: str | None   # a header the request must carry (If-Match, If-None-Match), or None for any
    times: int


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str                # without the query
    conditions: dict         # the conditional headers the request carried
    store_status: int        # what the S3 server answered
    sent_status: int         # what the client got (500 where the answer was lost)


class LossyS3Proxy:
    def __init__(self, upstream: str):
        parsed = urllib.parse.urlsplit(upstream)
        self._upstream = (parsed.hostname, parsed.port)
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self.log: list[Exchange] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="lossy-s3-proxy", daemon=True)
        self._thread.start()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def lose_answer(self, method: str, path_suffix: str, *, condition: str | None = None, times: int = 1) -> None:
        """The next `times` requests of `method` on a path ending in `path_suffix` (carrying the header `condition`,
        when given) are applied by the store, and answered 500 instead of the store's answer."""
        with self._lock:
            self._rules.append(_Rule(method.upper(), path_suffix, condition.lower() if condition else None, times))

    def exchanges(self, method: str, path_suffix: str) -> list[Exchange]:
        with self._lock:
            return [e for e in self.log if e.method == method.upper() and e.path.endswith(path_suffix)]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------------------------------------ internals

    def _take_rule(self, method: str, path: str, headers: dict) -> bool:
        with self._lock:
            for rule in self._rules:
                if rule.times > 0 and rule.method == method and path.endswith(rule.path_suffix) \
                        and (rule.condition is None or rule.condition in headers):
                    rule.times -= 1
                    return True
        return False

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        method, path = h.command, urllib.parse.urlsplit(h.path).path
        body = _read_body(h)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP_BY_HOP}
        if body or method in ("PUT", "POST"):
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(*self._upstream, timeout=60)
        try:
            conn.request(method, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, reply_headers = resp.status, resp.getheaders()
        finally:
            conn.close()
        lower = {k.lower(): v for k, v in headers.items()}
        lost = self._take_rule(method, path, lower)
        with self._lock:
            self.log.append(Exchange(method, path, {k: lower[k] for k in _CONDITIONS if k in lower}, status,
                                     500 if lost else status))
        if lost:
            status, data = 500, LOST_ANSWER
            reply_headers = [("Content-Type", "application/xml")]
        h.send_response_only(status)
        for k, v in reply_headers:
            if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length":
                h.send_header(k, v)
        if method == "HEAD":
            length = next((v for k, v in reply_headers if k.lower() == "content-length"), "0")
        else:
            length = str(len(data))
        h.send_header("Content-Length", length)
        h.send_header("Connection", "close")
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)
        h.close_connection = True


def _read_body(h: http.server.BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(h.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(h.rfile.read(size))
            h.rfile.readline()
    length = int(h.headers.get("Content-Length") or 0)
    return h.rfile.read(length) if length else b""
