"""The one MLflow logging path of ``spar eval``: the benchmark, the fidelity report and the speed report each
describe what they log as an :class:`EvalRun`, and :func:`log_eval` logs it the same way.

An evaluation run holds the resolved config as flat params (one name per parameter: ``params`` replace the config's
unresolved values), the git commit, system metrics, its metrics (NaN left out), artifacts and PNG pictures
(as MLflow images too). It is a child of the training run it evaluates (``--parent-run``, or the run recorded in
the checkpoint), in that run's experiment, and copies its headline metrics onto it as ``<kind>/<name>``; without
one it is a run of ``cfg.experiment``. Result files go to ``--out`` (a folder or any fsspec URL: written to a local
folder for MLflow, then copied there), or a temporary folder (:func:`output_dir`).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from PIL import Image

from pipeline.common import storage
from pipeline.common.config import to_dict
from pipeline.common.tracking import (
    PARENT_RUN_TAG,
    git_commit,
    log_headline_metrics,
    log_params_flat,
    setup_experiment,
    system_metrics,
    tracking_uri,
    training_run_of,
)
from pipeline.eval.config import EvalError, ReportConfig


@dataclass
class EvalRun:
    """What one evaluation logs (file names are relative to the output folder)."""

    kind: str  # the ``spar.eval`` tag: benchmark | fidelity | speed
    default_name: str  # the run name unless ``cfg.run_name`` is given
    params: dict[str, object]  # resolved values, logged over the config's own (unresolved) ones
    metrics: dict[str, float]
    headline_kind: str  # copied onto the training run as ``<headline_kind>/<name>``
    headline: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)
    table: dict[str, list] | None = None  # columns of an MLflow table, logged as ``table_file``
    table_file: str = ""
    files: list[str] = field(default_factory=list)  # logged as artifacts at the root
    folders: list[str] = field(default_factory=list)  # logged as artifact folders of the same name
    images: dict[str, str] = field(default_factory=dict)  # PNG file -> MLflow image key prefix


@contextlib.contextmanager
def output_dir(cfg: ReportConfig) -> Iterator[Path]:
    """The local folder the block writes its result files into: ``cfg.out`` (created) when it is a local folder;
    for a URL ``cfg.out`` a temporary folder copied there when the block succeeds (:func:`storage.staged_dir`);
    without ``cfg.out`` a temporary folder removed at the end of the block."""
    if cfg.out:
        with storage.staged_dir(cfg.out) as d:
            yield Path(d)
        return
    with tempfile.TemporaryDirectory(prefix="spar-eval-") as tmp:
        yield Path(tmp)


def metric_key(name: str) -> str:
    """A name as an MLflow metric key (characters MLflow refuses replaced, at most 200)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:200]


def class_key_part(name: str) -> str:
    """A class name as one metric-key segment: no '/', '\\' or '..' (MLflow refuses path-like keys)."""
    part = re.sub(r"[^A-Za-z0-9_\- ]", "_", str(name)).strip() or "_"
    return part[:120]


def png_images(out: Path, folder: str, key: str) -> dict[str, str]:
    """Every PNG of ``out / folder`` as an :attr:`EvalRun.images` entry under ``key``."""
    return {f"{folder}/{p.name}": key for p in sorted((out / folder).glob("*.png"))}


def log_eval(cfg: ReportConfig, out: Path, run: EvalRun) -> None:
    """Log ``run`` (files under ``out``) to MLflow; nothing when ``cfg.mlflow`` is off. The run holds the resolved
    config, git commit and system metrics, under its training run if any."""
    if not cfg.mlflow:
        return
    workdir = cfg.workdir or os.environ.get("SPAR_WORKDIR", "work")  # as spar distill
    exp_id = setup_experiment(cfg.experiment, workdir)
    uri = tracking_uri(workdir)
    if cfg.parent_run:  # parent: (run id, experiment id) of the training run evaluated, if any
        try:
            found = MlflowClient(uri).get_run(cfg.parent_run)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception types
            raise EvalError(f"--parent-run {cfg.parent_run}: no such MLflow run in {uri} ({e})") from None
        parent: tuple[str, str] | None = (found.info.run_id, found.info.experiment_id)
    else:
        parent = training_run_of(cfg.checkpoint, uri)
    tags = {"spar.stage": "eval", "git_commit": git_commit(), "spar.eval": run.kind, **run.tags}
    if parent is not None:
        exp_id = parent[1]
        tags[PARENT_RUN_TAG] = parent[0]
    with mlflow.start_run(
        experiment_id=exp_id, run_name=cfg.run_name or run.default_name, tags=tags
    ) as active:
        log_params_flat({**to_dict(cfg), **run.params, "parent_run": parent[0] if parent else ""})
        with system_metrics(active.info.run_id, uri):
            mlflow.log_metrics(
                {k: v for k, v in run.metrics.items() if not (isinstance(v, float) and math.isnan(v))}
            )
            if run.table is not None:
                mlflow.log_table(run.table, artifact_file=run.table_file)
            for f in run.files:
                mlflow.log_artifact(str(out / f))
            for d in run.folders:
                mlflow.log_artifacts(str(out / d), artifact_path=d)
            for f, key in run.images.items():
                with Image.open(out / f) as im:
                    # synchronous: MLflow's asynchronous image upload ends with a ~1 s wait when the run closes
                    mlflow.log_image(im.convert("RGB"), key=f"{key}/{Path(f).stem}", step=0, synchronous=True)
            if parent is not None:
                log_headline_metrics(uri, parent[0], run.headline_kind, run.headline)
