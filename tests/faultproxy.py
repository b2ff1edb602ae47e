"""A fault-injecting HTTP proxy for tests, on 127.0.0.1 only (docs/reliability.md).

It sits in front of a real server (moto's S3 server, a real ``mlflow server``) and forwards every HTTP/1.1 request
to it, except that it can

* answer a chosen fraction of the requests with ``503 SlowDown``, ``500 InternalError`` or a reset connection (TCP
  RST), mixed, from a seeded random generator (so one seed gives one sequence of faults);
* add latency to every forwarded request;
* refuse everything for a window of seconds (:meth:`FaultProxy.outage`): the listening socket is closed, so clients
  get "connection refused" exactly as from a server that is down, and reopened on the same port afterwards.

A fault is decided before the request is forwarded: the upstream server never sees a faulted request (as with a
load balancer or S3's front end answering 503 SlowDown). Every decision is counted (:attr:`FaultProxy.stats`).

Bounded: after ``max_requests`` requests the proxy resets every further connection (so a client that retries without
end fails instead of hanging) and :attr:`FaultProxy.over_budget` is set; tests assert on it and carry a
``pytest.mark.timeout``.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Faults", "FaultProxy", "fault_proxy"]

FAULT_KINDS = ("503", "500", "reset")
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "expect",
               "proxy-connection"}  # fmt: skip
_BODIES = {
    "503": (
        b"Service Unavailable",
        b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
    ),  # fmt: skip
    "500": (
        b"Internal Server Error",
        b"<Error><Code>InternalError</Code><Message>We encountered an internal "
        b"error. Please try again.</Message></Error>",
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Faults:
    """What the proxy does to requests: ``rate`` of them get one of ``kinds`` (chosen uniformly), every forwarded
    one waits ``latency_s`` first; ``seed`` fixes the sequence; the first ``start_after`` requests (counted from
    :meth:`FaultProxy.set_faults` or the start) are all forwarded."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    latency_s: float = 0.0
    seed: int = 0
    start_after: int = 0

    def __post_init__(self) -> None:
        assert 0.0 <= self.rate <= 1.0, self.rate
        assert self.kinds and set(self.kinds) <= set(FAULT_KINDS), self.kinds


class FaultProxy:
    """A threaded HTTP/1.1 forwarding proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str, faults: Faults = Faults(), max_requests: int = 100_000) -> None:
        parts = urlsplit(upstream)
        assert parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost"), upstream
        self.upstream = (parts.hostname, parts.port or 80)
        self.max_requests = max_requests
        self.stats: Counter[str] = (
            Counter()
        )  # requests, forwarded, 503, 500, reset, over_budget, upstream_error
        self._lock = threading.Lock()
        self._faults = faults
        self._rng = random.Random(faults.seed)
        self._since = 0  # requests since the faults were set
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._down_until = 0.0
        self.port = 0
        self._open_listener()

    # ------------------------------------------------------------------------------------------- control

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def over_budget(self) -> bool:
        return self.stats["over_budget"] > 0

    def set_faults(self, faults: Faults) -> None:
        """Switch to ``faults`` (a new seeded sequence starts)."""
        with self._lock:
            self._faults, self._rng, self._since = faults, random.Random(faults.seed), 0

    def outage(self, seconds: float) -> threading.Thread:
        """Refuse every connection for ``seconds`` from now (listener closed, open connections reset), then listen
        again on the same port. Returns the thread that reopens it."""
        self.down()
        t = threading.Thread(
            target=self._reopen_after, args=(seconds,), daemon=True, name="faultproxy-outage"
        )
        t.start()
        return t

    def down(self) -> None:
        """Refuse every connection until :meth:`up` (the server is unreachable)."""
        with self._lock:
            self._down_until = float("inf")
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); the port stops listening
            with contextlib.suppress(OSError):
                listener.close()
        for c in conns:  # their threads see the end of the stream and close them (with a reset)
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                c.shutdown(socket.SHUT_RDWR)

    def up(self) -> None:
        """Listen again (same port) after :meth:`down`."""
        with self._lock:
            self._down_until = 0.0
        if self._listener is None and not self._stopped.is_set():
            self._open_listener()

    def stop(self) -> None:
        self._stopped.set()
        self.down()

    # ------------------------------------------------------------------------------------------ internals

    def _reopen_after(self, seconds: float) -> None:
        if not self._stopped.wait(seconds):
            self.up()

    def _open_listener(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:  # the old listener's port is still being released
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        s.listen(64)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True, name="faultproxy-accept").start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: an outage or stop
                return
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="faultproxy-conn").start()

    def _decide(self) -> str:
        """``forward`` or a fault kind for the next request (counted)."""
        with self._lock:
            self.stats["requests"] += 1
            if self.stats["requests"] > self.max_requests:
                self.stats["over_budget"] += 1
                return "over_budget"
            f = self._faults
            self._since += 1
            draw = self._since > f.start_after and self._rng.random() < f.rate
            kind = self._rng.choice(f.kinds) if draw else "forward"
            self.stats["forwarded" if kind == "forward" else kind] += 1
            return kind

    def _serve(self, conn: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        rfile = conn.makefile("rb")
        try:
            while not self._stopped.is_set():
                head = _read_head(rfile)
                if head is None:
                    return
                method, target, headers = head
                kind = self._decide()
                if kind in ("reset", "over_budget"):
                    _reset(conn)
                    return
                expects = headers.get("expect", "").lower() == "100-continue"
                if kind in _BODIES:
                    reason, text = _BODIES[
                        kind
                    ]  # HEAD: the status alone (a body would be read as the next reply)
                    _send(conn, kind, reason, b"" if method == "HEAD" else text, close=expects)
                    if expects:
                        return
                    _read_body(rfile, headers)
                    continue
                if expects:
                    conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = _read_body(rfile, headers)
                if self._faults.latency_s:
                    time.sleep(self._faults.latency_s)
                upstream = upstream or http.client.HTTPConnection(*self.upstream, timeout=120)
                try:
                    status, reason, out_headers, data = _forward(upstream, method, target, headers, body)
                except (OSError, http.client.HTTPException):
                    upstream.close()
                    upstream = None
                    with self._lock:
                        self.stats["upstream_error"] += 1
                    _send(conn, "502", b"Bad Gateway", b"upstream unreachable", close=True)
                    return
                _send_response(conn, status, reason, out_headers, data, head_only=method == "HEAD")
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            if upstream is not None:
                upstream.close()
            with contextlib.suppress(OSError):
                rfile.close()
                conn.close()


def _reset(conn: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0): the client sees "connection reset by peer" (the socket's file object,
    closed by its thread right after, holds the descriptor until then)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


def _read_head(rfile) -> tuple[str, str, dict[str, str]] | None:
    """(method, target, headers with lower-case names) of the next request, or None at the end of the stream."""
    line = rfile.readline(65537)
    while line in (b"\r\n", b"\n"):
        line = rfile.readline(65537)
    if not line:
        return None
    method, target, _version = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        h = rfile.readline(65537)
        if h in (b"\r\n", b"\n", b""):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _read_body(rfile, headers: dict[str, str]) -> bytes:
    """The request body: by Content-Length, or de-chunked."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        out = bytearray()
        while True:
            size = int(rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return bytes(out)
            out += rfile.read(size)
            rfile.readline()
    n = int(headers.get("content-length", "0") or 0)
    return rfile.read(n) if n else b""


def _forward(
    upstream: http.client.HTTPConnection, method: str, target: str, headers: dict[str, str], body: bytes
) -> tuple[int, str, list[tuple[str, str]], bytes]:
    fwd = {k: v for k, v in headers.items() if k not in _HOP_BY_HOP}
    if body or method in ("PUT", "POST", "PATCH"):
        fwd["content-length"] = str(len(body))
    upstream.request(method, target, body=body or None, headers=fwd)
    resp = upstream.getresponse()
    data = resp.read()
    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
    if resp.will_close:
        upstream.close()
    return resp.status, resp.reason, out, data


def _send(conn: socket.socket, code: str, reason: bytes, body: bytes, close: bool = False) -> None:
    head = [f"HTTP/1.1 {code} ".encode() + reason, b"Content-Type: application/xml",
            f"Content-Length: {len(body)}".encode()]  # fmt: skip
    # (to a HEAD request ``body`` is b"" and Content-Length 0: the client then reads no body)
    if close:
        head.append(b"Connection: close")
    conn.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)


def _send_response(
    conn: socket.socket,
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    data: bytes,
    head_only: bool,
) -> None:
    lines = [f"HTTP/1.1 {status} {reason}"]
    has_length = False
    for k, v in headers:
        if k.lower() == "content-length":
            if not head_only:
                continue  # replaced by the length of what is sent
            has_length = True
        lines.append(f"{k}: {v}")
    if not head_only:
        lines.append(f"Content-Length: {len(data)}")
    elif not has_length:
        lines.append("Content-Length: 0")
    conn.sendall("\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (b"" if head_only else data))


@contextlib.contextmanager
def fault_proxy(
    upstream: str, faults: Faults = Faults(), max_requests: int = 100_000
) -> Iterator[FaultProxy]:
    """A :class:`FaultProxy` for the block, stopped after it."""
    proxy = FaultProxy(upstream, faults, max_requests)
    try:
        yield proxy
    finally:
        proxy.stop()
