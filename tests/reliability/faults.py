"""Faults injected into Ray workers from the test side: production code knows nothing about them.

The test session's local Ray cluster (:func:`start_test_ray`, used by the ``ray_local`` fixture) runs :func:`install`
as every worker's ``worker_process_setup_hook``. The hook patches nothing at once: it asks Python to wrap two
production methods when their modules are first imported in that worker, and the wrappers act only while a *fault
plan* file exists in the session's fault folder. So a test turns a fault on and off by writing and removing a file
(:func:`crash_once_in_workers`, :func:`tests.reliability.train_faults.fail_once_at_step`), on the cluster every other
test uses, instead of restarting Ray twice with a hook of its own (each restart also left a pool of cold workers).

Plans (JSON):
- ``precompute.json`` ``{"marker": path, "stage": "first-image" | "placed"}``: the first task reaching the stage of
  :class:`~pipeline.cache.writer.ShardWriter` (after the first image of a shard is added; after the shard's store is
  placed, before its completion marker) creates the marker file and SIGKILLs its own worker; the marker makes it
  happen once across Ray's retries and re-runs.
- ``train.json`` ``{"step": N, "marker": path}``: Ray Train's last rank raises once, right after optimizer step
  ``N`` of :meth:`~pipeline.train.step.StepRunner.step` (once: the marker file, also across worker restarts).

When Ray was not started by :func:`start_test_ray` (another process's cluster, or a test that started its own), the
plans fall back to what they did before: Ray restarted with the hook for the block, and shut down after it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

FAULT_DIR_ENV = "TEST_FAULT_DIR"  # the session's fault folder, in every worker's environment
REPO = Path(__file__).resolve().parents[2]
HOOK = f"{__name__}.install"
NUM_CPUS = 2  # the session's local cluster (tests/conftest.py)
# Ray keeps up to this many idle worker processes (default: its CPUs) instead of ending the extra ones a second after
# their task. The tests switch runtime environments (S3 credentials, a Ray Train group) from test to test; with the
# default, each switch ended the warm workers of the session's default environment and the next test started new
# ones (torch and the teacher imported again, 5-7 s of CPU each). Measured on test_ingest.py + test_precompute.py:
# 17 -> 11 worker processes, 76 -> 66 s. The session's cluster only: a command's own cluster keeps Ray's default.
IDLE_WORKERS = 8

_HOOKED_GCS: str | None = None  # the GCS address of the hooked cluster this process started
_FAULT_DIR: Path | None = None


# -------------------------------------------------------------------------------- the driver's side: a cluster


def start_test_ray(num_cpus: int = NUM_CPUS, fault_dir: Path | None = None) -> None:
    """Initialise this process's local Ray cluster with the fault hook (idempotent: an initialised Ray is kept)."""
    global _HOOKED_GCS, _FAULT_DIR
    import ray

    from pipeline.common.tasks import init_ray

    if ray.is_initialized():
        return
    _FAULT_DIR = Path(fault_dir or _FAULT_DIR or tempfile.mkdtemp(prefix="spar-test-faults-"))
    _FAULT_DIR.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {FAULT_DIR_ENV: str(_FAULT_DIR), "PYTHONPATH": path}  # workers import tests.reliability
    init_ray(num_cpus=num_cpus, runtime_env={"worker_process_setup_hook": HOOK, "env_vars": env},
             _system_config={"num_workers_soft_limit": IDLE_WORKERS})  # fmt: skip
    _HOOKED_GCS = ray.get_runtime_context().gcs_address


def _hooked_cluster() -> Path | None:
    """The fault folder of the running cluster when this process started it with the hook, else None."""
    import ray

    if _HOOKED_GCS is None or not ray.is_initialized():
        return None
    return _FAULT_DIR if ray.get_runtime_context().gcs_address == _HOOKED_GCS else None


@contextlib.contextmanager
def fault_plan(name: str, plan: dict[str, Any], num_cpus: int = NUM_CPUS) -> Iterator[None]:
    """Within the block, the workers act on ``plan`` (``<fault folder>/<name>.json``; see the module docstring)."""
    from pipeline.common.tasks import shutdown_ray

    folder = _hooked_cluster()
    restarted = folder is None
    if restarted:  # not our hooked cluster: restart Ray with the hook for the block
        shutdown_ray()
        start_test_ray(num_cpus)
        folder = _hooked_cluster()
    assert folder is not None
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan))
    tmp.replace(path)  # whole, at once: a worker never reads half a plan
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if restarted:
            shutdown_ray()  # the next test's ray_up fixture starts the session's cluster again


@contextlib.contextmanager
def crash_once_in_workers(marker: Path, stage: str, num_cpus: int = NUM_CPUS) -> Iterator[None]:
    """Within the block, the first precompute task reaching ``stage`` kills its worker, once (``marker``)."""
    if stage not in ("first-image", "placed"):
        raise ValueError(f"unknown stage {stage!r}")
    with fault_plan("precompute", {"marker": str(marker), "stage": stage}, num_cpus):
        yield


# ------------------------------------------------------------------------------- the workers' side: the hook


def read_plan(name: str) -> dict[str, Any] | None:
    """The plan ``name`` in force now, or None."""
    folder = os.environ.get(FAULT_DIR_ENV)
    if not folder:
        return None
    try:
        return json.loads((Path(folder) / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _die_once(marker: str) -> None:
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_writer(module: ModuleType) -> None:
    """Wrap ShardWriter.add and ShardWriter._seal with the ``precompute`` plan."""
    writer = module.ShardWriter
    add, seal = writer.add, writer._seal

    def add_then_maybe_die(self, key, feats):  # noqa: ANN001, ANN202 - same signature as ShardWriter.add
        add(self, key, feats)
        plan = read_plan("precompute")
        if plan and plan["stage"] == "first-image":
            _die_once(plan["marker"])

    def maybe_die_then_seal(self, files, manifest_bytes):  # noqa: ANN001, ANN202 - same as ShardWriter._seal
        plan = read_plan("precompute")
        if plan and plan["stage"] == "placed":
            _die_once(plan["marker"])
        return seal(self, files, manifest_bytes)

    writer.add, writer._seal = add_then_maybe_die, maybe_die_then_seal


def _patch_step(module: ModuleType) -> None:
    """Wrap StepRunner.step with the ``train`` plan."""
    from tests.reliability.train_faults import wrap_step

    wrap_step(module.StepRunner)


PATCHES: dict[str, Callable[[ModuleType], None]] = {
    "pipeline.cache.writer": _patch_writer,
    "pipeline.train.step": _patch_step,
}


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the modules of :data:`PATCHES` with the other finders, runs them, then patches them."""

    def __init__(self) -> None:
        self._loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201 - importlib's signature
        if name not in PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        self._loaders[name] = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loaders[spec.name].create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loaders[module.__name__].exec_module(module)  # type: ignore[attr-defined]
        PATCHES[module.__name__](module)


def install() -> None:
    """Ray's worker_process_setup_hook (see the module docstring)."""
    if not os.environ.get(FAULT_DIR_ENV) or any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        return
    for name, patch in PATCHES.items():
        if name in sys.modules:  # imported before the hook ran
            patch(sys.modules[name])
    sys.meta_path.insert(0, _PatchOnImport())
