"""Fault injection into Ray Train workers, from the test side (production knows nothing of it).

:func:`fail_once_at_step` restarts the session's local Ray cluster with a runtime environment whose
``worker_process_setup_hook`` is :func:`install`: in every Ray worker process it wraps the production
:meth:`pipeline.train.step.StepRunner.step` so that the last rank raises once, right after optimizer step ``N``
(a marker file in ``marker_dir`` makes it fire only once, also across Ray Train's worker restarts). On exit the
plain cluster is restarted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

FAIL_STEP_ENV = "SPAR_TEST_FAIL_AT_STEP"
MARKER_DIR_ENV = "SPAR_TEST_FAIL_MARKER_DIR"
REPO = Path(__file__).resolve().parents[2]
NUM_CPUS = 2  # as tests/conftest.py's ray_local


def marker_path(marker_dir: str | Path, step: int) -> Path:
    return Path(marker_dir) / f"fail_at_step_{step}.done"


def install() -> None:
    """Ray's worker_process_setup_hook: patch StepRunner.step in this worker process (see the module docstring)."""
    fail_at = int(os.environ.get(FAIL_STEP_ENV, "0") or 0)
    if fail_at <= 0:
        return
    from pipeline.train.step import StepRunner

    marker = marker_path(os.environ[MARKER_DIR_ENV], fail_at)
    original = StepRunner.step

    def step(self: StepRunner, item: dict, step: int):  # noqa: ANN202 - same as StepRunner.step
        out = original(self, item, step)
        if step + 1 != fail_at:
            return out
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        if rank == world - 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("injected failure fired\n")
            raise RuntimeError(f"injected failure at step {fail_at} on rank {rank} (test fault hook)")
        return out

    StepRunner.step = step


@contextlib.contextmanager
def fail_once_at_step(step: int, marker_dir: str | Path) -> Iterator[Path]:
    """Within the block, Ray Train's last rank raises once after optimizer step ``step``; yields the marker path."""
    from pipeline.common.tasks import init_ray, shutdown_ray

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {FAIL_STEP_ENV: str(step), MARKER_DIR_ENV: str(marker_dir), "PYTHONPATH": path}
    shutdown_ray()
    init_ray(
        num_cpus=NUM_CPUS, runtime_env={"worker_process_setup_hook": f"{__name__}.install", "env_vars": env}
    )
    try:
        yield marker_path(marker_dir, step)
    finally:
        shutdown_ray()
        init_ray(num_cpus=NUM_CPUS)
