"""A distillation's MLflow run: created (or reopened on --resume) by the driver with the plan as params, lineage
tags and the cache and image set as dataset inputs; fed per-step metrics by rank 0 (through
:class:`~pipeline.common.tracking_queue.QueuedRunLog`); closed with the loss-curve plot and the finished student as a
registered pyfunc model (:mod:`pipeline.eval.mlflow_model`).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Param

from pipeline.cache.reader import TeacherCache
from pipeline.common.console import verbose
from pipeline.common.storage import write_bytes_atomic
from pipeline.common.tracking import flatten_params, setup_experiment, tracking_uri
from pipeline.data.imageset import ImageSet
from pipeline.train.plan import DistillPlan

__all__ = ["start_run", "log_loss_curve", "log_student_model"]


def start_run(
    plan: DistillPlan,
    prev_run_id: str | None,
    tags: dict[str, str],
    ims: ImageSet,
    cache: TeacherCache | None,
) -> tuple[str, str, str]:
    """Create (or reopen, on resume) the MLflow run; log the plan as params, tags, dataset inputs.

    Returns (tracking URI, experiment id, run id). A resumed run keeps its params; values that changed are
    recorded as ``resume.changed.<param>`` tags."""
    exp_id = setup_experiment(plan.experiment, plan.workdir)
    uri = tracking_uri(plan.workdir)
    client = MlflowClient(uri)
    flat = flatten_params(plan.params())
    if prev_run_id is not None:
        client.update_run(prev_run_id, status="RUNNING")
        run_id = prev_run_id
        old = client.get_run(run_id).data.params
        for k, v in flat.items():
            if k in old and old[k] != v:
                client.set_tag(run_id, f"resume.changed.{k}", v[:5000])
        flat = {k: v for k, v in flat.items() if k not in old}
        client.set_tag(run_id, "resumed", "true")
    else:
        run_id = client.create_run(exp_id, run_name=plan.run_name, tags=tags).info.run_id
    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    if prev_run_id is None:
        _log_inputs(client, run_id, ims, cache)
    return uri, exp_id, run_id


def _log_inputs(client: MlflowClient, run_id: str, ims: ImageSet, cache: TeacherCache | None) -> None:
    """The cache (training targets) and the image set as MLflow dataset inputs (lineage)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    sets = [(ims.url, f"imageset-{ims.fingerprint[:12]}", ims.fingerprint, "training-images")]
    if cache is not None:
        sets.insert(0, (cache.path, f"teacher-cache-{cache.fingerprint[:12]}", cache.fingerprint, "training"))
    for path, name, fp, context in sets:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": all local sources
                source = resolve_dataset_source(path)
        except Exception:  # noqa: BLE001 - any source MLflow cannot classify is recorded as a plain URL
            source = HTTPDatasetSource(path)
        ds = MetaDataset(source=source, name=name, digest=fp[:36])
        tags = [InputTag("mlflow.data.context", context), InputTag("fingerprint", fp)]
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
    client.log_inputs(run_id, datasets=inputs)


def log_loss_curve(client: MlflowClient, run_id: str, out: str) -> None:
    """Plot the per-step loss (last value per step) to ``out`` (a path or URL) and log it as a file and as an
    image of the run (nothing if no loss)."""
    hist = client.get_metric_history(run_id, "loss")
    if not hist:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    by_step = {m.step: m.value for m in sorted(hist, key=lambda m: m.timestamp)}
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [by_step[s] for s in steps], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with tempfile.TemporaryDirectory(prefix="spar-loss-") as tmp:
        png = Path(tmp) / os.path.basename(out.rstrip("/"))
        fig.savefig(png)
        plt.close(fig)
        write_bytes_atomic(out, png.read_bytes())
        client.log_artifact(run_id, str(png))
        with Image.open(png) as im:  # shown in the UI's image view, not only as a file
            client.log_image(run_id, im.convert("RGB"), key="loss_curve", step=0)


def log_student_model(
    client: MlflowClient, uri: str, run_id: str, student_dir: str, register_as: str, dim: int
) -> None:
    """The student as an MLflow pyfunc model (checkpoint files as artifacts), registered as ``register_as``."""
    import mlflow

    from pipeline.eval import mlflow_model  # on import it registers its model with mlflow.models.set_model

    tags = client.get_run(run_id).data.tags
    lineage = {
        "cache_fingerprint": tags.get("cache_fingerprint", ""),
        "imageset_fingerprint": tags.get("imageset_fingerprint", ""),
        "teacher_weights_id": tags.get("teacher_weights_id", ""),
        "git_commit": tags.get("git_commit", ""),
        "dim": dim,
    }
    mlflow.set_tracking_uri(uri)
    chatter = contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), chatter:  # MLflow prints "Successfully registered model ..." to stderr
        warnings.simplefilter("ignore")  # MLflow's notes on pip requirements and model-from-code
        info = mlflow_model.log_student_model(run_id, student_dir, register_as, lineage)
    if register_as and info.registered_model_version is not None:
        client.set_tag(run_id, "registered_model", f"models:/{register_as}/{info.registered_model_version}")
