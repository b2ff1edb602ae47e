"""MLflow conventions shared by every stage.

* Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else the embedded store
  ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts``. A workdir on object storage
  (``s3://…``) cannot hold the embedded store: it needs ``MLFLOW_TRACKING_URI`` (:func:`require_remote_store`).
* The driver creates the experiment once (SQLite races when several processes create it); workers only log to a
  run id they are given, and only rank 0 logs.
* Every run gets the git commit, and its resolved config as flat params with the same names across runs, so the
  MLflow UI's compare view lines runs up; one name per parameter, holding the resolved value.
* Experiments are tagged as model-training experiments (``mlflow.experimentKind = custom_model_development``, the
  tag the MLflow 3 UI reads), so the UI opens them on their runs, not on the GenAI traces view.
* Evaluation runs are children of the training run they evaluate (``mlflow.parentRunId``) and copy their headline
  metrics onto it (``<kind>/<metric>``), so comparing training runs compares their evaluations.
* System metrics (CPU, memory, disk, network; GPU when ``nvidia-ml-py`` is installed) on every stage's run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.common.console import verbose
from pipeline.common.errors import UserError
from pipeline.common.storage import is_local, join, read_bytes

__all__ = [
    "TrackingError",
    "WAIT_ENV",
    "tracking_wait_s",
    "wait_for_server",
    "require_remote_store",
    "tracking_uri",
    "setup_experiment",
    "git_commit",
    "flatten_params",
    "log_params_flat",
    "mlflow_ui_command",
    "mlflow_runs_url",
    "PARENT_RUN_TAG",
    "system_metrics",
    "log_headline_metrics",
    "write_run_lineage",
    "training_run_of",
]

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow 3 UI to pick the experiment's landing page
MODEL_TRAINING_KIND = "custom_model_development"  # (the other kind is "genai_development")
PARENT_RUN_TAG = "mlflow.parentRunId"  # the UI nests a run under its parent
LINEAGE_FILE = "mlflow_run.json"  # in an exported student: the training run that produced it


# Read once: ``mlflow.set_tracking_uri`` writes this variable into our own environment, so reading it later would
# send every later workdir of the process to the first store.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


# Read once too: ``mlflow.set_experiment`` (called by :func:`setup_experiment`) writes ``MLFLOW_EXPERIMENT_ID``.
_USER_EXPERIMENT_ID = os.environ.get("MLFLOW_EXPERIMENT_ID") or None


def user_values_of_mlflow_written_env() -> dict[str, str | None]:
    """The variables MLflow writes into this process's environment (``set_tracking_uri``, ``set_experiment``), each
    with the user's own value as read when this module was first imported (None: the user did not set it)."""
    return {"MLFLOW_TRACKING_URI": _USER_TRACKING_URI, "MLFLOW_EXPERIMENT_ID": _USER_EXPERIMENT_ID}


class TrackingError(UserError):
    """The MLflow store cannot be used as configured."""


WAIT_ENV = "SPAR_TRACKING_WAIT_S"  # how long a stage waits for an unreachable tracking server (default 300 s)


def tracking_wait_s() -> float:
    """Seconds a stage waits for an unreachable tracking server: ``$SPAR_TRACKING_WAIT_S`` or 300."""
    try:
        return max(0.0, float(os.environ.get(WAIT_ENV, "") or 300))
    except ValueError:
        return 300.0


def wait_for_server(uri: str, wait_s: float | None = None, what: str = "this stage") -> None:
    """Return once the tracking server ``uri`` answers (its ``/health``); an embedded store returns at once.

    While it does not, one line says so and how long the wait may last; past ``wait_s`` (default
    :func:`tracking_wait_s`) a TrackingError names the server and the last error."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    wait_s = tracking_wait_s() if wait_s is None else wait_s
    t0, said, delay = time.monotonic(), False, 0.5
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as r:
                if r.status == 200:
                    if said:
                        print(f"[spar] the tracking server {uri} answers after {time.monotonic() - t0:.0f} s",
                              file=sys.stderr, flush=True)  # fmt: skip
                    return
                err = f"HTTP {r.status}"
        except (urllib.error.URLError, OSError) as e:
            err = str(getattr(e, "reason", e))
        left = wait_s - (time.monotonic() - t0)
        if left <= 0:
            raise TrackingError(f"the MLflow tracking server {uri} did not answer for {wait_s:.0f} s ({err})")
        if not said:
            print(f"[spar] the tracking server {uri} does not answer ({err}): {what} waits for it, at most "
                  f"{wait_s:.0f} s (${WAIT_ENV})", file=sys.stderr, flush=True)  # fmt: skip
            said = True
        time.sleep(min(delay, left))
        delay = min(delay * 2, 5.0)


def require_remote_store(workdir: str | Path) -> None:
    """Refuse (TrackingError) a workdir on object storage without ``MLFLOW_TRACKING_URI``: the embedded sqlite
    store cannot live there. Call it before anything starts."""
    if not is_local(str(workdir)) and not _USER_TRACKING_URI:
        raise TrackingError(
            f"--workdir {workdir} needs a tracking server: set MLFLOW_TRACKING_URI (the embedded sqlite store "
            "cannot live on object storage)"
        )


def tracking_uri(workdir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` as set when the process started, else ``sqlite:///<abs workdir>/mlflow.db``
    (a workdir URL without it: TrackingError)."""
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    require_remote_store(workdir)
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def _template_path() -> Path:
    """This MLflow version's empty embedded store, kept once per user (``$XDG_CACHE_HOME/spar``)."""
    import mlflow

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spar"
    return base / f"mlflow-{mlflow.__version__}-empty.db"


def _sqlite_copy(src: Path, dst: Path, sql: str, *params: str) -> None:
    """A consistent copy of a SQLite database (SQLite's online backup), written to ``dst``; then ``sql`` run on
    the copy."""
    with contextlib.closing(sqlite3.connect(src)) as a, contextlib.closing(sqlite3.connect(dst)) as b:
        a.backup(b)
        with b:
            b.execute(sql, params)


def new_embedded_store(uri: str) -> None:
    """Create the embedded sqlite store of ``uri`` if it does not exist yet, from a copy of an empty one.

    MLflow creates a new store by running every schema migration since its first release (seconds on a small
    CPU, paid by every new workdir). The first store a user creates is copied, empty, to
    :func:`_template_path` (keyed by the MLflow version, so an upgrade makes a new one); later new stores start
    as a copy of it, with the one row MLflow makes per store (the "Default" experiment's artifact location,
    ``./mlruns/0`` resolved against the current directory, as MLflow does) written for the new store. The copy
    appears under its final name in one step (a hard link), so two processes creating the same store cannot both
    win. Anything unexpected falls back to MLflow's own creation."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not uri.startswith("sqlite:///") or db.exists():
        return
    template = _template_path()
    with contextlib.suppress(OSError, sqlite3.Error):
        if template.exists():
            tmp = db.with_name(f".{db.name}.{os.getpid()}.new")
            sql = "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0"
            _sqlite_copy(template, tmp, sql, str(Path("mlruns").resolve() / "0"))
            try:
                with contextlib.suppress(FileExistsError):  # another process made the same store first
                    os.link(tmp, db)
            finally:
                tmp.unlink(missing_ok=True)
            return
    import mlflow

    mlflow.MlflowClient(uri).search_experiments(max_results=1)  # MLflow creates the store
    with contextlib.suppress(OSError, sqlite3.Error):
        template.parent.mkdir(parents=True, exist_ok=True)
        tmp = template.with_name(f".{template.name}.{os.getpid()}.new")
        # empty: no experiment but the Default one
        _sqlite_copy(db, tmp, "DELETE FROM experiments WHERE experiment_id != 0")
        os.replace(tmp, template)


def setup_experiment(name: str, workdir: str | Path) -> str:
    """Point MLflow at the project's store and return the id of experiment ``name`` (created once, here)."""
    import mlflow

    if not verbose():  # MLflow's INFO chatter (database set-up, uv project detection, model registration)
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.WARNING)
    local = is_local(str(workdir))  # a URL workdir goes with a tracking server: no local folder for it
    if local:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(workdir)
    wait_for_server(uri)  # a tracking server that does not answer: one line, a bounded wait
    new_embedded_store(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        loc = None  # the server's choice; the embedded store's artifacts go to <workdir>/mlartifacts
        if uri.startswith("sqlite:") and local:
            loc = (Path(workdir).resolve() / "mlartifacts").as_uri()
        try:
            exp_id = client.create_experiment(
                name, artifact_location=loc, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
            )
        except Exception:  # created concurrently by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    if exp is not None and EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older version, or by hand
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(repo: str | Path | None = None) -> str:
    """The project's git commit (``+dirty`` when the tree has changes), or ``unknown``."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[1]
    git = functools.partial(subprocess.run, cwd=cwd, capture_output=True, text=True, timeout=10)
    try:
        sha = git(["git", "rev-parse", "HEAD"], check=True).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SPAR_GIT_COMMIT", "unknown")


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings into ``a.b`` keys with string values (MLflow params are strings, <= 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_params(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def log_params_flat(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log a (nested) config as flat params to the active run, in batches MLflow accepts."""
    import mlflow

    items = sorted(flatten_params(params, prefix).items())
    for i in range(0, len(items), 90):
        mlflow.log_params(dict(items[i : i + 90]))


def mlflow_ui_command(workdir: str | Path) -> str:
    """The command that shows this project's runs."""
    uri = tracking_uri(workdir)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def mlflow_runs_url(base_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs. The plain experiment page opens on MLflow 3's GenAI
    overview (traces, "Detect issues") even for a model-training experiment; ``workflowType=machine_learning``
    opens the runs table."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str, interval_s: float = 5.0) -> Iterator[None]:
    """Log system metrics (``system/...``: CPU, memory, disk, network, GPU) to ``run_id`` while the block runs.

    MLflow's own monitor samples every ``interval_s``; a block shorter than that still gets one sample at its end.
    Best effort: a monitor that cannot start (no psutil) never fails the stage.
    """
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started monitoring" chatter
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
        mon.start()
    except Exception:  # noqa: BLE001 - monitoring is optional
        mon = None
    try:
        yield
    finally:
        if mon is not None:
            with contextlib.suppress(Exception):  # monitoring is optional
                mon.finish()
                if getattr(mon, "_logging_step", 1) == 0:  # ended before the first interval: one sample now
                    mon.collect_metrics()
                    mon.publish_metrics(mon.aggregate_metrics())
                    mon.mlflow_logger.flush()


def log_headline_metrics(uri: str, parent_run_id: str, kind: str, metrics: Mapping[str, float]) -> None:
    """Copy an evaluation's headline metrics onto the training run it evaluates, as ``<kind>/<name>``."""
    import math

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(f"{kind}/{k}", float(v), ts, 0)
        for k, v in metrics.items()
        if v is not None and not (isinstance(v, float) and math.isnan(v))
    ]
    if items:
        MlflowClient(uri).log_batch(parent_run_id, metrics=items)


def write_run_lineage(student_dir: str | Path, run_id: str, experiment_id: str, uri: str) -> None:
    """Record in an exported student which MLflow run trained it (so its evaluations nest under that run)."""
    doc = {"run_id": run_id, "experiment_id": experiment_id, "tracking_uri": uri}
    (Path(student_dir) / LINEAGE_FILE).write_text(json.dumps(doc, indent=1) + "\n")


def training_run_of(checkpoint: str, uri: str) -> tuple[str, str] | None:
    """(run id, experiment id) of the training run that produced ``checkpoint``, when it is in store ``uri``."""
    if not checkpoint:
        return None
    try:
        doc = json.loads(read_bytes(join(checkpoint, LINEAGE_FILE)) or b"")
        from mlflow import MlflowClient

        run = MlflowClient(uri).get_run(str(doc["run_id"]))
    except Exception:  # noqa: BLE001 - no lineage, or another store: the evaluation stands alone
        return None
    return run.info.run_id, run.info.experiment_id
