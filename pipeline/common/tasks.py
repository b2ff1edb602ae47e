"""Ray for every stage: connecting (a local in-process cluster by default, or an existing cluster by address), the
one bounded task pool with its progress bar (ingest shards, precompute shards, eval chunks), and the quieting of
Ray's own console chatter.

Token authentication stays on (Ray's default); a local cluster binds to 127.0.0.1 and runs no dashboard.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import ray
from tqdm import tqdm

from pipeline.common.console import verbose
from pipeline.common.trace import TRACE_ENV, mark

__all__ = [
    "task_runtime_env",
    "init_ray",
    "start_local_cluster_early",
    "cluster_gpus",
    "shutdown_ray",
    "train_log_level",
    "LatestValue",
    "PoolResult",
    "run_pool",
    "cluster_cpus",
    "bars_disabled",
]

K = TypeVar("K", bound=Hashable)


def train_log_level() -> str:
    """Console level of Ray Train's ``ray.train`` loggers (controller and workers): INFO when verbose."""
    return "INFO" if verbose() else "ERROR"


# The driver's variables that Ray tasks and workers need: object-store credentials and endpoints (AWS_*, FSSPEC_*),
# SPAR_* settings read inside tasks (SPAR_COMPILE) and the MLflow client's (MLFLOW_*). They travel in the tasks'
# runtime environment, the way Ray intends, never as task arguments: a task may run in a worker process started
# before the driver set them (a cluster's nodes, or a long-lived local Ray).
FORWARD_ENV_PREFIXES = ("SPAR_", "AWS_", "FSSPEC_", "MLFLOW_")


def _forwarded_env() -> dict[str, str]:
    """The forwarded variables; the start-up benchmark's two are not (Ray's local processes inherit them), nor an
    ``MLFLOW_TRACKING_URI`` or ``MLFLOW_EXPERIMENT_ID`` that this process's MLflow wrote itself
    (``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` set them: forwarding them gave every task after a
    stage's first MLflow call a runtime environment of its own, so a fresh worker process; tasks and Ray Train
    workers get their store's URI and run as arguments)."""
    from pipeline.common.tracking import user_values_of_mlflow_written_env

    env = {
        k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES) and k not in _NOT_FORWARDED
    }
    for key, users in user_values_of_mlflow_written_env().items():
        if env.get(key) != users:
            env.pop(key, None)
    return env


_NOT_FORWARDED = (TRACE_ENV, "SPAR_RAY_DEFAULTS")


def ray_defaults() -> bool:
    """``SPAR_RAY_DEFAULTS=1``: start a local cluster as before the start-up work (Ray Train's defaults, a
    runtime environment per task): the "before" side of ``spar bench startup``."""
    return os.environ.get("SPAR_RAY_DEFAULTS", "") not in ("", "0")


# The forwarded variables as they were when this process started its own local cluster (None: it did not). Ray's
# processes on that cluster inherited exactly these, so tasks need no runtime environment while they are unchanged.
_LOCAL_CLUSTER_ENV: dict[str, str] | None = None


def task_runtime_env() -> dict[str, dict[str, str]] | None:
    """``runtime_env`` for this driver's Ray tasks and workers: its :data:`FORWARD_ENV_PREFIXES` variables.

    None (the job's default worker pool, whose processes are already started and reused from task to task) when
    there is nothing to forward, or when this process started the local cluster and the variables are still the
    ones its processes inherited. A task with a runtime environment of its own needs a fresh worker process
    (seconds of interpreter and imports each)."""
    env = _forwarded_env()
    if not env or (env == _LOCAL_CLUSTER_ENV and not ray_defaults()):
        return None
    return {"env_vars": env}


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Idempotently connect to Ray.

    Args:
        address: a cluster address (``auto``, ``ray://...``, ``HOST:PORT``); ``None`` uses ``RAY_ADDRESS`` when set
            (as inside a Ray Job), else starts a local cluster in-process.
        num_cpus: CPUs of a local cluster (default: all).
    """
    _wait_for_early_start()
    if ray.is_initialized():
        if not (_EARLY_STARTED and (address or os.environ.get("RAY_ADDRESS"))):
            return
        shutdown_ray()  # the command turned out to want a cluster: leave the early local one
    mark("ray_init_start")
    if not verbose():
        # Ray's own log level for the driver, tasks and actors
        kwargs.setdefault("logging_config", ray.LoggingConfig(log_level="WARNING"))
        _skip_ray_chatter()
        _quiet_auth_notice()
    address = address or os.environ.get("RAY_ADDRESS")
    global _LOCAL_CLUSTER_ENV
    if address:
        _LOCAL_CLUSTER_ENV = None
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        _local_cluster_settings()
        _LOCAL_CLUSTER_ENV = _forwarded_env()
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            configure_logging=True,
            logging_level="warning",
            **kwargs,
        )
    mark("ray_init_done")


# ------------------------------------------------------------------------------- early start of a local cluster

_EARLY: threading.Thread | None = None
_EARLY_STARTED = False  # the current local cluster was started by start_local_cluster_early
_EARLY_DONE = threading.Event()  # the early start has finished (started, or failed)
# The thread that started Ray's processes must outlive them: Ray ties its processes to their parent with
# PR_SET_PDEATHSIG, which Linux fires when the parent *thread* ends. The early thread waits here until the
# cluster is stopped (or the process exits).
_EARLY_HOLD = threading.Event()

# What ray.init imports on first use (the dashboard's optional dependencies, usage stats, the autoscaler's
# helpers, NVML): imported before the early start's thread runs, so that it and the command's own imports never
# import the same module at once.
_RAY_INIT_MODULES = (
    "ray.dashboard.optional_deps",
    "ray._common.usage.usage_lib",
    "ray.autoscaler._private.util",
    "ray.autoscaler.v2.utils",
    "ray._private.thirdparty.pynvml",
    "ray._private.runtime_env.uv_runtime_env_hook",
)


def start_local_cluster_early(
    start: Callable[[], None] | None = None, warm: Sequence[str] = (), warm_tasks: int = 0, warm_cpus: int = 1
) -> None:
    """Start this process's local Ray cluster in a background thread, while the command goes on importing its
    own modules (torch, MLflow, ...): most of ``ray.init`` is waiting for Ray's processes to come up, which
    overlaps with the imports on another core. :func:`init_ray` waits for it. Only for a local cluster (no
    ``RAY_ADDRESS``); ``SPAR_RAY_EARLY=0`` switches it off. Called by the ``spar`` console command (not by
    ``main(argv)``, which tests call in-process), and by the test suite with its own ``start`` (a cluster with the
    test fault hook, whose later ``init_ray(address=...)`` keeps it, as for any cluster started by hand).

    ``warm``: modules the command's Ray tasks import (e.g. the precompute task's torch and teacher code). Once the
    cluster is up, as many tasks as the command will run at once (``warm_tasks`` of ``warm_cpus`` CPUs each; 0 = as
    many as fit, at most :data:`WARM_TASKS_MAX`) import them in Ray's idle worker processes, which later tasks of
    this driver reuse, so those imports overlap with the command's own instead of following them."""
    global _EARLY
    off = os.environ.get("SPAR_RAY_EARLY", "1") in ("0", "false") or ray_defaults()
    if off or _EARLY is not None or ray.is_initialized() or os.environ.get("RAY_ADDRESS"):
        return
    import importlib
    import signal

    for name in _RAY_INIT_MODULES:
        with contextlib.suppress(ImportError):  # another Ray version: ray.init imports what it needs itself
            importlib.import_module(name)
    # ray.init sets its SIGTERM handler (exit, so that atexit stops the cluster) only from the main thread, and
    # warns from any other: set the same handler here, and keep its warning off the console
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    logging.getLogger("ray._private.worker").addFilter(
        lambda r: "SIGTERM handler is not set" not in r.getMessage()
    )
    warming = (tuple(warm), warm_tasks, max(1, warm_cpus))
    _EARLY = threading.Thread(target=_early_start, args=(start, warming), name="spar-ray-start", daemon=True)
    _EARLY.start()


def _early_start(start: Callable[[], None] | None, warming: tuple[tuple[str, ...], int, int]) -> None:
    global _EARLY_STARTED
    try:
        (start or init_ray)()
        _EARLY_STARTED = start is None
        if warming[0]:
            _warm_workers(*warming)
    except Exception:  # noqa: BLE001 - the command's own init_ray starts it again and reports the error
        pass
    finally:
        _EARLY_DONE.set()
    _EARLY_HOLD.wait()


WARM_TASKS_MAX = 4  # worker processes warmed by an early start (each holds its imports' memory)
_WARM_REFS: list[Any] = []  # the warm-up tasks' results (nobody waits for them; a test does)


def _warm_workers(modules: tuple[str, ...], tasks: int, cpus: int) -> None:
    """Submit the import tasks (``tasks`` of ``cpus`` CPUs each, 0 = as many as fit; at most WARM_TASKS_MAX), not
    waited for: each runs in one of the worker processes Ray starts with the cluster, which then stays in the pool
    with the modules loaded. A task of the command that comes while they run waits for its CPUs, then reuses the
    same process."""
    fit = int(ray.cluster_resources().get("CPU", 0)) // cpus
    n = min(fit, WARM_TASKS_MAX, tasks or fit)
    task = ray.remote(num_cpus=cpus, max_retries=0)(import_modules)
    _WARM_REFS[:] = [task.remote(modules) for _ in range(n)]


def import_modules(modules: Sequence[str]) -> int:
    """Import ``modules`` in this process (the body of the warm-up tasks); returns the process id."""
    import importlib

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


def _wait_for_early_start() -> None:
    if _EARLY is not None and _EARLY is not threading.current_thread():
        _EARLY_DONE.wait()


# Ray Train's switches for a fixed local cluster (documented in ``ray.train.v2._internal.constants``; read by the
# driver and handed to Ray Train's controller and workers). Each one removes work that only a real cluster needs:
# - the preemption watcher: an extra actor process polling Ray's drain state (nodes of a local cluster are never
#   preempted);
# - Train's metrics: exported to the dashboard's Prometheus endpoint, which a local cluster does not run;
# - the controller's health-check interval (default 2 s): it also paces how soon the controller sees the worker
#   group started and the run finished; polling a handful of local workers every 0.2 s costs nothing.
# Only set when this process starts the local cluster itself, and only where the user has not set them: a
# cluster (``address``, ``RAY_ADDRESS``) keeps Ray's defaults.
LOCAL_TRAIN_SETTINGS = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def _local_cluster_settings() -> None:
    if ray_defaults():
        return
    for k, v in LOCAL_TRAIN_SETTINGS.items():
        os.environ.setdefault(k, v)


# Lines the driver does not echo from Ray's processes unless verbose: Ray's C++ core log lines, Ray Train's per-report
# and per-checkpoint INFO lines and its placement-group cleaner's state-API warnings.
_CHATTER = (
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+:"
    r"|Reporting training result|Checkpoint successfully created|PlacementGroupCleaner"
    r"|Failed to query Ray Train Controller"
)


def _skip_ray_chatter() -> None:
    """Tell the driver's worker-log printer to drop :data:`_CHATTER` lines (Ray's own knob, set at runtime)."""
    import re

    with contextlib.suppress(ImportError, AttributeError):  # another Ray version: its chatter stays
        from ray._private import ray_logging

        for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
            own = dedup.skip_re.pattern if dedup.skip_re is not None else ""  # RAY_DEDUP_LOGS_SKIP_REGEX
            dedup.skip_re = re.compile(_CHATTER + (f"|{own}" if own and own not in _CHATTER else ""))
            if not getattr(dedup, "_spar_quiet", False):
                dedup.deduplicate = _drop_sources(dedup.deduplicate)
                dedup._spar_quiet = True


def _quiet_auth_notice() -> None:
    """Keep Ray's "token authentication is enabled by default" notice (printed at every local start) off the
    console unless verbose; token authentication itself stays on."""
    # addFilter adds one function once, however often this runs
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_auth_notice)


def _no_auth_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled" not in record.getMessage()


class LatestValue:
    """Body of a tiny Ray actor holding the latest value put (e.g. rank 0's training progress for the driver)."""

    def __init__(self) -> None:
        self.value = None

    def put(self, value: object) -> None:
        self.value = value

    def get(self) -> object:
        return self.value


def _drop_sources(deduplicate):  # noqa: ANN001, ANN202 - wraps Ray's LogDeduplicator.deduplicate
    # Ray Train's janitor actor: its state-API tracebacks are not ours
    return lambda batch: (
        [] if "PlacementGroupCleaner" in str(batch.get("actor_name") or "") else deduplicate(batch)
    )


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 when none)."""
    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def shutdown_ray() -> None:
    """Disconnect (and stop a local cluster)."""
    global _LOCAL_CLUSTER_ENV, _EARLY_STARTED, _EARLY
    _wait_for_early_start()
    if ray.is_initialized():
        ray.shutdown()
    _LOCAL_CLUSTER_ENV = None
    if _EARLY is not None:  # its processes are stopped: the early thread may end
        _EARLY_HOLD.set()
        _EARLY, _EARLY_STARTED = None, False


def cluster_cpus() -> int:
    """CPUs in the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def bars_disabled() -> bool:
    """True when progress bars are switched off by the environment (``TQDM_DISABLE``)."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


@dataclass
class PoolResult(Generic[K]):
    """What :func:`run_pool` brings back: each finished key's value, and each failed key's exception."""

    done: dict[K, Any] = field(default_factory=dict)
    failed: dict[K, BaseException] = field(default_factory=dict)


def run_pool(
    submit: Callable[[K], ray.ObjectRef],
    keys: Sequence[K],
    limit: int,
    *,
    desc: str,
    weight: Callable[[K], int] = lambda k: 1,
    unit: str = "item",
    progress: bool = True,
    stop_on_failure: bool = False,
    partial: Callable[[], dict[K, int]] | None = None,
    postfix: Callable[[PoolResult[K], float], str] | None = None,
    force_cancel: bool = False,
) -> PoolResult[K]:
    """Run one Ray task per key, at most ``limit`` in flight, with a progress bar counting ``weight(key)`` units.

    ``submit(key)`` starts the task and returns its ref. A task's exception is recorded in ``failed`` (the others
    keep going, unless ``stop_on_failure``: then no new task starts, and those in flight finish and are kept).
    ``partial()`` may report progress inside running tasks (units per key) for a smoother bar; ``postfix`` writes the
    bar's suffix from the result so far and the elapsed seconds. On exit (also by an exception or Ctrl-C) the
    tasks still in flight are cancelled.
    """
    mark("pool_start")
    result: PoolResult[K] = PoolResult()
    queue = list(keys)
    running: dict[ray.ObjectRef, K] = {}
    finished_units = 0
    t0 = time.perf_counter()
    show = progress and not bars_disabled()
    bar = tqdm(total=sum(weight(k) for k in keys), unit=unit, desc=desc, disable=not show, file=sys.stderr)
    try:
        while queue or running:
            while queue and len(running) < max(1, limit):
                key = queue.pop(0)
                running[submit(key)] = key
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5 if partial else None)
            for ref in ready:
                mark("first_task_done", once=True)
                key = running.pop(ref)
                try:
                    value = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - recorded per key, reported by the caller
                    result.failed[key] = e
                    if stop_on_failure:
                        queue.clear()
                else:
                    result.done[key] = value
                finished_units += weight(key)
            inflight = 0
            if partial is not None and running:
                got = partial()
                inflight = sum(min(got.get(k, 0), weight(k)) for k in running.values())
            bar.update(finished_units + inflight - bar.n)
            if postfix is not None and ready:
                bar.set_postfix_str(postfix(result, time.perf_counter() - t0))
    finally:
        mark("pool_done")
        bar.close()
        for ref in running:
            ray.cancel(ref, force=force_cancel)
    return result
