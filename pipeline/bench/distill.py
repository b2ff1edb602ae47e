"""``spar bench distill``: distillation throughput with 1 and 2 Ray Train workers, and how much of a step waits for
data (target: data wait < 5% of step time).

The data are built once, through the orchestrator's data stages (:func:`pipeline.workflow.orchestrator.prepare_data`)
from the demo's recipe (:func:`pipeline.workflow.demo.demo_recipe`: the sample photos, ``small-clip-224``, crop 224,
stride 24, the demo's ingest sizes; no held-out set). Then the real ``spar distill``
(:func:`pipeline.train.driver.distill`) runs once per worker count with the same settings, one after the other in
this process, and the numbers come from each run's MLflow metric history, which rank 0 of the worker loop
(:mod:`pipeline.train.worker`) logs for every step:

* ``step_time_s``: wall time from the end of the previous step to the end of this one (data wait, forward/backward,
  gradient all-reduce, optimizer, and the previous step's bookkeeping: metric flushes, Ray Train reports and the
  checkpoints written at epoch ends). The steps tile the loop's wall time, so their sum is the loop's time.
* ``data_wait_frac``: the part of that time spent in ``next(loader)`` (waiting for the next decoded batch).

Over the steps after ``--warmup`` (the first steps pay for loader start-up and first-touch costs): steps/s = steps /
sum(step_time_s), images/s = steps/s x batch size x workers, data-wait fraction = sum(wait) / sum(step_time_s) with
wait = data_wait_frac x step_time_s. With several workers the numbers are rank 0's; a rank waiting for its data
holds the others in the gradient all-reduce, which shows as step time, not as rank 0's wait.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipeline.bench.measure import scratch_dir, write_json
from pipeline.common.errors import UserError
from pipeline.common.photos import TRAIN_PHOTOS, write_photos
from pipeline.common.tasks import init_ray
from pipeline.data.imageset import open_imageset
from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.workflow.config import DemoConfig, Recipe
from pipeline.workflow.demo import demo_recipe
from pipeline.workflow.orchestrator import PreparedData, Reporter, prepare_data

EXPERIMENT = "spar-bench-distill"


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(w) for w in str(text).split(",") if w.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise UserError(f"bench distill: --workers must be comma-separated counts >= 1, got {text!r}")
    return counts


def demo_config(args: argparse.Namespace, work: Path) -> DemoConfig:
    """The demo's settings, changed only where a flag says so."""
    d = DemoConfig()
    return DemoConfig(
        workdir=str(work),
        backbone=args.backbone,
        crop=args.crop or d.crop,
        stride=args.stride or d.stride,
        train_long=args.train_long or d.train_long,
        train_short=args.train_short or d.train_short,
        train_min_short=args.train_min_short or d.train_min_short,
        steps=args.steps,
        workers=max(_worker_counts(args.workers)),  # precompute tasks in flight while the data are built
        experiment=EXPERIMENT,
    )


def build_data(args: argparse.Namespace, work: Path) -> tuple[PreparedData, Recipe]:
    """Ingest the first ``--photos`` training photos and precompute their teacher cache (the demo's recipe, no
    held-out set); returns the data and the recipe that made them (its distill section: the demo's settings)."""
    names = TRAIN_PHOTOS[: args.photos] if args.photos else TRAIN_PHOTOS
    write_photos(work / "raw" / "train", names)
    recipe, extras = demo_recipe(demo_config(args, work), work)
    recipe = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, heldout_source=""))
    extras = dataclasses.replace(extras, heldout_cache=False, evals=(), segment=None)
    data = prepare_data(recipe, extras, Reporter("bench distill", quiet=True))
    return data, recipe


def distill_config(
    base: DistillConfig, data: PreparedData, work: Path, workers: int, args: argparse.Namespace
) -> DistillConfig:
    """The demo's distill settings with ``workers`` Ray Train workers, ``--steps`` steps, no periodic checkpoint."""
    return dataclasses.replace(
        base,
        images=data.images,
        cache=data.cache,
        workdir=str(work),
        experiment=EXPERIMENT,
        workers=workers,
        max_steps=args.steps,
        checkpoint_every=10**9,  # no periodic checkpoints (Ray Train still reports at epoch ends and the end)
        loader_workers=args.loader_workers if args.loader_workers is not None else base.loader_workers,
        register_model="",
    )


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """step -> value of one metric (the last value logged at a step)."""
    hist = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return {m.step: m.value for m in hist}


def throughput(client: MlflowClient, run_id: str, warmup: int, images_per_step: int) -> dict[str, Any]:
    """steps/s, images/s and the data-wait fraction over the steps after ``warmup``, from the run's metrics."""
    step_s = _history(client, run_id, "step_time_s")
    frac = _history(client, run_id, "data_wait_frac")
    steps = sorted(s for s in step_s if s > warmup)
    if not steps:
        raise UserError(f"bench distill: no steps after the {warmup} warm-up steps; raise --steps")
    total = sum(step_s[s] for s in steps)
    wait = sum(frac[s] * step_s[s] for s in steps)
    rate = len(steps) / total
    return {
        "logged_steps": len(step_s),
        "timed_steps": len(steps),
        "step_s_total": total,
        "wait_s_total": wait,
        "steps_per_s": rate,
        "images_per_s": rate * images_per_step,
        "data_wait_frac": wait / total,
        "step_ms_median": 1e3 * statistics.median(step_s[s] for s in steps),
        "step_ms_max": 1e3 * max(step_s[s] for s in steps),
        "wait_ms_median": 1e3 * statistics.median(frac[s] * step_s[s] for s in steps),
    }


def run_one(cfg: DistillConfig, warmup: int) -> dict[str, Any]:
    """One distillation run, timed from its metric history."""
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    res = distill(cfg)
    wall = time.perf_counter() - t0
    client = MlflowClient(res.tracking_uri)
    epochs = _history(client, res.run_id, "epoch_loss")
    return {
        "workers": cfg.workers,
        "run_id": res.run_id,
        "steps": res.steps,
        "warmup_steps_excluded": warmup,
        **throughput(client, res.run_id, warmup, cfg.batch_size * cfg.workers),
        "epochs_ended": len(epochs),
        "distill_wall_s": wall,
        "loadavg_1m_before": load0,
        "loadavg_1m_after": os.getloadavg()[0],
    }


def _print(out: dict[str, Any]) -> None:
    s = out["settings"]
    print(
        f"distill bench: {s['backbone']}, crop {s['crop']}, stride {s['stride']}, {s['images']} images "
        f"(~{s['mean_megapixels']:.2f} Mpx), {s['steps']} steps (first {s['warmup']} excluded), batch "
        f"{s['batch_size']}, {s['loader_workers']} loader process(es) per worker; {out['cpus']} CPUs"
    )
    print(f"{'workers':>7} {'steps/s':>8} {'images/s':>9} {'data wait':>9} {'step ms':>8} {'wait ms':>8} "
          f"{'epochs':>6} {'wall s':>7} {'load1m':>11}")  # fmt: skip
    for r in out["runs"]:
        print(
            f"{r['workers']:>7} {r['steps_per_s']:>8.2f} {r['images_per_s']:>9.2f} {r['data_wait_frac']:>9.1%} "
            f"{r['step_ms_median']:>8.1f} {r['wait_ms_median']:>8.1f} {r['epochs_ended']:>6} "
            f"{r['distill_wall_s']:>7.1f} {r['loadavg_1m_before']:>5.1f}->{r['loadavg_1m_after']:<5.1f}"
        )
    print("  (step ms, wait ms: medians; data wait: sum of waits / sum of step times, target < 5%)")
    if "images_per_s_ratio" in out:
        a, b = out["runs"][0]["workers"], out["runs"][-1]["workers"]
        print(f"images/s {b} vs {a} worker(s): {out['images_per_s_ratio']:.2f}x")


def run(args: argparse.Namespace) -> int:
    """``spar bench distill``: build the data once, distill at each worker count, print the table, write --json."""
    counts = _worker_counts(args.workers)
    if args.steps <= args.warmup:
        raise UserError(f"bench distill: --steps ({args.steps}) must exceed --warmup ({args.warmup})")
    with scratch_dir(args.workdir, "spar-bench-distill-") as work:
        init_ray(num_cpus=max(os.cpu_count() or 1, max(counts)))
        t0 = time.perf_counter()
        data, recipe = build_data(args, work)
        build_s = time.perf_counter() - t0
        runs = [run_one(distill_config(recipe.distill, data, work, w, args), args.warmup) for w in counts]
        out = {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "settings": _settings(args, data, recipe, work),
            "data_build_s": build_s,
            "runs": runs,
        }
        if len(runs) > 1:
            out["images_per_s_ratio"] = runs[-1]["images_per_s"] / runs[0]["images_per_s"]
        _print(out)
        write_json(args.json, out)
    return 0


def _settings(args: argparse.Namespace, data: PreparedData, recipe: Recipe, work: Path) -> dict[str, Any]:
    recs = open_imageset(data.images).records
    cfg = distill_config(recipe.distill, data, work, 1, args)
    return {
        "backbone": args.backbone,
        "crop": recipe.precompute.crop,
        "stride": recipe.precompute.stride,
        "images": len(recs),
        "mean_megapixels": sum(r.height * r.width for r in recs) / len(recs) / 1e6,
        "steps": args.steps,
        "warmup": args.warmup,
        "batch_size": cfg.batch_size,
        "loader_workers": cfg.loader_workers,
        "shuffle_buffer": cfg.shuffle_buffer,
        "precision": cfg.precision,
        "cache": data.cache,
    }
