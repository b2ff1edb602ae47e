"""A distillation in the command's own process: the one rank of a single-worker run, without Ray Train's controller
and worker group (their processes, imports and scheduling are ~16 s of a 2-core CPU's start-up; BENCHMARKS.md).

The rank is the same code as a Ray Train worker's (:func:`pipeline.train.worker.train_rank`), and it keeps what Ray
Train gives such a run: its training checkpoints in the same run directory (``<storage>/<run>/checkpoint_step…``,
written whole before they appear; the newest ``keep_checkpoints`` kept), resume from the newest good one (``--resume``,
also of a run that Ray Train started, and the other way round), and up to ``max_failures`` restarts from the last
checkpoint when the training raises. A restart after the process itself died (killed, out of memory) is ``--resume``'s
here: there is no other process to outlive it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pipeline.common.storage import is_local, join, local_path, makedirs, put_dir, remove, rename_dir
from pipeline.train.config import DistillError
from pipeline.train.plan import DistillPlan, RunLink
from pipeline.train.progress import local_progress_bar, log
from pipeline.train.run_dir import checkpoints_newest_first, ray_checkpoint
from pipeline.train.worker import Rank, train_rank

if TYPE_CHECKING:
    from ray.train import Checkpoint


__all__ = ["InProcessResult", "fit_in_process"]


@dataclass
class InProcessResult:
    """What Ray Train's ``Result`` gives the driver: the last reported metrics and the latest checkpoint."""

    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint: Checkpoint | None = None


def fit_in_process(plan: DistillPlan, link: RunLink, run_dir: str, start: str) -> InProcessResult:
    """Train ``plan``'s one rank here, checkpoints into ``run_dir`` (path or URL); ``start``: the checkpoint a
    continued run starts from ("" = the run directory's own only). Restarts up to ``plan.max_failures`` times."""
    device = _device(plan)
    threads = torch.get_num_threads()
    failures = 0
    run = _RunDir(run_dir, plan.keep_checkpoints)
    try:
        with local_progress_bar(plan.total_steps) as bar:
            while True:
                try:
                    train_rank(plan, link, start, Rank(0, 1, device, run.latest(), run.report, bar))
                    return InProcessResult(run.metrics, run.latest())
                except Exception as e:  # noqa: BLE001 - Ray Train's max_failures: any error of the training
                    if failures >= plan.max_failures:
                        raise
                    failures += 1
                    log(f"the training failed ({type(e).__name__}: {e}); restarting from the last checkpoint "
                        f"({failures} of {plan.max_failures} restarts)")  # fmt: skip
    finally:
        torch.set_num_threads(threads)  # the rank set its own; the command (or a test process) goes on


def _device(plan: DistillPlan) -> torch.device:
    """The rank's device: the first GPU when the plan gives the worker one, else the CPU."""
    if plan.gpus_per_worker <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistillError(
            f"distill: gpus_per_worker={plan.gpus_per_worker} but this machine has no GPU that torch can use"
        )
    return torch.device("cuda", 0)


class _RunDir:
    """The run directory's checkpoints, kept as Ray Train keeps them."""

    def __init__(self, run_dir: str, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.metrics: dict[str, Any] = {}

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint (by step; the restore falls back from a bad one to the older ones)."""
        found = checkpoints_newest_first([self.run_dir])
        return ray_checkpoint(found[0]) if found else None

    def report(self, metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
        """Keep ``metrics``; place the checkpoint in ``folder`` as ``<run dir>/<name>``, then drop the oldest."""
        self.metrics = dict(metrics)
        if folder is None or name is None:
            return
        dst = join(self.run_dir, name)
        if is_local(dst):  # whole or absent: written beside, then one rename
            makedirs(self.run_dir)
            staging = tempfile.mkdtemp(prefix=f".{name}-", dir=local_path(self.run_dir))
            try:
                put_dir(folder, staging)
                remove(dst)  # a restart re-reaching a step replaces its checkpoint
                if not rename_dir(staging, dst):
                    raise OSError(f"could not place checkpoint {dst}")
            finally:
                remove(staging)  # gone after the rename; a part written before a failure goes too
        else:  # an object store: the restore skips a checkpoint whose files are not all there
            remove(dst)
            put_dir(folder, dst)
        for old in checkpoints_newest_first([self.run_dir])[self.keep :]:
            remove(old)
