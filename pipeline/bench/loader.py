"""``spar bench loader``: the distill stream at paper size against the training step, measured in one run.

Synthetic 2048x1024 images (a seeded smooth texture: PNG-compressible as photographs are) are ingested without
augmentation and run through the ViT-B/16 teacher at stride = crop (real 64x128x512 float16 targets, few windows).
Then, on those samples:

* the CPU time per sample of each job of a decode thread (tar read, PNG decode + pixel sha256, Zarr read + check),
  hence samples/s per decode thread, and the wall-clock samples/s of the stream with one decode thread
  (``loader_workers = 0``) and with 1 and 2 decode processes;
* the training step at that size on this CPU (ViT-B/16 student, last 2 blocks trained), and the GPU step from the
  arithmetic (FLOPs at the H200's measured share of its matmul rate: :mod:`pipeline.data.loader_sizing`);
* what ``loader_workers = "auto"`` picks for each.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.bench.measure import cpu_name, cpu_runner, scratch_dir, step_times, vit_window_flops, write_json
from pipeline.bench.train import worker_cost
from pipeline.cache.precompute import PrecomputeConfig, precompute
from pipeline.common.tasks import init_ray
from pipeline.data.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.loader_sizing import (
    GPU_STEP_FLOPS_PER_S,
    auto_loader_workers,
    sample_load_seconds,
    student_step_flops,
)
from pipeline.train.config import DistillConfig
from pipeline.train.stream import PairedStream, make_loader
from spar_core.backbones import build_backbone
from spar_core.flops import vit_arch, vit_dense_flops


def synthetic_photo(seed: int, height: int, width: int) -> np.ndarray:
    """A seeded smooth RGB texture (low-frequency waves plus mild noise): (H, W, 3) uint8, photo-like PNG size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    chans = []
    for _ in range(3):
        f = rng.uniform(0.002, 0.02, 4)
        ph = rng.uniform(0, 6.3, 2)
        chans.append(np.sin(yy * f[0] + xx * f[1] + ph[0]) + np.cos(yy * f[2] - xx * f[3] + ph[1]))
    img = (np.stack(chans, -1) + 2.0) * 60.0 + rng.normal(0, 6, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_sources(folder: Path, n: int, height: int, width: int) -> None:
    """``n`` synthetic photos as PNG files ``img_XXXXXX.png`` (numbered from 0)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(synthetic_photo(i, height, width)).save(folder / f"img_{i:06d}.png", compress_level=1)


def build_paper_data(base: Path, n: int, height: int, width: int, teacher: str) -> tuple[str, str]:
    """(image set, cache) of ``n`` ``height x width`` images with ``teacher`` at stride = crop."""
    write_sources(base / "src", n, height, width)
    init_ray(num_cpus=min(2, os.cpu_count() or 1))
    cfg = IngestConfig(augment=False, shard_size=max(1, n // 2))
    ingest(str(base / "src"), str(base / "set"), cfg, workers=2, progress=False)
    crop = build_backbone(teacher).native_size
    cache = precompute(PrecomputeConfig(images=str(base / "set"), teacher=teacher, crop=crop, stride=crop,
                                        cache_root=str(base / "cache"), progress=False))  # fmt: skip
    return str(base / "set"), cache


def stream_rate(images: str, cache: str, workers: int, samples: int) -> float:
    """Wall-clock samples/s of the distill stream with ``workers`` decode processes (0 = one thread), the first
    sample (start-up) not counted."""
    s = PairedStream(images, cache, seed=0, rank=0, world_size=1, patch_size=16, num_batches=samples + 1)
    it = iter(make_loader(s, workers))
    next(it)
    t0 = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t0)


def cpu_step_seconds(backbone: str, height: int, width: int, dim: int, steps: int) -> tuple[float, str]:
    """(fastest wall seconds of a training step at ``height x width`` on this CPU, the precision used)."""
    runner = cpu_runner(backbone, DistillConfig(lr=1e-5, precision="auto"), steps + 1)
    item = {
        "image": torch.randint(0, 255, (1, height, width, 3), dtype=torch.uint8),
        "target": torch.randn(1, height // 16, width // 16, dim).half(),  # (1, H/16, W/16, D)
    }
    return min(step_times(runner, [item] * (steps + 1), steps, 1)), runner.precision


# measured on the H200 (docs/bench/gpu-h200-2026-11-26): teacher windows/s at batch 256 / 64, bf16
H200_TEACHER_WINDOWS_PER_S = {"maskclip-vit-b16": (224, 8277.0), "siglip2-vit-b16-512": (512, 1065.0)}


def paper_projection(views: int = 25_000, epochs: int = 10, gpus: int = 2) -> dict[str, Any]:
    """The paper run on ``views`` SA-1B-like views from figures measured on an H200 (no GPU here): precompute
    device-hours per teacher at stride 24, distill device-hours (ViT-B/16, last 2 blocks, ``epochs`` epochs over
    ``gpus`` GPUs at the step rate of :data:`GPU_STEP_FLOPS_PER_S`), decoders per GPU, cache bytes."""
    from pipeline.bench.gpu.checks import project_precompute, sa1b_like_sizes
    from pipeline.data.augment import augmentation_for

    sizes = sa1b_like_sizes(views)
    out: dict[str, Any] = {"views": views, "epochs": epochs, "gpus": gpus}
    for name, (crop, rate) in H200_TEACHER_WINDOWS_PER_S.items():
        bb = build_backbone(name)
        proj = project_precompute(sizes, crop, 24, vit_window_flops(bb, crop)["flops"], bb.dim, 16)
        out[name] = {**proj, "h200_hours": proj["windows"] / rate / 3600}
    bb = build_backbone("maskclip-vit-b16")
    arch, cfg = vit_arch(bb), IngestConfig()
    step_s, load_s = [], []
    for i, (h, w) in enumerate(sizes):
        _, _, ch, cw = augmentation_for(f"sa1b-{i}", h, w, cfg)["crop"]
        step_s.append(
            student_step_flops(vit_dense_flops(arch, ch, cw)["flops"], 12, 2) / GPU_STEP_FLOPS_PER_S
        )
        load_s.append(sample_load_seconds(ch, cw, (ch // 16) * (cw // 16) * bb.dim * 2))
    out["distill"] = {
        "step_ms_mean": 1e3 * float(np.mean(step_s)),
        "h200_hours_total": epochs * float(np.sum(step_s)) / 3600,
        "wall_hours_on_gpus": epochs * float(np.sum(step_s)) / 3600 / gpus,
        "decode_threads_needed": float(np.sum(load_s) / np.sum(step_s)),
    }
    return out


def run(args: argparse.Namespace) -> int:
    """``spar bench loader``."""
    if args.projection:
        proj = paper_projection()
        print(json.dumps(proj, indent=2))
        write_json(args.json, proj)
        return 0
    h, w = (int(v) for v in args.size.lower().split("x"))
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "size": [h, w], "images": args.images}
    with scratch_dir(args.workdir, "spar-bench-loader-") as base:
        images, cache = build_paper_data(base, args.images, h, w, args.backbone)
        bb = build_backbone(args.backbone)
        target_bytes = (h // 16) * (w // 16) * bb.dim * 2
        cost = worker_cost(images, cache, n=args.images)  # CPU ms per sample, per job
        out["thread_ms"] = cost
        out["stream"] = {str(k): stream_rate(images, cache, k, args.samples) for k in args.workers}
        step_cpu, prec = cpu_step_seconds(args.backbone, h, w, bb.dim, args.steps)
    flops = student_step_flops(vit_dense_flops(vit_arch(bb), h, w)["flops"], bb.num_blocks, 2)
    load_model = sample_load_seconds(h, w, target_bytes)
    out.update(
        target_bytes=target_bytes,
        step_flops=flops,
        cpu_step_s=step_cpu,
        cpu_precision=prec,
        gpu_step_s=flops / GPU_STEP_FLOPS_PER_S,
        load_s_model=load_model,
        load_s_measured=sum(cost.values()) / 1e3,
    )
    cpus = os.cpu_count() or 1
    for dev, step in (("cpu", step_cpu), ("gpu", out["gpu_step_s"])):
        sz = auto_loader_workers(out["load_s_measured"], step, max_workers=16 if dev == "gpu" else cpus - 1)
        out[f"auto_{dev}"] = {"workers": sz.workers, "capped": sz.capped}
    _print(out)
    write_json(args.json, out)
    return 0


def _print(o: dict[str, Any]) -> None:
    h, w = o["size"]
    per_thread = 1e3 / sum(o["thread_ms"].values())
    print(f"loader vs step at {w}x{h}, targets {h // 16}x{w // 16}x{o['target_bytes'] // (h * w // 128)} float16 "
          f"({o['target_bytes'] / 1e6:.1f} MB); {o['cpu']}, {o['cores']} cores")  # fmt: skip
    jobs = ", ".join(f"{k} {v:.1f} ms" for k, v in o["thread_ms"].items())
    print(f"  decode thread, CPU time per sample: {jobs} -> {per_thread:.1f} samples/s per decode thread")
    print(f"  (model in loader_sizing: {o['load_s_model'] * 1e3:.0f} ms per sample)")
    for k, v in o["stream"].items():
        what = "1 decode thread in the trainer" if k == "0" else f"{k} decode process(es)"
        print(f"  stream, {what}: {v:.2f} samples/s wall")
    print(f"  step ({o['step_flops'] / 1e12:.2f} TFLOP): CPU {o['cpu_step_s']:.2f} s ({o['cpu_precision']}), "
          f"GPU (arithmetic: 0.36 x 797 TFLOP/s, H200) {o['gpu_step_s'] * 1e3:.1f} ms")  # fmt: skip
    for dev in ("cpu", "gpu"):
        need = o[f"{dev}_step_s"] and 1.0 / o[f"{dev}_step_s"]
        print(f"  {dev}: needs {need:.2f} samples/s = {need / per_thread:.2f} decode threads; "
              f"auto -> loader_workers = {o[f'auto_{dev}']['workers']}")  # fmt: skip
