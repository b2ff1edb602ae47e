"""Phase marks of a command's fixed cost, for ``spar bench startup``: each mark is one JSON line
``{"phase": name, "t": wall-clock seconds, "pid": process id}`` appended to the file named by ``SPAR_TRACE_FILE``.

Nothing happens when the variable is unset (one dictionary lookup per mark). The variable travels to Ray tasks and
Ray Train workers with the other ``SPAR_*`` settings (:func:`pipeline.common.tasks.task_runtime_env`), so marks
made inside a worker land in the same file; wall-clock time (not ``perf_counter``) keeps marks of different
processes on one axis. Appends of one short line are atomic on a local file system.
"""

from __future__ import annotations

import json
import os
import time

__all__ = ["TRACE_ENV", "mark", "read_marks"]

TRACE_ENV = "SPAR_TRACE_FILE"


def mark(phase: str, once: bool = False) -> None:
    """Record that ``phase`` was reached now (no-op unless ``SPAR_TRACE_FILE`` is set). ``once``: only the first
    time this process reaches it."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    if once:
        if phase in _seen:
            return
        _seen.add(phase)
    line = json.dumps({"phase": phase, "t": time.time(), "pid": os.getpid()}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


_seen: set[str] = set()


def read_marks(path: str) -> list[dict]:
    """The marks of a trace file, in the order they were written (an absent file: none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
