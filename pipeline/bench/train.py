"""``spar bench train``: what streaming and caching cost a training step, and whether distillation works.

Parts (``--parts``, default both):

* ``step`` -- one process, the real :class:`pipeline.train.step.StepRunner`, the same batches in the same order:
  (a) targets already in memory, (b) streamed from the image set + teacher cache through
  :class:`pipeline.train.stream.PairedStream` with background decode workers, (c) teacher computed online with
  ``sliding_window_features``. The three are timed in interleaved rounds (robust to load from other processes);
  reported: mean step time of each and the ratios streaming/in-memory (target <= 1.05) and online/cached.
* ``quality`` -- the method at work: ``spar distill`` (Ray Train, the real pipeline) on augmented photos, then on
  held-out photos (not trained on) the student's feature MSE to the sliding-window teacher divided by the
  single-pass baseline's (target <= 0.5); MSE and cosine pooled over every patch position of every held-out
  image (:class:`pipeline.eval.fidelity.PooledFidelity`, the project's one definition).

Data: scikit-image's bundled photographs (no download), ingested with :func:`pipeline.data.ingest.ingest`, cached
with :func:`pipeline.cache.precompute.precompute`; random seeded ``tiny-clip-224`` weights (no pretrained weights
offline).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.bench.codec import fidelity, held_out
from pipeline.bench.gpu import photo
from pipeline.bench.measure import cpu_runner, scratch_dir, step_times, write_json
from pipeline.cache.precompute import PrecomputeConfig
from pipeline.cache.reader import open_cache
from pipeline.common.errors import UserError
from pipeline.common.photos import BENCH_HELDOUT_PHOTOS, BENCH_TRAIN_PHOTOS, sample_photo_rgb
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import open_imageset
from pipeline.student.format import load_student
from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.train.step import StepRunner
from pipeline.train.stream import PairedStream, _TarReader, decode_png, make_loader
from pipeline.workflow.config import Recipe, RunConfig
from pipeline.workflow.orchestrator import Extras, Reporter, prepare_data
from spar_core.backbones import build_backbone
from spar_core.sliding import num_windows, sliding_window_features

# ------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class BenchData:
    """The benchmark's training image set, a teacher cache per backbone, and the held-out image set."""

    images: str
    caches: dict[str, str]
    heldout: str


def build_data(root: Path, backbones: list[str], copies: int, stride: int) -> BenchData:
    """Train image set (augmented copies of BENCH_TRAIN_PHOTOS) + a teacher cache per backbone; held-out set.
    Built by the orchestrator's data stages (ingest and precompute; reruns reuse what is complete)."""
    src, held = root / "src_train", root / "src_heldout"
    src.mkdir(parents=True, exist_ok=True)
    held.mkdir(parents=True, exist_ok=True)
    for n in BENCH_TRAIN_PHOTOS:
        img = Image.fromarray(sample_photo_rgb(n))
        for c in range(copies):
            img.save(src / f"{n}_{c}.png")
    for n in BENCH_HELDOUT_PHOTOS:
        Image.fromarray(sample_photo_rgb(n)).save(held / f"{n}.png")
    sizes = dict(target_long=448, target_short=336, min_short=224)
    caches: dict[str, str] = {}
    data = None
    for bb in dict.fromkeys(backbones):
        recipe = Recipe(
            run=RunConfig(workdir=str(root), source=str(src), heldout_source=str(held)),
            ingest=IngestConfig(shard_size=8, **sizes),
            precompute=PrecomputeConfig(teacher=bb, crop=0, stride=stride, autocast="none", progress=False),
        )
        extras = Extras(
            heldout_ingest=IngestConfig(augment=False, max_side=448, **sizes), heldout_cache=False
        )
        with contextlib.redirect_stdout(io.StringIO()):
            data = prepare_data(recipe, extras, Reporter("bench train"))
        caches[bb] = data.cache
    assert data is not None and data.heldout is not None
    return BenchData(data.images, caches, data.heldout)


# ------------------------------------------------------------------------------------------------ step


def worker_cost(images: str, cache_path: str, n: int = 30) -> dict[str, float]:
    """CPU milliseconds per sample of the loader worker's jobs, measured in this process (robust to load)."""
    ims, cache = open_imageset(images), open_cache(cache_path)
    s = PairedStream(images, cache_path, seed=0, rank=0, world_size=1, patch_size=16)
    planner = s.planner(ims)
    refs = [b[0] for b in planner.batches(0, 0)][:n]
    reader = _TarReader(ims, planner.inputs(0, 0), {r.key for r in refs})
    cost = {"tar_read": 0.0, "png_decode_and_sha256": 0.0, "cache_read_and_check": 0.0}
    for r in refs:
        t0 = time.process_time()
        data = reader.get(r.key, r.shard)
        t1 = time.process_time()
        decode_png(data, r, True)
        t2 = time.process_time()
        s._target(cache, r)
        t3 = time.process_time()
        cost["tar_read"] += t1 - t0
        cost["png_decode_and_sha256"] += t2 - t1
        cost["cache_read_and_check"] += t3 - t2
    return {k: v / len(refs) * 1e3 for k, v in cost.items()}


def bench_step(data: BenchData, args: argparse.Namespace) -> dict[str, Any]:
    """In-memory vs streamed targets vs online teacher, the same batches, timed in interleaved rounds."""
    cache_path = data.caches[args.step_backbone]
    cache = open_cache(cache_path)
    crop, stride = cache.spec.crop, cache.spec.stride
    skip = 3
    n = args.steps

    def stream(num: int) -> PairedStream:
        return PairedStream(data.images, cache_path, seed=0, rank=0, world_size=1, patch_size=16,
                            num_batches=num)  # fmt: skip

    memory = [dict(it) for it in make_loader(stream(n + skip), 0)]  # the same batches, decoded up front
    times: dict[str, list[float]] = {"in_memory": [], "streaming": [], "online_teacher": []}
    torch.set_num_threads(1)  # as a Ray Train worker with cpus_per_worker=1
    cfg = DistillConfig(lr=1e-4, precision="fp32")
    cached_runner = cpu_runner(args.step_backbone, cfg, n + skip, crop, stride)
    online_runner = cpu_runner(args.step_backbone, replace(cfg, teacher_online=True), n + skip, crop, stride)
    for _ in range(args.rounds):
        times["in_memory"] += step_times(cached_runner, memory, n, skip)
        loader = make_loader(stream(n + skip), args.loader_workers)
        times["streaming"] += step_times(cached_runner, loader, n, skip)
        del loader
        times["online_teacher"] += step_times(online_runner, memory, max(3, n // 3), 1)
    mean = {k: statistics.fmean(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    sizes = [tuple(m["image"].shape[1:3]) for m in memory]
    large = _large_image_steps(args, cached_runner, online_runner, crop, stride)
    return {
        "backbone": args.step_backbone,
        "loader_worker_cpu_ms_per_sample": worker_cost(data.images, cache_path),
        "teacher_crop": crop,
        "teacher_stride": stride,
        "loader_workers": args.loader_workers,
        "torch_threads": 1,
        "steps_timed": {k: len(v) for k, v in times.items()},
        "mean_image_pixels": float(np.mean([h * w for h, w in sizes])),
        "mean_teacher_windows": float(np.mean([num_windows(h, w, crop, stride) for h, w in sizes])),
        "step_s_mean": mean,
        "step_s_median": med,
        "ratio_streaming_vs_memory_mean": mean["streaming"] / mean["in_memory"],
        "ratio_streaming_vs_memory_median": med["streaming"] / med["in_memory"],
        "ratio_online_vs_cached_mean": mean["online_teacher"] / mean["in_memory"],
        "large_image": large,
    }


def _large_image_steps(
    args: argparse.Namespace, cached: StepRunner, online: StepRunner, crop: int, stride: int
) -> dict[str, Any]:
    """Cached vs online step on one larger photo (``--large`` HxW): the teacher's cost grows with its windows."""
    h, w = (int(v) for v in args.large.lower().split("x"))
    item: dict[str, Any] = {"image": torch.from_numpy(photo(h, w))[None], "keys": ["large"]}  # (1, H, W, 3)
    with torch.no_grad():
        item["target"] = sliding_window_features(
            online.teacher, online.bb.normalize(item["image"]), crop, stride
        )
    t_cached = statistics.median(step_times(cached, [item] * 4, 3, 1))
    t_online = statistics.median(step_times(online, [item] * 3, 2, 1))
    return {
        "size": [h, w],
        "teacher_windows": num_windows(h, w, crop, stride),
        "step_s_cached": t_cached,
        "step_s_online": t_online,
        "ratio_online_vs_cached": t_online / t_cached,
    }


# --------------------------------------------------------------------------------------------- quality


def bench_quality(data: BenchData, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``spar distill`` on the training set, then held-out fidelity of the student vs the single pass."""
    cache_path = data.caches[args.backbone]
    cache = open_cache(cache_path)
    cfg = DistillConfig(
        images=data.images,
        cache=cache_path,
        workers=args.workers,
        max_steps=args.train_steps,
        lr=args.lr,
        checkpoint_every=max(1, args.train_steps // 3),
        loader_workers=1,
        log_every=25,
        workdir=str(root / "work"),
        experiment="spar-bench-train",
        precision="fp32",
    )
    t0 = time.perf_counter()
    res = distill(cfg)
    wall = time.perf_counter() - t0
    # feature MSE/cosine to the sliding-window teacher on the held-out images: student vs single-pass baseline,
    # pooled over every patch position of every image (:func:`pipeline.bench.codec.fidelity`)
    base, ims = build_backbone(cache.spec.backbone, seed=0), open_imageset(data.heldout)
    held = held_out(base, ims, [r.key for r in ims.records], cache.spec.crop, cache.spec.stride)
    s, b = fidelity(load_student(res.checkpoint_dir), held), fidelity(base, held)
    return {
        "backbone": cache.spec.backbone,
        "train_images": cache.num_images,
        "heldout_photos": list(BENCH_HELDOUT_PHOTOS),
        "steps": res.steps,
        "lr": args.lr,
        "workers": args.workers,
        "trainable_blocks": cfg.trainable_blocks,
        "distill_wall_s": wall,
        "mlflow_run_id": res.run_id,
        "images": len(held.keys),
        "student_mse": s["mse"],
        "baseline_mse": b["mse"],
        "mse_ratio": s["mse"] / b["mse"],
        "student_cosine": s["cosine"],
        "baseline_cosine": b["cosine"],
    }


# --------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Build the data, run the chosen parts, print each part's line and the whole result as JSON."""
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"step", "quality"}
    if unknown:
        raise UserError(f"bench train: unknown part(s) {sorted(unknown)}; use step and/or quality")
    out: dict[str, Any] = {
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "load_avg_start": os.getloadavg()[0],
    }
    with scratch_dir(args.workdir, "spar-bench-train-") as root:
        t0 = time.perf_counter()
        backbones = [args.step_backbone] if "step" in parts else []
        if "quality" in parts:
            backbones.append(args.backbone)
        data = build_data(root, backbones, args.copies, args.stride)
        out["data_build_s"] = time.perf_counter() - t0
        if "step" in parts:
            out["step"] = bench_step(data, args)
            _print_step(out["step"])
        if "quality" in parts:
            out["quality"] = q = bench_quality(data, root, args)
            print(
                f"held-out feature MSE to the teacher ({q['backbone']}, {q['steps']} steps, lr {q['lr']}): "
                f"student {q['student_mse']:.4g} vs single pass {q['baseline_mse']:.4g} -> ratio {q['mse_ratio']:.3f}; "
                f"cosine {q['student_cosine']:.3f} vs {q['baseline_cosine']:.3f}"
            )
        out["load_avg_end"] = os.getloadavg()[0]
        print(json.dumps(out, indent=2))
        write_json(args.json, out)
    return 0


def _print_step(s: dict[str, Any]) -> None:
    print(f"loader worker CPU per sample (ms): {s['loader_worker_cpu_ms_per_sample']}")
    print(
        f"step time ({s['backbone']}, ~{s['mean_image_pixels'] / 1e3:.0f}k px): in memory "
        f"{s['step_s_mean']['in_memory'] * 1e3:.1f} ms, streaming {s['step_s_mean']['streaming'] * 1e3:.1f} ms "
        f"(ratio {s['ratio_streaming_vs_memory_mean']:.3f}, median {s['ratio_streaming_vs_memory_median']:.3f}), "
        f"online teacher {s['step_s_mean']['online_teacher'] * 1e3:.1f} ms "
        f"({s['ratio_online_vs_cached_mean']:.1f}x the cached step, {s['mean_teacher_windows']:.1f} windows); "
        f"at {s['large_image']['size'][0]}x{s['large_image']['size'][1]} ({s['large_image']['teacher_windows']} "
        f"windows) online/cached {s['large_image']['ratio_online_vs_cached']:.1f}x"
    )
