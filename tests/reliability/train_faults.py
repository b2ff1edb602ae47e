"""Fault injection into Ray Train workers, from the test side (production knows nothing of it).

:func:`fail_once_at_step` puts the ``train`` fault plan in force on the session's local Ray cluster (see
:mod:`tests.reliability.faults`): in every Ray worker process the production :meth:`pipeline.train.step.StepRunner.step`
is wrapped (when the module is first imported there) so that, while the plan is in force, the last rank raises once,
right after optimizer step ``N`` (a marker file makes it fire only once, also across Ray Train's worker restarts).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.reliability.faults import NUM_CPUS, fault_plan, read_plan


def marker_path(marker_dir: str | Path, step: int) -> Path:
    return Path(marker_dir) / f"fail_at_step_{step}.done"


def wrap_step(runner_class: type) -> None:
    """Wrap ``runner_class.step`` (StepRunner) with the ``train`` plan."""
    original = runner_class.step

    def step(self, item: dict, step: int):  # noqa: ANN001, ANN202 - same as StepRunner.step
        out = original(self, item, step)
        plan = read_plan("train")
        if not plan or step + 1 != plan["step"]:
            return out
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        marker = Path(plan["marker"])
        if rank == world - 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("injected failure fired\n")
            raise RuntimeError(f"injected failure at step {plan['step']} on rank {rank} (test fault hook)")
        return out

    runner_class.step = step


@contextmanager
def fail_once_at_step(step: int, marker_dir: str | Path, num_cpus: int = NUM_CPUS) -> Iterator[Path]:
    """Within the block, Ray Train's last rank raises once after optimizer step ``step``; yields the marker path."""
    marker = marker_path(marker_dir, step)
    with fault_plan("train", {"step": step, "marker": str(marker)}, num_cpus):
        yield marker
