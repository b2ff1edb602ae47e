"""How the GPU check runs one section: a soft time budget the section sizes its optional work by, a hard limit
past which it is interrupted (SIGALRM), and the recording of whatever ended it (ok, a failed check, an exception
with its traceback, a timeout, SIGTERM) into the report before the next section runs."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

from pipeline.bench.gpu.report import Report, say

C = TypeVar("C")  # what the sections share (pipeline.bench.gpu.context.Context)


class SectionTimeout(Exception):
    """A section ran past its hard time limit."""


class Terminated(BaseException):
    """The process got SIGTERM (e.g. from ``timeout``): record it, write the report, stop."""


@dataclass
class Deadline:
    """A section's soft budget: optional work is skipped once it is spent."""

    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        raise SectionTimeout(f"section ran past its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated("SIGTERM")


def run_section(
    report: Report,
    name: str,
    fn: Callable[[C, dict[str, Any], Deadline], None],
    ctx: C,
    budget_s: float,
    hard_s: float | None = None,
) -> str:
    """Run one section: ``fn(ctx, result, deadline)`` fills ``result`` as it goes (``ctx.save()`` writes it).

    ``budget_s`` is the soft budget the section sizes its optional work by; past ``hard_s`` (default
    1.6 x budget + 10 s) it is interrupted. Any exception (and the hard time limit) is recorded with its traceback; the caller goes on with the next
    section. SIGTERM is recorded, the report written, and re-raised. Returns the section's status.
    """
    entry = report.section(name)
    result: dict[str, Any] = {}
    entry.clear()
    entry.update(status="running", budget_s=round(budget_s, 1), result=result)
    report.save()
    say(f"{name}: start (budget {budget_s:.0f} s)")
    t0 = time.perf_counter()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)  # re-armed per section: Ray may install its own
        with hard_limit(hard_s if hard_s is not None else budget_s * 1.6 + 10):
            fn(ctx, result, Deadline(t0 + budget_s))
        entry["status"] = "ok"
    except SectionTimeout as e:
        entry.update(status="timeout", error=str(e), traceback=traceback.format_exc())
    except Terminated:
        entry.update(status="killed", error="SIGTERM", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report.save()
        raise
    except Exception as e:  # noqa: BLE001 - recorded, and the next section runs
        entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    except KeyboardInterrupt:
        entry.update(status="interrupted", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report.save()
        raise
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    failed = [c["name"] for c in result.get("checks", []) if not c.get("ok")]
    if failed and entry["status"] == "ok":
        entry["status"] = "checks-failed"
    report.save()
    say(
        f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
        + (f" ({entry.get('error')})" if "error" in entry else "")
    )
    if failed:
        say(f"{name}: failed checks: {', '.join(failed)}")
    return entry["status"]
