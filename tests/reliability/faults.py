"""Faults injected into Ray workers from the test side: production code knows nothing about them.

:func:`crash_once_in_workers` re-initialises the local Ray cluster with :func:`crash_precompute_once` as the workers'
``worker_process_setup_hook``. In each worker process the hook wraps a step of :class:`ShardWriter` so that the
first task reaching it creates a marker file and SIGKILLs its own worker; the marker makes it happen once across
Ray's retries and re-runs. Stages: ``first-image`` (after the first image of a shard is added) and ``placed``
(after the shard's store is placed, before its completion marker is written).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

CRASH_ENV = "TEST_PRECOMPUTE_CRASH_ONCE"  # "<marker file>:<stage>", read by the hook in each worker
REPO = Path(__file__).resolve().parents[2]


def _die_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def crash_precompute_once() -> None:
    """Ray worker setup hook: wrap the ShardWriter step named in ``$TEST_PRECOMPUTE_CRASH_ONCE``."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    marker, _, stage = spec.partition(":")
    from pipeline.cache.writer import ShardWriter

    if stage == "first-image":
        add = ShardWriter.add

        def add_then_die(self, key, feats):  # noqa: ANN001, ANN202 - same signature as ShardWriter.add
            add(self, key, feats)
            _die_once(marker)

        ShardWriter.add = add_then_die
    elif stage == "placed":
        seal = ShardWriter._seal

        def die_then_seal(self, files, manifest_bytes):  # noqa: ANN001, ANN202 - same as ShardWriter._seal
            _die_once(marker)
            return seal(self, files, manifest_bytes)

        ShardWriter._seal = die_then_seal
    else:
        raise ValueError(f"{CRASH_ENV}: unknown stage {stage!r}")


@contextlib.contextmanager
def crash_once_in_workers(marker: Path, stage: str, num_cpus: int = 2) -> Iterator[None]:
    """A local Ray cluster whose workers crash once at ``stage`` (see the module docstring); Ray is shut down
    on exit (the ``ray_up`` fixture of the next test starts a plain one)."""
    from pipeline.common.tasks import init_ray, shutdown_ray

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    runtime_env = {
        "worker_process_setup_hook": f"{__name__}.{crash_precompute_once.__name__}",
        "env_vars": {CRASH_ENV: f"{marker}:{stage}", "PYTHONPATH": path},  # workers import tests.reliability
    }
    shutdown_ray()
    init_ray(num_cpus=num_cpus, runtime_env=runtime_env)
    try:
        yield
    finally:
        shutdown_ray()
