"""Running a stage's work in the command's own process, on this machine, instead of on Ray.

One rule for every stage that can do so (distill's one rank, precompute's shards): with its choice ``"auto"``, a
stage runs here when it asks for one worker and names no cluster (no address, no ``RAY_ADDRESS``: not a job on a
cluster). Such a run starts no Ray at all, which on a small CPU saves Ray's start, its worker processes and its
shutdown (BENCHMARKS.md, start-up). Light on purpose: the CLI asks it before anything heavy imports.
"""

from __future__ import annotations

import os

__all__ = ["EXECUTORS", "machine_resources", "runs_in_process"]

EXECUTORS = ("auto", "ray", "in-process")  # the choices of a stage's ``trainer`` / ``runner`` field


def runs_in_process(choice: str, workers: int, ray_address: str | None) -> bool:
    """Whether the work runs in this process: ``choice`` "in-process" or "ray" as given; "auto" = one worker and no
    cluster address (neither ``ray_address`` nor ``$RAY_ADDRESS``)."""
    if choice != "auto":
        return choice == "in-process"
    return workers == 1 and not (ray_address or os.environ.get("RAY_ADDRESS"))


def machine_resources() -> tuple[int, int]:
    """(CPUs this process may use, GPUs it sees): what an in-process run sizes itself by."""
    import torch

    if hasattr(os, "sched_getaffinity"):  # Linux: the CPUs this process may run on
        cpus = len(os.sched_getaffinity(0))
    else:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return cpus, torch.cuda.device_count()
