"""The driver's progress bar of distill steps (loss, images/s, ETA), fed by rank 0: through a small named actor when
Ray Train's workers run in other processes (an actor survives worker restarts and costs one small message per
step), directly when the run trains in the command's own process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ray
from tqdm import tqdm

from pipeline.common.tasks import LatestValue

__all__ = ["progress_bar", "progress_actor", "local_progress_bar", "log"]

NAMESPACE = "spar"


def log(msg: str) -> None:
    """One line of distill's report to stderr (driver and workers alike)."""
    print(f"[spar distill] {msg}", file=sys.stderr, flush=True)


def progress_actor(name: str) -> Any:
    """Rank 0's handle on the driver's progress actor (None when there is none)."""
    if not name:
        return None
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


class _Bar:
    """A tqdm bar started at the first reported step (a resumed run starts where it left off)."""

    def __init__(self, total: int) -> None:
        self.total, self.bar = total, None

    def show(self, latest: tuple[int, float, float] | None) -> None:
        if latest is None:
            return
        step, loss, ips = latest
        if self.bar is None:
            self.bar = tqdm(total=self.total, initial=step, unit="step", desc="distill", file=sys.stderr,
                            dynamic_ncols=True)  # fmt: skip
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix_str(f"loss {loss:.4g}, {ips:.1f} img/s", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def progress_bar(run_id: str, total: int, poll_s: float = 0.5) -> Iterator[str]:
    """Start the progress actor and a thread that draws its latest (step, loss, images/s); yields the actor's name
    (workers look it up by name: a handle inside train_loop_config does not reach them intact)."""
    name = f"spar-progress-{run_id}-{os.getpid()}"
    actor = ray.remote(num_cpus=0)(LatestValue).options(name=name, namespace=NAMESPACE).remote()
    bar, stop = _Bar(total), threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                bar.show(ray.get(actor.get.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - the bar is cosmetic; training goes on
                continue

    thread = threading.Thread(target=poll, name="spar-distill-progress", daemon=True)
    thread.start()
    try:
        yield name
    finally:
        stop.set()
        thread.join(timeout=15)
        with contextlib.suppress(Exception):
            bar.show(ray.get(actor.get.remote(), timeout=10))
        bar.close()
        ray.kill(actor)


@contextlib.contextmanager
def local_progress_bar(total: int) -> Iterator[Callable[[tuple[int, float, float]], None]]:
    """The same bar for a run in the command's own process: yields the function rank 0 feeds it with."""
    bar = _Bar(total)
    try:
        yield bar.show
    finally:
        bar.close()
