"""The GPU check's ``pipeline`` section: the whole run through :func:`pipeline.workflow.orchestrator.run_pipeline`
on real photos, each stage's time, and where it really ran (the precompute tasks' devices and teacher builds, the
distill worker's device, autocast dtype and gradient scaler as recorded in MLflow)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any
from unittest import mock

import ray
import torch
from mlflow import MlflowClient

from pipeline.bench.gpu.harness import Context, Deadline, PipelinePlan, check, headline, say
from pipeline.cache.precompute import PrecomputeConfig
from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, offline_photos, write_photos
from pipeline.common.tasks import init_ray, shutdown_ray
from pipeline.data.config import IngestConfig
from pipeline.eval.config import EvalConfig, SegmentConfig
from pipeline.train.config import DistillConfig
from pipeline.workflow.config import DemoConfig, Recipe, RunConfig
from pipeline.workflow.orchestrator import Extras, PipelineResult, Reporter, run_pipeline

STAGES = ("ingest", "precompute", "distill", "eval", "segment")


def section_pipeline(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """ingest -> precompute -> distill (each precision) -> fidelity eval -> segment, through run_pipeline."""
    pp = ctx.plan.pipeline
    work = ctx.workdir / "pipeline"
    res["plan"] = dataclasses.asdict(pp)
    res["stages"] = {}
    _ray_and_photos(ctx, res, pp, work)
    base = _recipe(pp, work)
    res["runs"] = []
    for i, prec in enumerate(pp.precisions):
        if i > 0 and _out_of_time(res, dl, prec):
            continue
        say(f"pipeline: run {i + 1}/{len(pp.precisions)}: distill precision {prec}")
        _run_once(ctx, res, base, prec, first=i == 0)
    check(
        res,
        "every stage reported a time",
        all(all(k in r["seconds"] for k in STAGES) for r in res["runs"]) and bool(res["runs"]),
    )


def _ray_and_photos(ctx: Context, res: dict[str, Any], pp: PipelinePlan, work: Path) -> None:
    """Start Ray with the device's GPUs and write the training and held-out photos (offline ones only)."""
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    t = time.perf_counter()
    _start_ray(res, gpus)
    res["ray"] = {"version": ray.__version__, "resources": dict(ray.cluster_resources())}
    res["stages"]["ray_start"] = time.perf_counter() - t
    check(res, "ray sees the GPUs", float(ray.cluster_resources().get("GPU", 0)) == gpus, f"{gpus} expected")
    with _no_network():
        n_train = write_photos(work / "raw" / "train", offline_photos(TRAIN_PHOTOS)[: pp.train_photos])
        n_held = write_photos(work / "raw" / "heldout", offline_photos(HELDOUT_PHOTOS)[: pp.heldout_photos])
    res["photos"] = {"train": n_train, "heldout": n_held}
    ctx.save()


def _recipe(pp: PipelinePlan, work: Path) -> Recipe:
    """The run's recipe at the plan's sizes (distill precision set per run)."""
    return Recipe(
        run=RunConfig(
            workdir=str(work),
            experiment="spar-gpu-check",
            source=str(work / "raw" / "train"),
            heldout_source=str(work / "raw" / "heldout"),
        ),
        ingest=IngestConfig(
            seed=0,
            shard_size=pp.shard_size,
            target_long=pp.target_long,
            target_short=pp.target_short,
            min_short=pp.min_short,
            max_side=pp.max_side,
        ),
        precompute=PrecomputeConfig(
            teacher=pp.backbone,
            crop=pp.crop,
            stride=24,
            window_batch=pp.window_batch,
            autocast="bf16",
            cpus_per_task=pp.cpus_per_task,
            gpus_per_task=1.0,
            progress=False,
        ),
        distill=DistillConfig(
            trainable_blocks=2,
            lr=pp.lr,
            max_steps=pp.steps,
            epochs=1000,
            warmup_steps=min(5, pp.steps // 4),
            checkpoint_every=pp.steps,
            workers=1,
            cpus_per_worker=pp.cpus_per_task,
            loader_workers=pp.loader_workers,
            shuffle_buffer=8,
            log_every=5,
        ),
        eval=EvalConfig(fidelity=True, precision=pp.eval_precision, classes=DemoConfig.classes),
    )


def _out_of_time(res: dict[str, Any], dl: Deadline, prec: str) -> bool:
    """Whether a later run (which reuses the image sets and caches: about distill + eval + segment) is skipped."""
    prev = res["runs"][-1]["seconds"] if res["runs"] else {}
    need = sum(prev.get(k, 0.0) for k in ("distill", "eval", "segment"))
    if dl.left() >= 0.6 * need:
        return False
    res.setdefault("skipped", []).append(
        f"distill {prec}: out of time ({dl.left():.0f} s left, ~{need:.0f} s needed)"
    )
    return True


def _run_once(ctx: Context, res: dict[str, Any], base: Recipe, prec: str, first: bool) -> None:
    """One run_pipeline with distill precision ``prec``, and the evidence of where each stage ran."""
    pp = ctx.plan.pipeline
    work = Path(base.run.workdir)
    recipe = dataclasses.replace(base, distill=dataclasses.replace(base.distill, precision=prec))
    stats: list[dict[str, Any]] = []
    seg = SegmentConfig(
        classes=DemoConfig.classes,
        out=str(work / f"segment-{prec}"),
        short_side=pp.segment_short_side,
        precision=pp.eval_precision,
    )
    t = time.perf_counter()
    out = run_pipeline(recipe, Extras(segment=seg, precompute_stats=stats), Reporter("gpu-check"))
    run = {"precision": prec, "seconds": out.seconds, "total_seconds": time.perf_counter() - t}
    res["runs"].append(run)
    _precompute_evidence(ctx, res, run, stats, first=first)
    _distill_evidence(ctx, res, run, out, prec)
    _fidelity_evidence(res, run, out, prec)
    ctx.save()
    photos = sorted(str(f) for f in (work / "raw" / "heldout").glob("*.png"))
    run["segment"] = [
        {"image": Path(str(r["image"])).name, "classes_present": r["classes_present"]} for r in out.segments
    ]
    check(res, f"segment {prec}: one label map per photo", len(out.segments) == len(photos) > 0)
    headline(
        res, f"pipeline distill {prec}: " + ", ".join(f"{k} {v:.1f} s" for k, v in run["seconds"].items())
    )
    ctx.save()


def _start_ray(res: dict[str, Any], gpus: int, tries: int = 2) -> None:
    """A local Ray cluster with this machine's CPUs and ``gpus`` GPUs (or the cluster at RAY_ADDRESS); a node
    that times out at start-up (an overloaded machine) is retried once."""
    for attempt in range(1, tries + 1):
        try:
            if os.environ.get("RAY_ADDRESS"):  # an existing cluster brings its own resources
                init_ray()
            else:
                init_ray(num_cpus=os.cpu_count(), num_gpus=gpus)
            return
        except Exception as e:  # noqa: BLE001 - retried once, then raised
            res.setdefault("ray_start_failures", []).append(f"{type(e).__name__}: {e}")
            shutdown_ray()
            if attempt == tries:
                raise


def _no_network() -> contextlib.AbstractContextManager:
    """Make any download attempt fail at once (a closed local proxy port) instead of waiting on a timeout."""
    keys = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    return mock.patch.dict(os.environ, dict.fromkeys(keys, "http://127.0.0.1:9"))


def _fidelity_evidence(res: dict[str, Any], run: dict[str, Any], out: PipelineResult, prec: str) -> None:
    """The eval's feature fidelity: the student must be closer to the teacher than the single pass."""
    ev = out.eval or {}
    run["fidelity"] = {k: ev.get(k) for k in ("images", "baseline", "student")}
    b, s = ev.get("baseline") or {}, ev.get("student") or {}
    check(
        res,
        f"fidelity {prec}: student closer to the teacher than the single pass",
        s.get("mse", math.inf) < b.get("mse", -math.inf),
        f"MSE student {s.get('mse')} vs baseline {b.get('mse')}",
    )


def _precompute_evidence(
    ctx: Context, res: dict[str, Any], run: dict[str, Any], stats: list[dict[str, Any]], first: bool
) -> None:
    """Where the precompute tasks ran and whether each worker process built the teacher only once."""
    computed = [s for s in stats if s.get("status") != "already-complete"]
    pids = sorted({s["pid"] for s in stats if "pid" in s})
    builds = {pid: max(s.get("teacher_builds", 0) for s in stats if s.get("pid") == pid) for pid in pids}
    run["precompute_tasks"] = {
        "tasks": len(stats),
        "computed": len(computed),
        "devices": sorted({s.get("device", "?") for s in computed}),
        "worker_pids": len(pids),
        "teacher_builds_per_worker": list(builds.values()),
        "windows": sum(int(s.get("windows", 0)) for s in stats),
        "task_seconds": sum(float(s.get("seconds", 0.0)) for s in stats),
    }
    if not first:
        return
    want = "cuda" if ctx.device.startswith("cuda") else "cpu"
    check(
        res,
        f"precompute tasks ran on {want}",
        bool(computed) and all(s.get("device", "").startswith(want) for s in computed),
        str(run["precompute_tasks"]["devices"]),
    )
    check(
        res,
        "teacher built once per worker and reused across tasks",
        bool(builds) and all(v == 1 for v in builds.values()) and len(stats) > len(pids),
        f"{len(stats)} tasks on {len(pids)} worker(s), builds {list(builds.values())}",
    )


def _distill_evidence(
    ctx: Context, res: dict[str, Any], run: dict[str, Any], out: PipelineResult, prec: str
) -> None:
    """What the Ray Train worker recorded in MLflow: device, autocast dtype, gradient scaler, loss curve."""
    r = out.distill
    client = MlflowClient(r.tracking_uri)
    tags = client.get_run(r.run_id).data.tags
    loss = [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
    scale = [m.value for m in client.get_metric_history(r.run_id, "grad_scale")]
    run["distill"] = {
        "steps": r.steps,
        "final_loss": r.final_loss,
        "first_loss": loss[0] if loss else None,
        "worker_device": tags.get("worker_device"),
        "autocast_dtype": tags.get("autocast_dtype"),
        "grad_scaler": tags.get("grad_scaler"),
        "grad_scale_last": scale[-1] if scale else None,
        "run_id": r.run_id,
    }
    d = run["distill"]
    want_dev = "cuda" if ctx.device.startswith("cuda") else "cpu"
    want_amp = {"bf16": "bfloat16", "fp16": "float16", "fp32": "none"}[prec]
    check(
        res,
        f"distill {prec}: on {want_dev}, autocast {want_amp}, {r.steps}/{r.total_steps} steps, finite loss",
        str(d["worker_device"]).startswith(want_dev)
        and d["autocast_dtype"] == want_amp
        and r.steps == r.total_steps
        and r.final_loss is not None
        and math.isfinite(r.final_loss),
        f"device {d['worker_device']}, autocast {d['autocast_dtype']}, loss {d['first_loss']} -> {d['final_loss']}",
    )
    if prec == "fp16":
        check(
            res,
            "distill fp16: gradient scaler active",
            d["grad_scaler"] == "true" and d["grad_scale_last"] is not None and d["grad_scale_last"] > 0,
            f"scale {d['grad_scale_last']}",
        )
