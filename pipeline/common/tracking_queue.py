"""Delivery of a run's metrics, params and tags to MLflow without ever making the caller wait (docs/reliability.md).

:class:`QueuedRunLog` is what a training loop logs through: ``add_metrics`` / ``add_params`` / ``add_tags`` only
append to an in-memory queue; one background thread sends the queue's head to the tracking server in order, in
``log-batch`` requests of at most MLflow's limits. When the server is unreachable (restarting, network down), the
sender keeps the head, waits (backoff 0.5 s doubling to 5 s) and tries again, so entries arrive once, in the order
they were logged, when the server is back; it says so in one line when the outage starts and one when it ends.

:meth:`QueuedRunLog.close` waits (bounded: ``wait_s``) for the queue to drain. What is still undelivered then is
written to a local spool file (JSON lines, one entry each: run, tracking URI, kind, key, value, step, timestamp) and
named in one line with what is missing; ``spar runs --resend FILE`` sends it later (:func:`resend`).

Each request to an HTTP tracking server is made once per try (``max_retries=0``, a short timeout), so the sender
alone decides the retrying and knows exactly what has been delivered; another store (sqlite) is written through
``MlflowClient.log_batch``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Entry", "QueuedRunLog", "head_batch", "describe", "spool_dir", "resend", "SPOOL_ENV"]

# folder of the undelivered-entries files (default ~/.cache/spar/tracking-spool)
SPOOL_ENV = "SPAR_TRACKING_SPOOL"
MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100  # MLflow's log-batch limits
REQUEST_TIMEOUT_S = 10
BACKOFF_S = (0.5, 5.0)  # first wait after a failed send, cap
LINGER_S = 1.0  # the sender gathers entries for this long before a request


@dataclass(frozen=True)
class Entry:
    """One logged value: ``kind`` is ``metric``, ``param`` or ``tag``."""

    kind: str
    key: str
    value: Any
    step: int = 0
    timestamp: int = 0


def spool_dir() -> Path:
    """Where undelivered entries are kept: ``$SPAR_TRACKING_SPOOL`` or ``~/.cache/spar/tracking-spool``."""
    return Path(os.environ.get(SPOOL_ENV) or Path.home() / ".cache" / "spar" / "tracking-spool")


def _say(msg: str) -> None:
    print(f"[spar tracking] {msg}", file=sys.stderr, flush=True)


class QueuedRunLog:
    """Metrics, params and tags of run ``run_id`` queued here and sent in order by one background thread."""

    def __init__(self, uri: str, run_id: str, say: Callable[[str], None] = _say) -> None:
        self.uri, self.run_id, self._say = uri, run_id, say
        self._queue: deque[Entry] = deque()
        self._cv = threading.Condition()
        self._closing = False  # set by close: the sender stops, what is left goes to the spool file
        self.delivered = 0
        self.outages: list[float] = []  # seconds of each outage seen, once it ended
        self.last_error = ""
        self._send_batch = _sender(uri, run_id)
        self._thread = threading.Thread(target=self._run, daemon=True, name="spar-tracking-queue")
        self._thread.start()

    # ----------------------------------------------------------------------------------------- the caller's side

    def add_metrics(self, metrics: Mapping[str, float], step: int, timestamp: int | None = None) -> None:
        ts = int(time.time() * 1000) if timestamp is None else timestamp
        self._put([Entry("metric", k, float(v), step, ts) for k, v in metrics.items()])

    def add_params(self, params: Mapping[str, Any]) -> None:
        self._put([Entry("param", k, str(v)[:6000]) for k, v in params.items()])

    def add_tags(self, tags: Mapping[str, Any]) -> None:
        self._put([Entry("tag", k, str(v)[:5000]) for k, v in tags.items()])

    def pending(self) -> int:
        with self._cv:
            return len(self._queue)

    def wait_delivered(self, timeout_s: float) -> bool:
        """Wait until everything queued so far is delivered (at most ``timeout_s``); True when it is."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._queue and time.monotonic() < deadline:
                self._cv.wait(min(1.0, max(0.0, deadline - time.monotonic())))
            return not self._queue

    def close(self, wait_s: float) -> Path | None:
        """Wait up to ``wait_s`` for the queue to drain, then stop the sender. Returns None when everything was
        delivered, else the spool file holding what was not (named, with what is missing, in one line)."""
        self.wait_delivered(wait_s)
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(REQUEST_TIMEOUT_S + 5)  # a send in flight ends within its timeout
        with self._cv:
            left = list(self._queue)
        if not left:
            return None
        path = self._spool(left)
        self._say(
            f"the tracking server {self.uri} could not be reached for {wait_s:.0f} s at the end of the run "
            f"({self.last_error}): {describe(left)} of run {self.run_id} are not logged there; kept in {path}, "
            f"re-send with: spar runs --resend {path}"
        )
        return path

    # ------------------------------------------------------------------------------------------------ sender

    def _put(self, entries: list[Entry]) -> None:
        if not entries:
            return
        with self._cv:
            self._queue.extend(entries)
            self._cv.notify_all()

    def _run(self) -> None:
        delay, down_since = BACKOFF_S[0], None
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if self._closing:
                    return
                self._cv.wait(LINGER_S)  # let a few steps' entries gather: one request for them
                if self._closing:
                    return
                batch = head_batch(self._queue)
            try:
                self._send_batch(batch)
            except Exception as e:  # noqa: BLE001 - any failure: keep the head, try again
                self.last_error = _short(e)
                if down_since is None:
                    down_since = time.monotonic()
                    self._say(
                        f"the tracking server {self.uri} is unreachable ({self.last_error}): queuing this run's "
                        "metrics, training goes on"
                    )
                with self._cv:
                    if not self._closing:
                        self._cv.wait(delay)
                delay = min(delay * 2, BACKOFF_S[1])
                continue
            with self._cv:
                for _ in batch:
                    self._queue.popleft()
                self.delivered += len(batch)
                self._cv.notify_all()
            if down_since is not None:
                self.outages.append(time.monotonic() - down_since)
                self._say(
                    f"the tracking server {self.uri} is back after {self.outages[-1]:.0f} s: delivering the "
                    f"queued entries in order ({len(self._queue) + len(batch)} then)"
                )
            delay, down_since = BACKOFF_S[0], None

    def _spool(self, left: list[Entry]) -> Path:
        d = spool_dir()
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{self.run_id}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        lines = [json.dumps({"run_id": self.run_id, "tracking_uri": self.uri, **asdict(e)}) for e in left]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
        return path


def head_batch(entries: Iterable[Entry]) -> list[Entry]:
    """The longest head of ``entries`` that one log-batch request may carry (order kept)."""
    counts = {"metric": 0, "param": 0, "tag": 0}
    limits = {"metric": MAX_METRICS, "param": MAX_PARAMS, "tag": MAX_TAGS}
    out = []
    for e in entries:
        if counts[e.kind] >= limits[e.kind] or len(out) >= MAX_METRICS:
            break
        counts[e.kind] += 1
        out.append(e)
    return out


def describe(entries: list[Entry]) -> str:
    """``12 metric values (loss steps 40-52, lr steps 40-52), 1 param (a), 0 tags`` in a few words."""
    metrics: dict[str, list[int]] = {}
    for e in entries:
        if e.kind == "metric":
            metrics.setdefault(e.key, []).append(e.step)
    parts = [f"{k} steps {min(s)}-{max(s)}" for k, s in sorted(metrics.items())]
    n_m = sum(len(s) for s in metrics.values())
    params = [e.key for e in entries if e.kind == "param"]
    tags = [e.key for e in entries if e.kind == "tag"]
    text = f"{n_m} metric values" + (f" ({', '.join(parts)})" if parts else "")
    if params:
        text += f", {len(params)} params ({', '.join(params[:5])}{', ...' if len(params) > 5 else ''})"
    return text + f", {len(tags)} tags"


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return msg[:200]


def _sender(uri: str, run_id: str) -> Callable[[list[Entry]], None]:
    """A function that sends one batch once (raises on any failure)."""
    if uri.startswith(("http://", "https://")):
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request_safe

        creds = get_default_host_creds(uri)

        def send_http(batch: list[Entry]) -> None:
            http_request_safe(creds, "/api/2.0/mlflow/runs/log-batch", "POST", max_retries=0,
                              timeout=REQUEST_TIMEOUT_S, json=_body(run_id, batch))  # fmt: skip

        return send_http
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient(uri)

    def send_store(batch: list[Entry]) -> None:
        client.log_batch(
            run_id,
            metrics=[Metric(e.key, e.value, e.timestamp, e.step) for e in batch if e.kind == "metric"],
            params=[Param(e.key, e.value) for e in batch if e.kind == "param"],
            tags=[RunTag(e.key, e.value) for e in batch if e.kind == "tag"],
        )

    return send_store


def _body(run_id: str, batch: list[Entry]) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "metrics": [
            {"key": e.key, "value": e.value, "timestamp": e.timestamp, "step": e.step}
            for e in batch
            if e.kind == "metric"
        ],  # fmt: skip
        "params": [{"key": e.key, "value": e.value} for e in batch if e.kind == "param"],
        "tags": [{"key": e.key, "value": e.value} for e in batch if e.kind == "tag"],
    }


def resend(path: str | os.PathLike, uri: str | None = None) -> int:
    """Send the entries of a spool file (written by :meth:`QueuedRunLog.close`) to their run, in order; returns
    how many. ``uri`` overrides the tracking URI recorded in the file. The file is removed once all are sent."""
    lines = [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]
    by_run: dict[tuple[str, str], list[Entry]] = {}
    for d in lines:
        key = (d["run_id"], uri or d["tracking_uri"])
        by_run.setdefault(key, []).append(
            Entry(d["kind"], d["key"], d["value"], int(d.get("step", 0)), int(d.get("timestamp", 0)))
        )
    for (run_id, run_uri), entries in by_run.items():
        send, i = _sender(run_uri, run_id), 0
        while i < len(entries):
            batch = head_batch(entries[i:])
            send(batch)
            i += len(batch)
    os.remove(path)
    return len(lines)
