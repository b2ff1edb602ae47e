"""``distill(cfg)``: the driver of a distillation, in three parts.

1. **prepare**: open the image set and the teacher cache and refuse a cache that does not pair with the images
   (:class:`~pipeline.cache.spec.CachePairingError`), resolve the student and the teacher window, and build the
   :class:`~pipeline.train.plan.DistillPlan`, all before anything is started;
2. **fit**: create (or reopen) the MLflow run with the plan as its params (:mod:`pipeline.train.tracking`) and run
   :func:`pipeline.train.worker.train_rank` on it: in this process for one worker on this machine
   (:mod:`pipeline.train.in_process`; ``trainer``), else as a Ray Train ``TorchTrainer`` (DDP; gloo on CPU, NCCL on
   GPU) of :func:`pipeline.train.worker.train_worker`; ranks resume from the run directory's newest good checkpoint
   (worker failure, or ``--resume`` = the same ``RunConfig(storage_path, name)``) at the exact data position, or
   from a continuation directory when Ray refuses the run's own (:mod:`pipeline.train.run_record`);
3. **finish**: export the final student (:func:`pipeline.train.export.export_student`), log it, the resolved
   config and the loss curve to MLflow, and print the run id with the ``mlflow ui`` command that shows it.

The workdir and the Ray Train storage may be local paths or URLs (``s3://bucket/prefix``, any fsspec scheme): the
driver's own files (``<workdir>/distill/last_run.json``, ``<workdir>/distill/<run>/resolved_config.json`` and
``loss_curve.png``, the student under ``<workdir>/students/<run>``) go through :mod:`pipeline.common.storage`, Ray
Train gets the storage's filesystem (:func:`pipeline.common.storage.arrow_filesystem`), so a cluster needs no
shared disk. A workdir URL needs an MLflow tracking server (``MLFLOW_TRACKING_URI``), checked before anything
starts.
"""

from __future__ import annotations

import argparse
import os
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.common.config import config_from_cli, save_resolved
from pipeline.common.console import verbose
from pipeline.common.local import machine_resources
from pipeline.common.storage import (
    absolute,
    arrow_filesystem,
    is_disk_full,
    is_local,
    join,
    local_path,
    write_bytes_atomic,
)
from pipeline.common.tasks import (
    cluster_cpus,
    cluster_gpus,
    init_ray,
    task_runtime_env,
    train_log_level,
)
from pipeline.common.trace import mark
from pipeline.common.tracking import git_commit, mlflow_ui_command, require_remote_store, wait_for_server
from pipeline.data.imageset import ImageSet, open_imageset
from pipeline.student.format import CheckpointError, local_student
from pipeline.train.config import DistillConfig, DistillError, trains_in_process
from pipeline.train.export import export_student
from pipeline.train.in_process import InProcessResult, fit_in_process
from pipeline.train.loader_auto import size_loader
from pipeline.train.plan import DistillPlan, RunLink, make_plan, resolve_student, teacher_window
from pipeline.train.progress import log, progress_bar
from pipeline.train.run_dir import checkpoint_location, checkpoints_newest_first, newest_good, ray_checkpoint
from pipeline.train.run_record import (
    RayRun,
    check_resume_backbone,
    ray_run_of,
    remember_run,
    resolve_run_name,
    resume_ray_run,
)
from pipeline.train.state import step_of
from pipeline.train.stream import Planner, refs_from_imageset
from pipeline.train.tracking import log_loss_curve, log_student_model, start_run
from pipeline.train.worker import train_worker
from spar_core.backbones import Backbone, build_backbone

# Ray reads this when it is first imported: without it, a driver started by `uv run` ships the whole working
# directory (virtualenv included) to every worker. Workers on this machine share our environment.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

__all__ = ["DistillResult", "distill", "config_from_args", "run_cli"]


@dataclass
class DistillResult:
    """What a finished (or interrupted) distillation left behind."""

    run_id: str  # MLflow run id
    run_name: str  # Ray Train run name (resume with it)
    checkpoint_dir: str  # exported student checkpoint, path or URL (checkpoint.load_student); "" if none
    ray_checkpoint: str  # last Ray Train checkpoint (training state), path or URL
    steps: int  # optimizer steps done
    total_steps: int  # steps planned
    final_loss: float | None
    tracking_uri: str
    experiment_id: str
    completed: bool  # False when stopped before total_steps (resume to continue)


@dataclass
class _Inputs:
    """The opened inputs and the student they call for (checked against each other)."""

    ims: ImageSet
    cache: TeacherCache | None
    student: Backbone  # built from the resolved name, weights and seed below
    pretrained: str  # an open_clip tag or a file, "none" = random seeded
    seed: int


def distill(cfg: DistillConfig, resume: bool = False) -> DistillResult:
    """Train the single-pass student (see the module docstring). Raises DistillError / CachePairingError."""
    require_remote_store(cfg.workdir)
    mark("distill_start")
    inputs = _open_inputs(cfg)
    mark("inputs_open")
    workdir = _workdir(cfg.workdir)
    lineage_fp = inputs.cache.fingerprint if inputs.cache is not None else inputs.ims.fingerprint
    run_name, prev_run_id = resolve_run_name(cfg, workdir, resume, lineage_fp)
    storage = cfg.storage_path or join(workdir, "ray_results")
    ray_run = ray_run_of(workdir, storage, run_name)
    if resume:
        check_resume_backbone(ray_run.dirs, inputs.student)
        ray_run = resume_ray_run(workdir, storage, run_name, ray_run)
    in_process = trains_in_process(cfg)
    if not in_process:
        init_ray(cfg.ray_address or None)
    plan = _plan(cfg, inputs, workdir, run_name, storage, in_process)
    uri, exp_id, run_id = start_run(plan, prev_run_id, _tags(plan, inputs), inputs.ims, inputs.cache)
    mark("mlflow_run")
    remember_run(workdir, run_name, run_id)
    client = MlflowClient(uri)
    _save_resolved(cfg, plan, client, run_id)
    if verbose():
        where = "in this process" if in_process else f"on {plan.workers} Ray Train worker(s)"
        log(f"run {run_name}: {plan.total_steps} steps {where}, MLflow run {run_id}")
    try:
        result = _train(plan, RunLink(run_id, uri), ray_run, in_process)
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        if is_disk_full(e):
            raise DistillError(_disk_full_message(run_name, ray_run)) from None
        raise DistillError(
            f"distill run {run_name} failed: {e}. Finished checkpoints are kept under {ray_run.dirs[-1]}; "
            f"fix the cause and re-run with --resume"
        ) from e
    return _finish(plan, client, RunLink(run_id, uri), exp_id, result, inputs.student.dim, ray_run.start)


def _disk_full_message(run_name: str, ray_run: RayRun) -> str:
    """One line for a run stopped by a full disk: where, the checkpoint kept, how to continue."""
    kept = newest_good(checkpoints_newest_first(ray_run.dirs), log=lambda _msg: None)
    return (
        f"distill run {run_name} stopped: no space left on the device while a training checkpoint was written "
        f"under {ray_run.dirs[-1]}; the last good checkpoint is kept ({kept or 'none yet'}). Free some space, "
        f"then continue with: spar distill ... --resume"
    )


# ------------------------------------------------------------------------------------------------ prepare


def _open_inputs(cfg: DistillConfig) -> _Inputs:
    """Open and check the inputs before anything starts."""
    if not cfg.images:
        raise DistillError("distill: --images is required")
    if not cfg.cache and not cfg.teacher_online:
        raise DistillError(
            "distill: --cache is required (or --teacher-online to compute the teacher in the loop)"
        )
    ims = open_imageset(cfg.images)
    cache = open_cache(cfg.cache) if cfg.cache else None
    if cache is not None and not cfg.teacher_online:
        cache.check_pairing(ims)  # raises CachePairingError before any step
    name, pretrained, seed = resolve_student(cfg, cache.spec if cache is not None else None)
    bb = build_backbone(name, None if pretrained == "none" else pretrained, seed=seed)
    if cfg.trainable_blocks != "all" and cfg.trainable_blocks > bb.num_blocks:
        raise DistillError(
            f"distill: trainable_blocks={cfg.trainable_blocks} but {name} has {bb.num_blocks} blocks"
        )
    if cache is not None and not cfg.teacher_online:
        _check_student_fits_cache(bb, cache)
    return _Inputs(ims, cache, bb, pretrained, seed)


def _check_student_fits_cache(bb: Backbone, cache: TeacherCache) -> None:
    if cache.dim and cache.dim != bb.dim:
        raise DistillError(
            f"distill: student {bb.name} has feature dim {bb.dim}, the cache holds {cache.dim}"
        )
    if cache.patch_size and cache.patch_size != bb.patch_size:
        raise DistillError(
            f"distill: student {bb.name} has patch size {bb.patch_size}, the cache {cache.patch_size}"
        )
    if bb.weights_id != cache.spec.weights_id:
        log(
            f"warning: the student starts from {bb.weights_id}, the cache teacher was {cache.spec.weights_id}"
        )


def _plan(
    cfg: DistillConfig, inputs: _Inputs, workdir: str, run_name: str, storage: str, in_process: bool
) -> DistillPlan:
    """The resolved plan of the run, sized by this machine (in process) or by the cluster (Ray must be up)."""
    cache, bb = inputs.cache, inputs.student
    cpus, gpus_seen = machine_resources() if in_process else (cluster_cpus(), cluster_gpus())
    crop, stride = teacher_window(cfg, cache.spec if cache is not None else None, bb.native_size)
    if cfg.teacher_online and crop % bb.patch_size:
        raise DistillError(f"distill: crop {crop} is not a multiple of the patch size {bb.patch_size}")
    planner = Planner(refs_from_imageset(inputs.ims), seed=cfg.seed, world_size=cfg.workers,
                      batch_size=cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer)  # fmt: skip
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker >= 0 else (1.0 if gpus_seen > 0 else 0.0)
    return make_plan(
        cfg,
        trainer="in-process" if in_process else "ray",
        loader_workers=_loader_workers(cfg, inputs, gpus > 0, cpus),
        images=absolute(cfg.images),
        cache=absolute(cfg.cache) if cfg.cache else "",
        cache_fingerprint=cache.fingerprint if cache is not None else "",
        student=bb.name,
        pretrained=inputs.pretrained,
        backbone_seed=inputs.seed,
        patch_size=bb.patch_size,
        crop=crop,
        stride=stride,
        total_steps=cfg.max_steps if cfg.max_steps > 0 else planner.total_steps(cfg.epochs),
        steps_per_epoch=planner.steps(0),
        gpus_per_worker=gpus,
        workdir=workdir,
        run_name=run_name,
        storage_path=storage,
    )


def _loader_workers(cfg: DistillConfig, inputs: _Inputs, on_gpu: bool, cpus: int) -> int:
    """``cfg.loader_workers``, with ``"auto"`` sized for this run and ``cpus`` (the decision is logged)."""
    if cfg.loader_workers != "auto":
        return int(cfg.loader_workers)
    dtype = inputs.cache.spec.dtype if inputs.cache is not None and not cfg.teacher_online else None
    spare = max(1, cpus // cfg.workers - cfg.cpus_per_worker)  # CPUs per worker beyond its trainer
    sz = size_loader(inputs.ims, inputs.student, dtype, cfg.trainable_blocks, on_gpu, spare)
    log(f"loader_workers auto -> {sz.workers} ({sz.load_s * 1e3:.0f} ms decoding per sample vs a "
         f"{sz.step_s * 1e3:.0f} ms {'GPU' if on_gpu else 'CPU'} step{'; capped by the CPUs' if sz.capped else ''})")  # fmt: skip
    return sz.workers


def _tags(plan: DistillPlan, inputs: _Inputs) -> dict[str, str]:
    """The run's lineage tags."""
    cache, bb = inputs.cache, inputs.student
    return {
        "spar.stage": "distill",
        "cache_fingerprint": plan.cache_fingerprint,
        "imageset_fingerprint": inputs.ims.fingerprint,
        "git_commit": git_commit(),
        "backbone": plan.student,
        "weights_id": bb.weights_id,
        "teacher_weights_id": cache.spec.weights_id if cache is not None else bb.weights_id,
        "teacher_online": str(plan.teacher_online).lower(),
        "ray_run_name": plan.run_name,
    }


def _workdir(path: str) -> str:
    """The workdir as the run records it: an absolute local directory (created), or the URL as given."""
    if not is_local(path):
        return path.rstrip("/")
    d = Path(local_path(path)).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


def _save_resolved(cfg: DistillConfig, plan: DistillPlan, client: MlflowClient, run_id: str) -> None:
    """``<workdir>/distill/<run>/resolved_config.json`` (the config and the plan), also an artifact of the run."""
    with tempfile.TemporaryDirectory(prefix="spar-distill-") as tmp:
        local = save_resolved(
            cfg, os.path.join(tmp, "resolved_config.json"), extra={"effective": plan.params()}
        )
        out = join(plan.workdir, "distill", plan.run_name, "resolved_config.json")
        write_bytes_atomic(out, local.read_bytes(), error=DistillError)
        client.log_artifact(run_id, str(local))


# ---------------------------------------------------------------------------------------------------- fit


def _train(plan: DistillPlan, link: RunLink, ray_run: RayRun, in_process: bool) -> Result | InProcessResult:
    """Train in this process or on a Ray Train worker group, with the driver's progress bar."""
    if in_process:
        mark("fit_start")
        result = fit_in_process(plan, link, ray_run.dirs[-1], ray_run.start)
        mark("fit_done")
        return result
    with progress_bar(link.run_id, plan.total_steps) as actor:
        return _fit(plan, RunLink(link.run_id, link.tracking_uri, actor), ray_run)


def _fit(plan: DistillPlan, link: RunLink, ray_run: RayRun) -> Result:
    """Run the Ray Train job of the plan in ``ray_run``'s directory; returns Ray's result (last metrics and
    checkpoint)."""
    resources: dict[str, float] = {"CPU": float(plan.cpus_per_worker)}
    gpus = plan.gpus_per_worker
    if gpus > 0:
        resources["GPU"] = gpus
    fs, storage_path = arrow_filesystem(plan.storage_path)  # a URL's fsspec filesystem, wrapped for pyarrow
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"plan": plan, "link": link, "start": ray_run.start},
        scaling_config=ScalingConfig(
            num_workers=plan.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=ray_run.name,
            storage_path=storage_path,
            storage_filesystem=fs,
            worker_runtime_env=task_runtime_env(),  # storage credentials and endpoints, never as arguments
            failure_config=FailureConfig(max_failures=plan.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=plan.keep_checkpoints),
            logging_config=LoggingConfig(log_level=train_log_level()),  # Ray's chatter only with --verbose
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
    )
    mark("fit_start")
    result = trainer.fit()
    mark("fit_done")
    return result


# ------------------------------------------------------------------------------------------------- finish


def _export(plan: DistillPlan, ckpt: Checkpoint | None, link: RunLink, exp_id: str) -> str:
    """The final student exported to ``<workdir>/students/<run name>`` (path or URL; "" when the run saved no
    checkpoint)."""
    if ckpt is None:
        return ""
    lineage = {"run_id": link.run_id, "experiment_id": exp_id, "tracking_uri": link.tracking_uri}
    out = join(plan.workdir, "students", plan.run_name)
    with ckpt.as_directory() as d:  # a remote checkpoint is downloaded
        try:
            return export_student(d, out, lineage)
        except CheckpointError as e:
            raise DistillError(f"the final checkpoint cannot be exported: {e}") from None


def _finish(
    plan: DistillPlan,
    client: MlflowClient,
    link: RunLink,
    exp_id: str,
    result: Result | InProcessResult,
    dim: int,
    start: str,
) -> DistillResult:
    """Export and log the student and the loss curve, close the run, print where everything is. ``start``: the
    checkpoint a continuation started from (the last one when it had no step left to train)."""
    metrics, ckpt, run_id = result.metrics or {}, result.checkpoint, link.run_id
    # bounded; one line while it waits
    wait_for_server(link.tracking_uri, what="distill (logging the student)")
    if ckpt is None and start:
        ckpt = ray_checkpoint(start)
    steps = int(metrics.get("step", 0))
    export = _export(plan, ckpt, link, exp_id)
    if ckpt is not None and steps == 0:
        steps = int(step_of(posixpath.basename(ckpt.path.rstrip("/"))) or 0)
    log_loss_curve(client, run_id, join(plan.workdir, "distill", plan.run_name, "loss_curve.png"))
    final_loss = metrics.get("loss")
    completed = steps >= plan.total_steps
    if export:
        with local_student(export) as local:  # MLflow logs local files: a remote student is downloaded
            if completed:
                log_student_model(client, link.tracking_uri, run_id, str(local), plan.register_model, dim)
            else:  # an unfinished student: its files, not a model
                client.log_artifacts(run_id, str(local), artifact_path="student")
    client.log_metric(run_id, "steps_done", steps)
    client.set_terminated(run_id, status="FINISHED" if completed else "KILLED")
    print(f"distill run {plan.run_name}: {steps}/{plan.total_steps} steps, final loss {final_loss}")
    if export:
        print(f"student checkpoint: {export}")
    if not completed:
        print(f"stopped before the last step; continue with: spar distill ... --resume (run {plan.run_name})")
    print(f"MLflow run id: {run_id}")
    print(f"view it with: {mlflow_ui_command(plan.workdir)}")
    mark("finish_done")
    return DistillResult(
        run_id=run_id,
        run_name=plan.run_name,
        checkpoint_dir=export,
        ray_checkpoint=checkpoint_location(ckpt) if ckpt is not None else "",
        steps=steps,
        total_steps=plan.total_steps,
        final_loss=float(final_loss) if final_loss is not None else None,
        tracking_uri=link.tracking_uri,
        experiment_id=exp_id,
        completed=completed,
    )


# ---------------------------------------------------------------------------------------------------- CLI


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """DistillConfig from ``spar distill`` arguments: defaults <- recipe [distill] <- --set <- explicit flags."""
    return config_from_cli(DistillConfig, args, "distill")


def run_cli(args: argparse.Namespace) -> int:
    """``spar distill`` (arguments: :mod:`pipeline.train.cli`)."""
    distill(config_from_args(args), resume=args.resume)
    return 0
