"""Distillation with Ray Train: workers stream images + cached teacher targets and train the single-pass student.

``distill(cfg)`` (driver):

1. opens the image set and the teacher cache and refuses a cache that does not pair with the images
   (:class:`~pipeline.cache.store.CachePairingError`) before anything is started;
2. creates the MLflow run (params = the full resolved config, tags = lineage, the cache and image set as dataset
   inputs) and hands its id to the workers;
3. runs a Ray Train ``TorchTrainer`` (DDP; gloo on CPU, NCCL on GPU). Every worker streams its own shard pairs
   (:mod:`pipeline.data.stream`), trains the last ``k`` blocks with AdamW, reports a checkpoint every
   ``checkpoint_every`` steps and at every epoch end, and resumes from ``ray.train.get_checkpoint()`` (worker
   failure, or ``--resume`` = the same ``RunConfig(storage_path, name)``) at the exact data position;
4. exports the final student (:func:`pipeline.train.checkpoint.save_student` layout), logs it, the resolved config and
   the loss curve to MLflow, and prints the run id with the ``mlflow ui`` command that shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import posixpath
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.common.config import ConfigError
from pipeline.common.errors import UserError
from pipeline.eval.config import default_stride
from pipeline.train.checkpoint import (
    BACKBONE_FILE,
    CONFIG_FILE,
    STUDENT_FILE,
    CheckpointError,
    TrainState,
    capture_rng,
    checkpoint_dir_name,
    load_training_checkpoint,
    restore_rng,
    save_training_checkpoint,
    step_of,
    verify_checkpoint,
    write_checksums,
)

# Ray reads this when it is first imported: without it, a driver started by `uv run` ships the whole working
# directory (virtualenv included) to every worker. Workers on this machine share our environment.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

_RUN_NAME_OK = re.compile(r"[A-Za-z0-9._-]{1,128}")

__all__ = ["DistillConfig", "DistillResult", "DistillError", "distill", "add_cli", "lr_at", "StepRunner"]


@dataclass
class DistillConfig:
    """Configuration of ``spar distill`` (TOML section ``[distill]``)."""

    images: str = ""  # image-set root
    cache: str = ""  # teacher cache path <cache_root>/<fingerprint> ("" only with teacher_online)
    student: str = ""  # backbone name; "" = the cache's teacher backbone
    pretrained: str = "auto"  # "auto" = the cache teacher's weights; "none" = random seeded; a tag or a file
    backbone_seed: int = -1  # seed of random weights; -1 = the cache teacher's (or 0)
    trainable_blocks: int | Literal["all"] = 2  # the last k blocks are trained; "all": the whole image tower
    lr: float = 2e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr
    # after warm-up: "constant" (the authors' run: AdamW without a scheduler; "none" is the same) or "cosine" to 0
    schedule: Literal["none", "constant", "cosine"] = "none"
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: pipeline.common.precision.resolve
    epochs: int = 10
    max_steps: int = 0  # > 0: stop after this many optimizer steps (epochs are repeated as needed)
    batch_size: int = 1  # > 1: batches of equal-size images (size buckets)
    shuffle_buffer: int = 64  # sample shuffle buffer per worker
    seed: int = 0  # data order and torch seed
    checkpoint_every: int = 500  # steps between checkpoints (and one at each epoch end)
    keep_checkpoints: int = (
        3  # Ray Train keeps this many (older good ones are the fall-back for corrupt ones)
    )
    log_every: int = 10  # flush per-step metrics to MLflow every this many steps
    workers: int = 1  # Ray Train workers (DDP ranks)
    cpus_per_worker: int = 1  # Ray CPUs per worker = torch threads
    gpus_per_worker: float = -1.0  # -1 = 1 when the cluster has GPUs, else 0
    loader_workers: int = 2  # background decode processes per worker (0 = decode in the training process)
    verify_pixels: bool = True  # check every image's pixel sha256 while streaming
    workdir: str = "work"  # MLflow store, Ray results, exported students
    experiment: str = "spar-distill"
    register_model: str = "spar-student"  # registered MLflow model name ("" = log it, do not register)
    run_name: str = ""  # Ray Train run name ("" = generated); --resume continues the last run of the workdir
    storage_path: str = ""  # Ray Train storage ("" = <workdir>/ray_results); shared/S3 on a cluster
    max_failures: int = 2  # worker-failure restarts (from the last checkpoint)
    teacher_online: bool = False  # compute the teacher inside the loop instead of reading the cache
    crop: int = 0  # online teacher window (0 = the cache's, else the backbone's native size)
    stride: int = 0  # online teacher stride (0 = the cache's, else 24 px: the paper's teacher at every crop)
    window_batch: int = 32  # online teacher windows per forward
    ray_address: str = ""  # "" = local in-process cluster (or RAY_ADDRESS)
    fail_at_step: int = 0  # test hook: one worker raises once after this step (marker file in the workdir)
    stop_at_step: int = 0  # test hook: end the run after this step's checkpoint, as if interrupted

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "workers")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"distill.{name} must be >= 1, got {getattr(self, name)}")
        nonneg = (
            "max_steps",
            "warmup_steps",
            "loader_workers",
            "max_failures",
            "crop",
            "stride",
            "fail_at_step",
        )
        for name in (*nonneg, "stop_at_step", "trainable_blocks", "shuffle_buffer"):
            if name == "trainable_blocks" and self.trainable_blocks == "all":
                continue
            if getattr(self, name) < 0:
                raise ConfigError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("distill.lr must be > 0, weight_decay and grad_clip >= 0")
        if self.cpus_per_worker < 1 or self.window_batch < 1:
            raise ConfigError("distill.cpus_per_worker and window_batch must be >= 1")
        if self.run_name and (not _RUN_NAME_OK.fullmatch(self.run_name) or self.run_name.startswith(".")):
            raise ConfigError(
                f"distill.run_name {self.run_name!r} may only hold letters, digits, '.', '_' and '-' "
                "(it names directories) and must not start with '.'"
            )


@dataclass
class DistillResult:
    """What a finished (or interrupted) distillation left behind."""

    run_id: str  # MLflow run id
    run_name: str  # Ray Train run name (resume with it)
    checkpoint_dir: (
        str  # exported student checkpoint (load with pipeline.train.checkpoint.load_student); "" if none
    )
    ray_checkpoint: str  # last Ray Train checkpoint (training state)
    steps: int  # optimizer steps done
    total_steps: int  # steps planned
    final_loss: float | None
    tracking_uri: str
    experiment_id: str
    completed: bool  # False when stopped before total_steps (resume to continue)


class DistillError(UserError):
    """Distillation cannot start or did not finish (bad inputs, or training failed beyond its retries)."""


# --------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant (``schedule`` "none" or
    "constant") or cosine to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return base_lr


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, whether a GradScaler is needed) for ``precision`` on ``device``."""
    from pipeline.common.precision import autocast_dtype, resolve

    p = resolve(precision, device)  # auto: the fastest on this device (pipeline.common.precision)
    if p == "fp16" and device.type != "cuda":
        raise DistillError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return autocast_dtype(p), p == "fp16"


# ----------------------------------------------------------------------------------------- one step


class StepRunner:
    """One optimizer step of distillation; shared by the Ray Train worker and the benchmarks."""

    def __init__(
        self,
        bb: Any,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        cfg: DistillConfig,
        device: torch.device,
        total_steps: int,
        teacher: Any = None,
        crop: int = 0,
        stride: int = 0,
    ) -> None:
        self.bb, self.model, self.params, self.cfg = bb, model, params, cfg
        self.device, self.total_steps = device, total_steps
        self.teacher, self.crop, self.stride = teacher, crop, stride
        self.autocast_dtype, need_scaler = resolve_precision(cfg.precision, device)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if need_scaler else None

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def target(self, item: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """The teacher target (B, h, w, D) float32: from the cache, or computed online."""
        if self.teacher is None:
            return item["target"].to(self.device, non_blocking=True).float()
        from spar_core.sliding import sliding_window_features

        with torch.no_grad():
            return sliding_window_features(
                self.teacher, x, self.crop, self.stride, self.cfg.window_batch, self.autocast_dtype
            )

    def step(self, item: dict[str, Any], step: int) -> tuple[torch.Tensor, float]:
        """Train on one batch as optimizer step ``step``; returns (detached loss, lr used)."""
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.schedule, self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        img = item["image"].to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
        x = self.bb.normalize(img)  # (B, 3, H, W)
        target = self.target(item, x)  # (B, H/p, W/p, D)
        with self._autocast():
            out = self.model(x)  # (B, H/p, W/p, D)
        from spar_core.distill import distill_loss

        loss = distill_loss(out.float(), target)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss.detach(), lr


# ------------------------------------------------------------------------------------------- worker


def _log(msg: str) -> None:
    print(f"[spar distill] {msg}", file=sys.stderr, flush=True)


def _checkpoint_candidates(ckpt: Any) -> list[Any]:
    """Ray's latest checkpoint first, then its older siblings in the run directory (newest first)."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, path = ckpt.filesystem, ckpt.path.rstrip("/")
    parent = posixpath.dirname(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    steps = {
        i.path.rstrip("/"): step_of(posixpath.basename(i.path.rstrip("/")))
        for i in infos
        if i.type == pafs.FileType.Directory
    }
    latest = steps.get(path)
    others = sorted(
        (p for p, s in steps.items() if s is not None and p != path and (latest is None or s <= latest)),
        key=lambda p: steps[p] or 0,
        reverse=True,
    )
    return [ckpt] + [Checkpoint(path=p, filesystem=fs) for p in others]


def _restore(ckpt: Any) -> tuple[TrainState, dict[str, torch.Tensor], str] | None:
    """Load the newest good checkpoint (reporting and skipping corrupt or incomplete ones)."""
    for cand in _checkpoint_candidates(ckpt):
        try:
            with cand.as_directory() as d:
                state, weights = load_training_checkpoint(d)
            return state, weights, cand.path
        except (CheckpointError, OSError) as e:
            _log(f"checkpoint {cand.path} is unusable, trying the previous one: {e}")
    _log("no usable checkpoint found; starting from the base weights")
    return None


class _MetricLog:
    """Rank 0's buffered per-step metrics to the MLflow run the driver created."""

    def __init__(self, tracking_uri: str, run_id: str, every: int) -> None:
        from mlflow import MlflowClient

        self.client, self.run_id, self.every = MlflowClient(tracking_uri), run_id, every
        self.buf: list[Any] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buf.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        if len(self.buf) >= 5 * self.every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.buf), 900):
            self.client.log_batch(self.run_id, metrics=self.buf[i : i + 900])
        self.buf = []


def _build_student(job: dict[str, Any], device: torch.device) -> Any:
    from spar_core.backbones import build_backbone

    return build_backbone(job["student"], job["pretrained"], device=device, seed=job["backbone_seed"])


def _train_worker(job: dict[str, Any]) -> None:
    """Ray Train worker loop (every rank)."""
    import ray.train
    import ray.train.torch

    from pipeline.data.stream import PairedStream, Planner, make_loader, refs_from_imageset

    cfg = DistillConfig(**job["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    torch.manual_seed(cfg.seed)

    bb = _build_student(job, device)
    from spar_core.distill import trainable_parameters

    params = trainable_parameters(bb, cfg.trainable_blocks)
    state = TrainState(extra={"epoch_loss_sum": 0.0, "epoch_steps": 0})
    restored = _restore(ray.train.get_checkpoint()) if ray.train.get_checkpoint() else None
    if restored is not None:
        state, weights, where = restored
        bb.load_trainable_state_dict({k: v.to(device) for k, v in weights.items()})
        _log(
            f"rank {rank}: resumed from {where} at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        )
        saved_world = state.extra.get("world_size")
        if saved_world not in (None, world):
            _log(
                f"warning: the checkpoint was written by {saved_world} workers, this run has {world}: the data "
                "order changes from here on (samples may repeat or be skipped in the current epoch)"
            )
    model = bb
    if world > 1:
        model = ray.train.torch.prepare_model(bb, parallel_strategy_kwargs={"forward_sync_buffers": False})
    teacher = _build_student(job, device) if cfg.teacher_online else None
    runner = StepRunner(
        bb,
        model,
        params,
        cfg,
        device,
        job["total_steps"],
        teacher=teacher,
        crop=job["crop"],
        stride=job["stride"],
    )
    if restored is not None:
        if state.optimizer is not None:
            runner.opt.load_state_dict(state.optimizer)
        if runner.scaler is not None and state.scaler:
            runner.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng)

    from pipeline.data.imageset import open_imageset

    planner = Planner(
        refs_from_imageset(open_imageset(cfg.images)),
        seed=cfg.seed,
        world_size=world,
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    total = job["total_steps"]
    if state.step >= total:
        _log(f"rank {rank}: nothing to do, already at step {state.step} of {total}")
        ray.train.report({"step": state.step, "epoch": state.epoch, "done": 1})
        return
    stream = PairedStream(
        cfg.images,
        None if cfg.teacher_online else cfg.cache,
        seed=cfg.seed,
        rank=rank,
        world_size=world,
        patch_size=job["patch_size"],
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        start_epoch=state.epoch,
        start_batch=state.batch_in_epoch,
        num_batches=total - state.step,
        verify=cfg.verify_pixels,
    )
    mlog = _MetricLog(job["tracking_uri"], job["run_id"], cfg.log_every) if rank == 0 else None
    if mlog is not None:  # where and how the steps really ran (a GPU check reads these back)
        amp = runner.autocast_dtype
        for k, v in {
            "worker_device": str(device),
            "autocast_dtype": str(amp).removeprefix("torch.") if amp is not None else "none",
            "grad_scaler": str(runner.scaler is not None).lower(),
        }.items():
            mlog.client.set_tag(job["run_id"], k, v)
    loader = make_loader(stream, cfg.loader_workers)
    if rank != 0:
        _loop(cfg, job, runner, planner, loader, state, rank, world, mlog)
        return
    from pipeline.common.tracking import system_metrics

    with system_metrics(job["run_id"], job["tracking_uri"]):  # on rank 0's node: its CPUs, memory, GPUs
        _loop(cfg, job, runner, planner, loader, state, rank, world, mlog)


def _loop(
    cfg: DistillConfig,
    job: dict[str, Any],
    runner: StepRunner,
    planner: Any,
    loader: Any,
    state: TrainState,
    rank: int,
    world: int,
    mlog: _MetricLog | None,
) -> None:
    import torch.distributed as dist

    total = job["total_steps"]
    progress = _progress_actor(job.get("progress")) if rank == 0 else None
    it: Iterator[dict[str, Any]] = iter(loader)
    epoch_t0 = t_prev = time.perf_counter()
    while state.step < total:
        t0 = time.perf_counter()
        item = next(it)
        t1 = time.perf_counter()
        if (item["epoch"], item["batch"]) != (state.epoch, state.batch_in_epoch):
            raise RuntimeError(
                f"stream out of step: got batch {item['batch']} of epoch {item['epoch']}, expected "
                f"{state.batch_in_epoch} of {state.epoch}"
            )
        loss, lr = runner.step(item, state.step)
        if world > 1:
            dist.all_reduce(loss)
            loss = loss / world
        loss_v = float(loss)
        t2 = time.perf_counter()
        state.step += 1
        ended_epoch = state.epoch
        state.epoch, state.batch_in_epoch = planner.advance(item["epoch"], item["batch"])
        state.extra["epoch_loss_sum"] = state.extra.get("epoch_loss_sum", 0.0) + loss_v
        state.extra["epoch_steps"] = state.extra.get("epoch_steps", 0) + 1
        step_time = t2 - t_prev
        t_prev = t2
        images_per_s = len(item["keys"]) * world / max(step_time, 1e-9)
        if progress is not None:  # fire and forget: the driver's progress bar reads it
            progress.put.remote((state.step, loss_v, images_per_s))
        if mlog is not None:
            mlog.add(
                {
                    "loss": loss_v,
                    "lr": lr,
                    "images_per_s": images_per_s,
                    "data_wait_frac": (t1 - t0) / max(step_time, 1e-9),
                    "step_time_s": step_time,
                    **({"grad_scale": runner.scaler.get_scale()} if runner.scaler is not None else {}),
                },
                state.step,
            )
        epoch_done = state.epoch != ended_epoch
        metrics: dict[str, Any] = {"step": state.step, "epoch": ended_epoch, "loss": loss_v}
        if epoch_done:
            n = max(1, state.extra["epoch_steps"])
            metrics["epoch_loss"] = state.extra["epoch_loss_sum"] / n
            if mlog is not None:
                mlog.add({"epoch_loss": metrics["epoch_loss"], "epoch_time_s": t2 - epoch_t0}, ended_epoch)
            state.extra["epoch_loss_sum"], state.extra["epoch_steps"] = 0.0, 0
            epoch_t0 = t2
        _maybe_fail(cfg, job, state.step, rank, world)
        stop = cfg.stop_at_step > 0 and state.step >= cfg.stop_at_step
        if epoch_done or state.step % cfg.checkpoint_every == 0 or state.step >= total or stop:
            if mlog is not None:
                mlog.flush()
            _report(cfg, job, runner, state, metrics, rank)
        if stop and state.step < total:
            _log(f"rank {rank}: stopping after step {state.step} (stop_at_step)")
            break
    if mlog is not None:
        mlog.flush()
    del it


def _maybe_fail(cfg: DistillConfig, job: dict[str, Any], step: int, rank: int, world: int) -> None:
    """Test hook: the last rank raises once at ``fail_at_step`` (a marker file makes it fire only once)."""
    if cfg.fail_at_step <= 0 or step != cfg.fail_at_step or rank != world - 1:
        return
    marker = Path(job["marker_dir"]) / f"fail_at_step_{step}.done"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("injected failure fired\n")
    raise RuntimeError(f"injected failure at step {step} on rank {rank} (fail_at_step test hook)")


def _report(
    cfg: DistillConfig,
    job: dict[str, Any],
    runner: StepRunner,
    state: TrainState,
    metrics: dict[str, Any],
    rank: int,
) -> None:
    """Every rank reports (a barrier); rank 0 attaches the training checkpoint."""
    import ray.train

    name = checkpoint_dir_name(state.step)
    if rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    state.optimizer = runner.opt.state_dict()
    state.scaler = runner.scaler.state_dict() if runner.scaler is not None else None
    state.rng = capture_rng()
    state.extra["mlflow_run_id"] = job["run_id"]
    state.extra["world_size"] = ray.train.get_context().get_world_size()
    with tempfile.TemporaryDirectory(prefix="spar-ckpt-") as tmp:
        save_training_checkpoint(
            runner.bb,
            tmp,
            state,
            trainable_blocks=cfg.trainable_blocks,
            config=job["resolved"],
            cache_fingerprint=job["cache_fingerprint"],
            seed=job["backbone_seed"],
        )
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
        )
    state.optimizer = None


# ------------------------------------------------------------------------------------------- driver


def _parse_random_seed(weights_id: str) -> int | None:
    """``random:<name>:seed<k>`` -> k."""
    if weights_id.startswith("random:") and ":seed" in weights_id:
        tail = weights_id.rsplit(":seed", 1)[1]
        if tail.isdigit():
            return int(tail)
    return None


def resolve_student(cfg: DistillConfig, cache: Any) -> tuple[str, str | None, int]:
    """(backbone name, pretrained or None, seed) of the student: by default the cache teacher's."""
    spec = cache.spec if cache is not None else None
    name = cfg.student or (spec.backbone if spec else "")
    if not name:
        raise DistillError(
            "distill: no student backbone (pass --student, or a --cache whose teacher is used)"
        )
    same = spec is not None and name == spec.backbone
    if cfg.pretrained == "auto":
        pretrained = spec.pretrained if same else None
    elif cfg.pretrained.lower() == "none":
        pretrained = None
    else:
        pretrained = cfg.pretrained
    seed = cfg.backbone_seed
    if seed < 0:
        seed = (_parse_random_seed(spec.weights_id) if same else None) or 0
    return name, pretrained, seed


def _abs(p: str) -> str:
    return p if "://" in p else os.path.abspath(p)


def _workdir_files(workdir: Path) -> Path:
    d = workdir / "distill"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _resolve_run_name(
    cfg: DistillConfig, workdir: Path, resume: bool, fingerprint: str
) -> tuple[str, str | None]:
    """(Ray Train run name, MLflow run id to continue or None)."""
    last = _workdir_files(workdir) / "last_run.json"
    if resume:
        prev = json.loads(last.read_text()) if last.exists() else {}
        name = cfg.run_name or prev.get("run_name", "")
        if not name:
            raise DistillError(
                f"--resume: no previous distill run recorded in {last}; pass --set run_name=NAME"
            )
        runs = prev.get("runs", {})
        return name, runs.get(name)
    if cfg.run_name:
        return cfg.run_name, None
    return f"distill-{fingerprint[:8]}-{time.strftime('%Y%m%d-%H%M%S')}", None


def _remember_run(workdir: Path, run_name: str, run_id: str) -> None:
    last = _workdir_files(workdir) / "last_run.json"
    prev = json.loads(last.read_text()) if last.exists() else {}
    runs = prev.get("runs", {})
    runs[run_name] = run_id
    tmp = last.with_suffix(".tmp")
    tmp.write_text(json.dumps({"run_name": run_name, "runs": runs}, indent=2))
    os.replace(tmp, last)


def _start_mlflow_run(
    cfg: DistillConfig,
    workdir: Path,
    run_name: str,
    prev_run_id: str | None,
    params: dict[str, Any],
    tags: dict[str, str],
    ims: Any,
    cache: Any,
) -> tuple[str, str, str]:
    """Create (or reopen, on resume) the MLflow run; log params, tags, dataset inputs. (uri, exp id, run id)."""
    from mlflow import MlflowClient

    from pipeline.common.tracking import flatten_params, setup_experiment, tracking_uri

    exp_id = setup_experiment(cfg.experiment, workdir)
    uri = tracking_uri(workdir)
    client = MlflowClient(uri)
    flat = flatten_params(params)
    if prev_run_id is not None:
        client.update_run(prev_run_id, status="RUNNING")
        run_id = prev_run_id
        old = client.get_run(run_id).data.params
        changed = {k: v for k, v in flat.items() if k in old and old[k] != v}
        flat = {k: v for k, v in flat.items() if k not in old}
        for k, v in changed.items():
            client.set_tag(run_id, f"resume.changed.{k}", v[:5000])
        client.set_tag(run_id, "resumed", "true")
    else:
        run_id = client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(flat.items())]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    if prev_run_id is None:
        _log_inputs(client, run_id, ims, cache)
    return uri, exp_id, run_id


def _log_inputs(client: Any, run_id: str, ims: Any, cache: Any) -> None:
    """The cache (training targets) and the image set as MLflow dataset inputs (lineage)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
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
        except Exception:
            from mlflow.data.http_dataset_source import HTTPDatasetSource

            source = HTTPDatasetSource(path)
        ds = MetaDataset(source=source, name=name, digest=fp[:36])
        tags = [InputTag("mlflow.data.context", context), InputTag("fingerprint", fp)]
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
    client.log_inputs(run_id, datasets=inputs)


def _loss_curve_png(client: Any, run_id: str, out: Path) -> Path | None:
    """Plot the per-step loss (last value per step) to ``out``."""
    hist = client.get_metric_history(run_id, "loss")
    if not hist:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_step = {}
    for m in sorted(hist, key=lambda m: m.timestamp):
        by_step[m.step] = m.value
    steps = sorted(by_step)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, [by_step[s] for s in steps], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("distillation loss (MSE)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _export_student(ckpt: Any, out: Path, lineage: dict[str, str] | None = None) -> Path:
    """Copy the student files of a Ray training checkpoint to ``out`` (a plain student checkpoint).

    ``lineage`` (run id, experiment id, tracking URI) is recorded beside them so evaluations nest under the run.
    """
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ckpt.as_directory() as d:
        try:
            verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE, CONFIG_FILE))
        except CheckpointError as e:
            raise DistillError(f"the final checkpoint cannot be exported: {e}") from None
        for f in (STUDENT_FILE, BACKBONE_FILE, CONFIG_FILE):
            shutil.copy2(Path(d) / f, tmp / f)
    if lineage:
        from pipeline.common.tracking import write_run_lineage

        write_run_lineage(tmp, lineage["run_id"], lineage["experiment_id"], lineage["tracking_uri"])
    write_checksums(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def teacher_window(cfg: DistillConfig, spec: Any, native_size: int) -> tuple[int, int]:
    """(crop, stride) of the teacher: the config's, else the cache spec's, else the backbone's native size and
    the paper's 24 px stride (the online teacher without a cache)."""
    crop = cfg.crop or (spec.crop if spec is not None else native_size)
    stride = cfg.stride or (spec.stride if spec is not None else default_stride(crop))
    return crop, stride


def _log_image(client: Any, run_id: str, png: Path, key: str) -> None:
    """A PNG as an MLflow image of the run (shown in the UI's image view, not only as a file)."""
    from PIL import Image

    with Image.open(png) as im:
        client.log_image(run_id, im.convert("RGB"), key=key, step=0)


def _log_student_model(
    cfg: DistillConfig, client: Any, uri: str, run_id: str, student_dir: str, dim: int
) -> None:
    """The student as an MLflow pyfunc model (checkpoint files as artifacts), registered as cfg.register_model."""
    import mlflow

    from pipeline.train.mlflow_model import log_student_model

    tags = client.get_run(run_id).data.tags
    lineage = {
        "cache_fingerprint": tags.get("cache_fingerprint", ""),
        "imageset_fingerprint": tags.get("imageset_fingerprint", ""),
        "teacher_weights_id": tags.get("teacher_weights_id", ""),
        "git_commit": tags.get("git_commit", ""),
        "dim": dim,
    }
    mlflow.set_tracking_uri(uri)
    from pipeline.common.tasks import verbose

    chatter = contextlib.nullcontext() if verbose() else contextlib.redirect_stderr(io.StringIO())
    with warnings.catch_warnings(), chatter:  # MLflow prints "Successfully registered model ..." to stderr
        warnings.simplefilter("ignore")  # MLflow's notes on pip requirements and model-from-code
        info = log_student_model(run_id, student_dir, cfg.register_model, lineage)
    if cfg.register_model and info.registered_model_version is not None:
        client.set_tag(
            run_id, "registered_model", f"models:/{cfg.register_model}/{info.registered_model_version}"
        )


def _prepare(cfg: DistillConfig) -> dict[str, Any]:
    """Open and check the inputs before anything starts; returns what the driver and workers need."""
    from pipeline.data.imageset import open_imageset
    from spar_core.backbones import build_backbone

    if not cfg.images:
        raise DistillError("distill: --images is required")
    if not cfg.cache and not cfg.teacher_online:
        raise DistillError(
            "distill: --cache is required (or --teacher-online to compute the teacher in the loop)"
        )
    ims = open_imageset(cfg.images)
    cache = None
    if cfg.cache:
        from pipeline.cache.store import open_cache

        cache = open_cache(cfg.cache)
        if not cfg.teacher_online:
            cache.check_pairing(ims)  # raises CachePairingError before any step
    name, pretrained, bseed = resolve_student(cfg, cache)
    bb = build_backbone(name, pretrained, seed=bseed)
    if cfg.trainable_blocks != "all" and cfg.trainable_blocks > bb.num_blocks:
        raise DistillError(
            f"distill: trainable_blocks={cfg.trainable_blocks} but {name} has {bb.num_blocks} blocks"
        )
    if cache is not None and not cfg.teacher_online:
        if cache.dim and cache.dim != bb.dim:
            raise DistillError(
                f"distill: student {name} has feature dim {bb.dim}, the cache holds {cache.dim}"
            )
        if cache.patch_size and cache.patch_size != bb.patch_size:
            raise DistillError(
                f"distill: student {name} has patch size {bb.patch_size}, the cache {cache.patch_size}"
            )
        if bb.weights_id != cache.spec.weights_id:
            _log(
                f"warning: the student starts from {bb.weights_id}, the cache teacher was {cache.spec.weights_id}"
            )
    crop, stride = teacher_window(cfg, cache.spec if cache is not None else None, bb.native_size)
    if cfg.teacher_online and crop % bb.patch_size:
        raise DistillError(f"distill: crop {crop} is not a multiple of the patch size {bb.patch_size}")
    return {
        "ims": ims,
        "cache": cache,
        "student": name,
        "pretrained": pretrained,
        "backbone_seed": bseed,
        "weights_id": bb.weights_id,
        "patch_size": bb.patch_size,
        "dim": bb.dim,
        "crop": crop,
        "stride": stride,
    }


def _check_resume_backbone(run_dir: Path, prep: dict[str, Any]) -> None:
    """Refuse to resume a run whose checkpoints hold another backbone's (or other base weights') student."""
    import json

    if not run_dir.is_dir():  # remote storage or nothing saved yet: the workers' restore checks shapes
        return
    for ckpt in sorted(run_dir.glob("checkpoint_step*"), reverse=True):
        try:
            meta = json.loads((ckpt / "backbone.json").read_text())
        except (OSError, ValueError):
            continue  # unusable checkpoints are reported and skipped by the restore
        if meta.get("name") != prep["student"] or meta.get("weights_id") != prep["weights_id"]:
            raise DistillError(
                f"distill --resume: run {run_dir.name} trains a {meta.get('name')} student from "
                f"{meta.get('weights_id')} (checkpoint {ckpt.name}), not {prep['student']} from "
                f"{prep['weights_id']}; resume with the same student or start a new run"
            )
        return


def distill(cfg: DistillConfig, resume: bool = False) -> DistillResult:
    """Train the single-pass student (see the module docstring). Raises DistillError / CachePairingError."""
    from mlflow import MlflowClient

    from pipeline.common.tasks import cluster_gpus, init_ray, verbose
    from pipeline.common.tracking import git_commit, mlflow_ui_command
    from pipeline.data.stream import Planner, refs_from_imageset

    prep = _prepare(cfg)
    ims, cache = prep["ims"], prep["cache"]
    workdir = Path(cfg.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    planner = Planner(
        refs_from_imageset(ims),
        seed=cfg.seed,
        world_size=cfg.workers,
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
    )
    total = cfg.max_steps if cfg.max_steps > 0 else planner.total_steps(cfg.epochs)
    lineage_fp = cache.fingerprint if cache is not None else ims.fingerprint
    run_name, prev_run_id = _resolve_run_name(cfg, workdir, resume, lineage_fp)
    storage = cfg.storage_path or str(workdir / "ray_results")
    if resume:
        _check_resume_backbone(Path(storage) / run_name, prep)

    init_ray(cfg.ray_address or None)
    gpus = cfg.gpus_per_worker if cfg.gpus_per_worker >= 0 else (1.0 if cluster_gpus() > 0 else 0.0)

    resolved = asdict(cfg)
    resolved.update(images=_abs(cfg.images), cache=_abs(cfg.cache) if cfg.cache else "", storage_path=storage)
    # one name per parameter, holding the value used (no `x` next to `x_resolved`)
    effective = {
        **resolved,
        "student": prep["student"],
        "pretrained": prep["pretrained"] or "none",
        "backbone_seed": prep["backbone_seed"],
        "crop": prep["crop"],
        "stride": prep["stride"],
        "gpus_per_worker": gpus,
        "run_name": run_name,
    }
    derived = {"total_steps": total, "steps_per_epoch": planner.steps(0)}
    params = {**effective, **derived}
    tags = {
        "spar.stage": "distill",
        "cache_fingerprint": cache.fingerprint if cache is not None else "",
        "imageset_fingerprint": ims.fingerprint,
        "git_commit": git_commit(),
        "backbone": prep["student"],
        "weights_id": prep["weights_id"],
        "teacher_weights_id": cache.spec.weights_id if cache is not None else prep["weights_id"],
        "teacher_online": str(cfg.teacher_online).lower(),
        "ray_run_name": run_name,
    }
    uri, exp_id, run_id = _start_mlflow_run(cfg, workdir, run_name, prev_run_id, params, tags, ims, cache)
    _remember_run(workdir, run_name, run_id)
    client = MlflowClient(uri)
    from pipeline.common.config import save_resolved

    resolved_path = save_resolved(
        cfg, workdir / "distill" / run_name / "resolved_config.json", extra={"effective": params}
    )
    client.log_artifact(run_id, str(resolved_path))

    job = {
        "cfg": resolved,
        "resolved": {"config": effective, **derived},
        "run_id": run_id,
        "tracking_uri": uri,
        "total_steps": total,
        "student": prep["student"],
        "pretrained": prep["pretrained"],
        "backbone_seed": prep["backbone_seed"],
        "patch_size": prep["patch_size"],
        "crop": prep["crop"],
        "stride": prep["stride"],
        "cache_fingerprint": cache.fingerprint if cache is not None else None,
        "marker_dir": str(workdir / "distill" / run_name),
    }
    if verbose():
        _log(f"run {run_name}: {total} steps on {cfg.workers} worker(s), MLflow run {run_id}")
    try:
        with _progress_bar(job, total):
            result = _fit(cfg, job, run_name, storage, gpus)
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        raise DistillError(
            f"distill run {run_name} failed: {e}. Finished checkpoints are kept under {storage}/{run_name}; "
            f"fix the cause and re-run with --resume"
        ) from e
    return _finish(
        cfg,
        workdir,
        client,
        uri,
        exp_id,
        run_id,
        run_name,
        total,
        result,
        mlflow_ui_command(workdir),
        prep["dim"],
    )


PROGRESS_NAMESPACE = "spar"


def _progress_actor(name: str | None) -> Any:
    """Rank 0's handle on the driver's progress actor (None when there is none)."""
    if not name:
        return None
    import ray

    try:
        return ray.get_actor(name, namespace=PROGRESS_NAMESPACE)
    except ValueError:
        return None


@contextlib.contextmanager
def _progress_bar(job: dict[str, Any], total: int, poll_s: float = 0.5) -> Iterator[None]:
    """A tqdm bar of distill steps (loss, images/s, ETA) fed by rank 0 through a small actor.

    Ray Train workers run in other processes; an actor survives worker restarts and costs one small message per
    step. The bar starts at the first reported step (a resumed run starts where it left off).
    """
    import threading

    import ray
    from tqdm import tqdm

    from pipeline.common.tasks import LatestValue

    # a named actor (workers look it up by name: a handle inside train_loop_config does not reach them intact),
    # defined in a light module so that it starts fast
    name = f"spar-progress-{job['run_id']}-{os.getpid()}"
    actor = ray.remote(num_cpus=0)(LatestValue).options(name=name, namespace=PROGRESS_NAMESPACE).remote()
    job["progress"] = name
    stop = threading.Event()
    state: dict[str, Any] = {"bar": None}

    def show(latest: tuple[int, float, float] | None) -> None:
        if latest is None:
            return
        step, loss, ips = latest
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(
                total=total, initial=step, unit="step", desc="distill", file=sys.stderr, dynamic_ncols=True
            )
        bar.update(step - bar.n)
        bar.set_postfix_str(f"loss {loss:.4g}, {ips:.1f} img/s", refresh=False)

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                show(ray.get(actor.get.remote(), timeout=10))
            except Exception:  # noqa: BLE001 - the bar is cosmetic; training goes on
                continue

    thread = threading.Thread(target=poll, name="spar-distill-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        try:
            show(ray.get(actor.get.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            pass
        if state["bar"] is not None:
            state["bar"].close()
        job.pop("progress", None)
        ray.kill(actor)


def _fit(cfg: DistillConfig, job: dict[str, Any], run_name: str, storage: str, gpus: float) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.common.tasks import train_log_level

    resources: dict[str, float] = {"CPU": float(cfg.cpus_per_worker)}
    if gpus > 0:
        resources["GPU"] = gpus
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(
            num_workers=cfg.workers, use_gpu=gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level=train_log_level()),  # Ray's chatter only with --verbose
        ),
        torch_config=TorchConfig(backend="nccl" if gpus > 0 else "gloo"),
    )
    return trainer.fit()


def _finish(
    cfg: DistillConfig,
    workdir: Path,
    client: Any,
    uri: str,
    exp_id: str,
    run_id: str,
    run_name: str,
    total: int,
    result: Any,
    ui_cmd: str,
    dim: int = -1,
) -> DistillResult:
    metrics = result.metrics or {}
    steps = int(metrics.get("step", 0))
    ckpt = result.checkpoint
    export = ""
    lineage = {"run_id": run_id, "experiment_id": exp_id, "tracking_uri": uri}
    if ckpt is not None:
        student_dir = _export_student(ckpt, workdir / "students" / run_name, lineage)
        export = str(student_dir)
        if steps == 0:
            steps = int(step_of(posixpath.basename(ckpt.path.rstrip("/"))) or 0)
    png = _loss_curve_png(client, run_id, workdir / "distill" / run_name / "loss_curve.png")
    if png is not None:
        client.log_artifact(run_id, str(png))
        _log_image(client, run_id, png, "loss_curve")
    final_loss = metrics.get("loss")
    completed = steps >= total
    if export and completed:
        _log_student_model(cfg, client, uri, run_id, export, dim)
    elif export:  # an unfinished student: its files, not a model
        client.log_artifacts(run_id, export, artifact_path="student")
    client.log_metric(run_id, "steps_done", steps)
    client.set_terminated(run_id, status="FINISHED" if completed else "KILLED")
    print(f"distill run {run_name}: {steps}/{total} steps, final loss {final_loss}")
    if export:
        print(f"student checkpoint: {export}")
    if not completed:
        print(f"stopped before the last step; continue with: spar distill ... --resume (run {run_name})")
    print(f"MLflow run id: {run_id}")
    print(f"view it with: {ui_cmd}")
    return DistillResult(
        run_id=run_id,
        run_name=run_name,
        checkpoint_dir=export,
        ray_checkpoint=ckpt.path if ckpt is not None else "",
        steps=steps,
        total_steps=total,
        final_loss=float(final_loss) if final_loss is not None else None,
        tracking_uri=uri,
        experiment_id=exp_id,
        completed=completed,
    )


# ---------------------------------------------------------------------------------------------- CLI


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    """DistillConfig from ``spar distill`` arguments: defaults <- recipe [distill] <- --set <- explicit flags."""
    from pipeline.common.config import apply_overrides, load_config

    cfg = load_config(DistillConfig, args.config, args.set or (), section="distill")
    flags: dict[str, Any] = {}
    for key in ("images", "cache", "student", "pretrained", "workers", "gpus_per_worker", "workdir"):
        v = getattr(args, key)
        if v is not None:
            flags[key] = v
    if args.teacher_online:
        flags["teacher_online"] = True
    return apply_overrides(cfg, flags) if flags else cfg


def _cmd_distill(args: argparse.Namespace) -> int:
    distill(config_from_args(args), resume=args.resume)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``spar distill``."""
    p = subparsers.add_parser(
        "distill",
        help="train the single-pass student on cached teacher features (Ray Train + MLflow)",
        description="Distil the sliding-window teacher (cached) into the single-pass student with Ray Train.",
    )
    p.add_argument("--images", help="image-set root (from spar ingest)")
    p.add_argument("--cache", help="teacher cache path <cache_root>/<fingerprint> (from spar precompute)")
    p.add_argument("--student", help="student backbone (default: the cache's teacher)")
    p.add_argument(
        "--pretrained", help="student weights: auto (the teacher's), none, an open_clip tag or a file"
    )
    p.add_argument("--config", help="TOML recipe with a [distill] section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument(
        "--gpus-per-worker", dest="gpus_per_worker", type=float, help="GPUs per worker (default auto)"
    )
    p.add_argument("--workdir", help="MLflow store, Ray results and exported students (default ./work)")
    p.add_argument("--resume", action="store_true", help="continue the last run of the workdir (or run_name)")
    p.add_argument("--teacher-online", action="store_true", help="compute the teacher in the loop (no cache)")
    p.set_defaults(func=_cmd_distill)
