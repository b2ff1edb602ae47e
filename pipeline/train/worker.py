"""One rank's training loop (:func:`train_rank`), run by every Ray Train worker (:func:`train_worker`) or, for a
one-worker run, in the command's own process (:mod:`pipeline.train.in_process`): build the student, resume from the
newest good checkpoint, stream this rank's image + target batches, step, report.

Every rank streams its own shard pairs (:mod:`pipeline.train.stream`) at the exact data position of the checkpoint,
trains with :class:`~pipeline.train.step.StepRunner` (DDP all-reduces the gradients), and reports every
``checkpoint_every`` steps and at every epoch end; rank 0 attaches the training checkpoint
(:mod:`pipeline.train.state`, :mod:`pipeline.train.run_dir`), logs per-step metrics to the run
(:class:`~pipeline.common.tracking_queue.QueuedRunLog`) and feeds the driver's progress bar.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipeline.common.trace import mark
from pipeline.common.tracking import system_metrics, tracking_wait_s
from pipeline.common.tracking_queue import QueuedRunLog
from pipeline.data.imageset import open_imageset
from pipeline.student.format import StudentMeta
from pipeline.train.plan import DistillPlan, RunLink
from pipeline.train.progress import log, progress_actor
from pipeline.train.run_dir import ray_checkpoint, restore_latest_good
from pipeline.train.state import (
    TrainState,
    capture_rng,
    checkpoint_dir_name,
    restore_rng,
    save_training_checkpoint,
)
from pipeline.train.step import StepRunner
from pipeline.train.stream import PairedStream, make_loader
from spar_core.backbones import Backbone, build_backbone
from spar_core.distill import trainable_parameters

if TYPE_CHECKING:
    from ray.train import Checkpoint

__all__ = ["Rank", "train_rank", "train_worker"]


@dataclass(frozen=True)
class Rank:
    """What one rank gets from whoever runs it: Ray Train's worker group (:func:`train_worker`) or the command's own
    process (:mod:`pipeline.train.in_process`)."""

    rank: int
    world: int
    device: torch.device
    checkpoint: Checkpoint | None  # the run directory's latest checkpoint to resume from (None: none yet)
    # (metrics, local folder holding the training checkpoint or None, its directory name): a barrier of the ranks
    report: Callable[[dict[str, Any], str | None, str | None], None]
    progress: Callable[[tuple[int, float, float]], None] | None  # (step, loss, images/s) to the driver's bar


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` = ``{"plan": DistillPlan, "link": RunLink, "start": str}``
    (``start``: the checkpoint a run continued in a new Ray Train directory starts from, "" for none)."""
    link: RunLink = config["link"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    actor = progress_actor(link.progress_actor) if rank == 0 else None
    me = Rank(rank, ctx.get_world_size(), ray.train.torch.get_device(), ray.train.get_checkpoint(), _ray_report,
              (lambda v: actor.put.remote(v)) if actor is not None else None)  # fmt: skip
    train_rank(config["plan"], link, config.get("start", ""), me)


def _ray_report(metrics: dict[str, Any], folder: str | None, name: str | None) -> None:
    """``ray.train.report``: Ray Train copies ``folder`` into the run directory as ``name``."""
    ckpt = ray.train.Checkpoint.from_directory(folder) if folder is not None else None
    ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)


def train_rank(plan: DistillPlan, link: RunLink, start: str, me: Rank) -> None:
    """One rank's run: build (or restore) the student, step to the end of the plan, report."""
    mark("worker_start")
    torch.set_num_threads(plan.cpus_per_worker)
    torch.manual_seed(plan.seed)
    runner, state = _build(plan, me, start)
    mark("model_ready")
    if state.step >= plan.total_steps:
        log(f"rank {me.rank}: nothing to do, already at step {state.step} of {plan.total_steps}")
        me.report({"step": state.step, "epoch": state.epoch, "done": 1}, None, None)
        return
    # rank 0's metrics, queued: a step never waits on the tracking server (MLflow is imported by rank 0 only)
    mlog = QueuedRunLog(link.tracking_uri, link.run_id) if me.rank == 0 else None
    if mlog is not None:  # where and how the steps really ran (a GPU check reads these back)
        amp = runner.autocast_dtype
        mlog.add_tags({
            "worker_device": str(me.device),
            "autocast_dtype": str(amp).removeprefix("torch.") if amp is not None else "none",
            "grad_scaler": str(runner.scaler is not None).lower(),
        })  # fmt: skip
    loop = _Loop(plan, link, runner, state, me, mlog)
    if mlog is None:
        loop.run()
        return
    try:
        with system_metrics(link.run_id, link.tracking_uri):  # on rank 0's node: its CPUs, memory, GPUs
            loop.run()
    finally:
        mlog.close(tracking_wait_s())  # delivered (bounded wait), or kept in a named local file


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for "do not broadcast buffers before each forward" (the backbones' buffers are constants):
    ``forward_sync_buffers`` in newer torch (which deprecates the old name), ``broadcast_buffers`` before it."""
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}


def _student(plan: DistillPlan, device: torch.device) -> Backbone:
    return build_backbone(plan.student, plan.base_weights, device=device, seed=plan.backbone_seed)


def _build(plan: DistillPlan, me: Rank, start: str) -> tuple[StepRunner, TrainState]:
    """The student (restored from the newest good checkpoint, if any: Ray's latest of this run directory, else
    ``start``), its DDP wrapper and the step runner."""
    device, rank, world = me.device, me.rank, me.world
    bb = _student(plan, device)
    params = trainable_parameters(bb, plan.trainable_blocks)
    state = TrainState(extra={"epoch_loss_sum": 0.0, "epoch_steps": 0})
    first = ray_checkpoint(start) if start else None  # a local path or URL
    restored = restore_latest_good(me.checkpoint, then=first) if me.checkpoint or first else None
    if restored is not None:
        state, weights, where = restored
        bb.load_trainable_state_dict({k: v.to(device) for k, v in weights.items()})
        log(f"rank {rank}: resumed from {where} at step {state.step} (epoch {state.epoch}, "
             f"batch {state.batch_in_epoch})")  # fmt: skip
        saved_world = state.extra.get("world_size")
        if saved_world not in (None, world):
            log(
                f"warning: the checkpoint was written by {saved_world} workers, this run has {world}: the data "
                "order changes from here on (samples may repeat or be skipped in the current epoch)"
            )
    model: torch.nn.Module = bb
    if world > 1:
        model = ray.train.torch.prepare_model(bb, parallel_strategy_kwargs=_no_buffer_sync())
    teacher = _student(plan, device) if plan.teacher_online else None
    runner = StepRunner(bb, model, params, plan, device, plan.total_steps, teacher=teacher, crop=plan.crop,
                        stride=plan.stride)  # fmt: skip
    if restored is not None:
        if state.optimizer is not None:
            runner.opt.load_state_dict(state.optimizer)
        if runner.scaler is not None and state.scaler:
            runner.scaler.load_state_dict(state.scaler)
        restore_rng(state.rng)
    return runner, state


@dataclass
class _Loop:
    """The steps of one rank from its state to the end of the run (or ``stop_at_step``)."""

    plan: DistillPlan
    link: RunLink
    runner: StepRunner
    state: TrainState
    me: Rank
    mlog: QueuedRunLog | None  # rank 0's run log (None on the other ranks)

    def __post_init__(self) -> None:
        plan, state, me = self.plan, self.state, self.me
        self.stream = PairedStream(  # this rank's batches from the state's data position on
            plan.images,
            None if plan.teacher_online else plan.cache,
            seed=plan.seed,
            rank=me.rank,
            world_size=me.world,
            patch_size=plan.patch_size,
            batch_size=plan.batch_size,
            shuffle_buffer=plan.shuffle_buffer,
            start_epoch=state.epoch,
            start_batch=state.batch_in_epoch,
            num_batches=plan.total_steps - state.step,
            verify=plan.verify_pixels,
        )
        self.planner = self.stream.planner(open_imageset(plan.images))

    def run(self) -> None:
        plan, state = self.plan, self.state
        it = iter(make_loader(self.stream, plan.loader_workers))
        epoch_t0 = t_prev = time.perf_counter()
        while state.step < plan.total_steps:
            t0 = time.perf_counter()
            item = next(it)
            t1 = time.perf_counter()
            if (item["epoch"], item["batch"]) != (state.epoch, state.batch_in_epoch):
                raise RuntimeError(
                    f"stream out of step: got batch {item['batch']} of epoch {item['epoch']}, expected "
                    f"{state.batch_in_epoch} of {state.epoch}"
                )
            loss, lr = self._step(item)
            mark("first_step", once=True)
            t2 = time.perf_counter()
            ended_epoch = state.epoch
            state.epoch, state.batch_in_epoch = self.planner.advance(item["epoch"], item["batch"])
            self._record(item, loss, lr, t1 - t0, t2 - t_prev)
            t_prev = t2
            metrics: dict[str, Any] = {"step": state.step, "epoch": ended_epoch, "loss": loss}
            epoch_done = state.epoch != ended_epoch
            if epoch_done:
                metrics["epoch_loss"] = self._end_epoch(ended_epoch, t2 - epoch_t0)
                epoch_t0 = t2
            stop = plan.stop_at_step > 0 and state.step >= plan.stop_at_step
            if (
                epoch_done
                or state.step % plan.checkpoint_every == 0
                or state.step >= plan.total_steps
                or stop
            ):
                self._report(metrics)
            if stop and state.step < plan.total_steps:
                log(f"rank {self.me.rank}: stopping after step {state.step} (stop_at_step)")
                break
        mark("train_end")

    def _step(self, item: dict[str, Any]) -> tuple[float, float]:
        """One optimizer step; returns (loss averaged over the ranks, lr)."""
        loss, lr = self.runner.step(item, self.state.step)
        if self.me.world > 1:
            dist.all_reduce(loss)
            loss = loss / self.me.world
        self.state.step += 1
        return float(loss), lr

    def _record(self, item: dict[str, Any], loss: float, lr: float, wait_s: float, step_s: float) -> None:
        """The step's loss into the epoch sums, the progress bar and (rank 0) the run's metrics."""
        extra = self.state.extra
        extra["epoch_loss_sum"] = extra.get("epoch_loss_sum", 0.0) + loss
        extra["epoch_steps"] = extra.get("epoch_steps", 0) + 1
        images_per_s = len(item["keys"]) * self.me.world / max(step_s, 1e-9)
        if self.me.progress is not None:  # fire and forget: the driver's progress bar reads it
            self.me.progress((self.state.step, loss, images_per_s))
        if self.mlog is None:
            return
        scaler = self.runner.scaler
        self.mlog.add_metrics(
            {
                "loss": loss,
                "lr": lr,
                "images_per_s": images_per_s,
                "data_wait_frac": wait_s / max(step_s, 1e-9),
                "step_time_s": step_s,
                **({"grad_scale": scaler.get_scale()} if scaler is not None else {}),
            },
            self.state.step,
        )

    def _end_epoch(self, epoch: int, seconds: float) -> float:
        """The epoch's mean loss (logged by rank 0); resets the sums."""
        extra = self.state.extra
        mean = extra["epoch_loss_sum"] / max(1, extra["epoch_steps"])
        if self.mlog is not None:
            self.mlog.add_metrics({"epoch_loss": mean, "epoch_time_s": seconds}, epoch)
        extra["epoch_loss_sum"], extra["epoch_steps"] = 0.0, 0
        return mean

    def _report(self, metrics: dict[str, Any]) -> None:
        """Every rank reports (a barrier); rank 0 attaches the training checkpoint."""
        state, name = self.state, checkpoint_dir_name(self.state.step)
        if self.me.rank != 0:
            self.me.report(metrics, None, name)
            return
        runner = self.runner
        state.optimizer = runner.opt.state_dict()
        state.scaler = runner.scaler.state_dict() if runner.scaler is not None else None
        state.rng = capture_rng()
        state.extra["mlflow_run_id"] = self.link.run_id
        state.extra["world_size"] = self.me.world
        with tempfile.TemporaryDirectory(prefix="spar-ckpt-") as tmp:
            p = self.plan
            meta = StudentMeta(
                p.trainable_blocks, p.checkpoint_config(), p.cache_fingerprint or None, p.backbone_seed
            )
            save_training_checkpoint(runner.bb, tmp, state, meta)
            self.me.report(metrics, tmp, name)
        state.optimizer = None
