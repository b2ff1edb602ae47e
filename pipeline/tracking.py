"""MLflow conventions shared by every stage.

* Tracking URI: ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else the embedded store
  ``sqlite:///<workdir>/mlflow.db`` with artifacts in ``<workdir>/mlartifacts``.
* The driver creates the experiment once (SQLite races when several processes create it); workers only log to a
  run id they are given, and only rank 0 logs.
* Every run gets the git commit, and its resolved config as flat params with the same names across runs, so the
  MLflow UI's compare view lines runs up.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "tracking_uri",
    "artifact_root",
    "setup_experiment",
    "git_commit",
    "flatten_params",
    "log_params_flat",
    "mlflow_ui_command",
]


# Read once: ``mlflow.set_tracking_uri`` writes this variable into our own environment, so reading it later would
# send every later workdir of the process to the first store.
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or None


def tracking_uri(workdir: str | Path) -> str:
    """``MLFLOW_TRACKING_URI`` as set when the process started, else ``sqlite:///<abs workdir>/mlflow.db``."""
    if _USER_TRACKING_URI:
        return _USER_TRACKING_URI
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def artifact_root(workdir: str | Path) -> str:
    """Where the embedded store keeps artifacts."""
    return (Path(workdir).resolve() / "mlartifacts").as_uri()


def setup_experiment(name: str, workdir: str | Path) -> str:
    """Point MLflow at the project's store and return the id of experiment ``name`` (created once, here)."""
    import mlflow

    Path(workdir).mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(workdir)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        loc = artifact_root(workdir) if uri.startswith("sqlite:") else None
        try:
            exp_id = client.create_experiment(name, artifact_location=loc)
        except Exception:  # created concurrently by another driver
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(repo: str | Path | None = None) -> str:
    """The project's git commit (``+dirty`` when the tree has changes), or ``unknown``."""
    cwd = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
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

    flat = flatten_params(params, prefix)
    items = sorted(flat.items())
    for i in range(0, len(items), 90):
        mlflow.log_params(dict(items[i : i + 90]))


def mlflow_ui_command(workdir: str | Path) -> str:
    """The command that shows this project's runs."""
    uri = tracking_uri(workdir)
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"
