"""``spar demo``: the whole pipeline on one machine, on real sample photographs, in minutes.

The demo is a recipe for the one orchestrator (:func:`pipeline.workflow.orchestrator.run_pipeline`): ingest (train
with the frozen augmentations, held-out without) -> precompute the teacher for both image sets -> distill the
student -> evaluate (fidelity to the teacher on held-out images, speed) -> segmentation overlays. Everything lives
under ``--workdir``: a second run reuses the image sets and the teacher caches and trains a second student that
differs in one setting (the last 1 trainable block instead of the last 2), so MLflow's compare view and ``spar runs``
show a real difference. The console shows our progress bars and one line per stage; Ray's own logs only with
``--verbose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from pipeline.cache.config import precomputes_in_process
from pipeline.common.config import config_from_cli
from pipeline.common.console import set_verbose
from pipeline.common.local import machine_resources
from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, write_photos
from pipeline.common.tracking import mlflow_runs_url, mlflow_ui_command, tracking_uri
from pipeline.data.config import IngestConfig
from pipeline.eval.config import FidelityConfig, SegmentConfig, SpeedConfig
from pipeline.student.format import read_backbone_info
from pipeline.train.config import DistillConfig, trains_in_process
from pipeline.workflow.config import DemoConfig, Recipe, RunConfig
from pipeline.workflow.orchestrator import Extras, PipelineResult, Reporter, run_pipeline


def demo_trainable_blocks(cfg: DemoConfig, work: Path) -> int:
    """The configured value, else 2 for the workdir's first student, 1 for the second, 2 for the third, ..."""
    if cfg.trainable_blocks:
        return cfg.trainable_blocks
    done = [d for d in (work / "students").glob("*") if d.is_dir() and not d.name.startswith(".")]
    return 2 if len(done) % 2 == 0 else 1


def demo_recipe(cfg: DemoConfig, work: Path) -> tuple[Recipe, Extras]:
    """The demo as a recipe: sample photos, the configured backbone as teacher and student, fidelity and speed
    evaluations and segmentation overlays of the held-out photos."""
    run = RunConfig(
        workdir=str(work),
        experiment=cfg.experiment,
        source=str(work / "raw" / "train"),
        heldout_source=str(work / "raw" / "heldout"),
    )
    ingest = IngestConfig(
        seed=cfg.seed,
        shard_size=8,
        target_long=cfg.train_long,
        target_short=cfg.train_short,
        min_short=cfg.train_min_short,
    )
    precompute = cfg.precompute_config()
    distill = DistillConfig(
        trainable_blocks=demo_trainable_blocks(cfg, work),
        lr=cfg.lr,
        max_steps=cfg.steps,
        epochs=1000,
        warmup_steps=min(20, cfg.steps // 10),
        schedule="cosine",
        seed=cfg.seed,
        checkpoint_every=max(50, cfg.steps // 3),
        workers=cfg.workers,
        loader_workers=0,  # one decode thread in the trainer: on a small CPU no process hand-over per batch (BENCHMARKS)
        shuffle_buffer=16,
    )
    # nothing else runs meanwhile: torch threads on up to 4 of the machine's CPUs in this process (2 cores: 300 steps
    # ~7 s sooner, the teacher caches ~2x as fast)
    threads = min(4, machine_resources()[0])
    if precomputes_in_process(precompute):
        precompute = dataclasses.replace(precompute, cpus_per_task=threads)
    if trains_in_process(distill):
        distill = dataclasses.replace(distill, cpus_per_worker=threads)
    fidelity = FidelityConfig(classes=cfg.classes)
    speed = SpeedConfig(backbone=cfg.backbone, resolutions=(448,), strides=(cfg.stride,), repeats=1)
    extras = Extras(
        heldout_ingest=IngestConfig(
            seed=cfg.seed, shard_size=8, augment=False, max_side=cfg.heldout_max_side
        ),
        evals=(fidelity, speed),
        segment=SegmentConfig(classes=cfg.classes, out=str(work / "overlays"), short_side=448),
    )
    return Recipe(run=run, ingest=ingest, precompute=precompute, distill=distill), extras


def _speed_ratio(speed: dict[str, Any]) -> float | None:
    """Teacher seconds / single-pass seconds at the first measured resolution."""
    try:
        single = float(speed["single"][0])
        sliding = float(next(iter(speed["sliding"].values()))[0])
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return None
    return sliding / single if single > 0 else None


def _print_summary(cfg: DemoConfig, work: Path, out: PipelineResult, minutes: float, overlays: str) -> None:
    fid, nan = out.evals[0], float("nan")
    base, stud = fid.get("baseline", {}), fid.get("student", {})
    speed_ratio = _speed_ratio(out.evals[1])
    print()
    print("=" * 78)
    print(f"SPAR demo finished in {minutes:.1f} min")
    print("  distance to the teacher on held-out images (lower MSE / higher cosine is better):")
    print(f"    single-pass baseline: MSE {base.get('mse') or nan:.4f}  cosine {base.get('cosine') or 0:.4f}")
    print(f"    distilled student:    MSE {stud.get('mse') or nan:.4f}  cosine {stud.get('cosine') or 0:.4f}")
    print(f"    student / baseline MSE ratio: {stud.get('mse', nan) / max(base.get('mse', nan), 1e-12):.3f}")
    if speed_ratio:
        print(
            f"  speed: the sliding-window teacher (stride {cfg.stride}) takes {speed_ratio:.1f}x the single pass"
        )
    print(f"  teacher caches: {out.cache}\n                  {out.heldout_cache}")
    print(f"  student checkpoint: {out.checkpoint}")
    print(f"  segmentation overlays: {overlays}")
    blocks = read_backbone_info(out.checkpoint).get("trainable_blocks", "?")
    print(f"  MLflow run {out.run_id} (student with the last {blocks} block(s) trained)")
    uri = tracking_uri(work)
    client = MlflowClient(uri)
    model = client.get_run(out.run_id).data.tags.get("registered_model", "")
    if model:
        print(f"  registered MLflow model: {model}  (mlflow.pyfunc.load_model gives features or labels)")
    print("  compare the students (their eval metrics and the settings that differ):")
    print(f"    spar runs --workdir {work} --experiment {cfg.experiment}")
    print(f"    {mlflow_ui_command(work)}")
    exp = client.get_experiment_by_name(cfg.experiment)
    ui = "http://127.0.0.1:5000" if uri.startswith("sqlite:") else uri if uri.startswith("http") else ""
    if exp is not None and ui:
        print(f"    then open {mlflow_runs_url(ui, exp.experiment_id)}")
        print("    (the experiment's training runs), tick them, press Compare")
    else:
        print(f"    then open experiment '{cfg.experiment}', tick the training runs, press Compare")
    training = "tags.`spar.stage` = 'distill'"
    if exp is None or len(client.search_runs([exp.experiment_id], training, max_results=100)) < 2:
        print("  run the demo again to train a second student (last 1 block instead of 2) to compare with")
    print("=" * 78)


def run_demo(cfg: DemoConfig) -> None:
    """Write the sample photos, run the demo recipe, print the summary."""
    work = Path(cfg.workdir).resolve()
    t_start = time.perf_counter()
    n_train = write_photos(work / "raw" / "train", TRAIN_PHOTOS)
    n_held = write_photos(work / "raw" / "heldout", HELDOUT_PHOTOS)
    print(
        f"[spar demo] {n_train} training photos (augmented), {n_held} held-out photos (no augmentation)",
        flush=True,
    )
    recipe, extras = demo_recipe(cfg, work)
    out = run_pipeline(recipe, extras, Reporter("demo", quiet=True))
    minutes = (time.perf_counter() - t_start) / 60
    _print_summary(cfg, work, out, minutes, extras.segment.out if extras.segment else "")


def run_cli(args: argparse.Namespace) -> int:
    """``spar demo``."""
    if args.verbose:
        set_verbose(True)
    run_demo(config_from_cli(DemoConfig, args, "demo"))
    return 0
