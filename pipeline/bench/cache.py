"""``spar bench cache``: cache size, write/read speed, and teacher precompute throughput vs the machine.

Everything is measured in one run, side by side:

* matmul rate of this machine (GFLOP/s) in float32 and in the teacher's autocast dtype, same thread count;
* teacher throughput in windows/s in-process (steady state, per window-batch size and precision) and the achieved
  fraction of the measured matmul rate, with the teacher's FLOPs per window counted analytically from the ViT
  config (cross-checked against torch's FLOP counter);
* end-to-end ``precompute`` (Ray task, teacher build, image decode, Zarr write) windows/s;
* bytes per image on disk vs raw float32 targets; write and read MB/s; time to read one image's targets.

``--codec-fidelity`` instead measures what a cache codec costs the method (:mod:`pipeline.bench.codec`).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import codec
from pipeline.bench.codec import ingest_photos
from pipeline.bench.measure import (
    counted_window_flops,
    cpu_name,
    matmul_gflops,
    scratch_dir,
    vit_window_flops,
    write_json,
)
from pipeline.cache.maintenance import invalidate_shards, verify_cache
from pipeline.cache.precompute import PrecomputeConfig, precompute
from pipeline.cache.reader import open_cache
from pipeline.cache.shard_task import compute_shard
from pipeline.cache.spec import CacheSpec, ShardEntry
from pipeline.cache.writer import ShardWriter, write_spec
from pipeline.common.tasks import init_ray
from pipeline.data.imageset import open_imageset
from spar_core.backbones import Backbone, build_backbone
from spar_core.sliding import num_windows, sliding_window_features

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": torch.float32}

# ------------------------------------------------------------------------------------------ measurements


def teacher_rate(
    bb: Backbone,
    images: list[np.ndarray],
    crop: int,
    stride: int,
    batch: int,
    amp: torch.dtype | None,
    repeats: int = 3,
) -> dict[str, float]:
    """windows/s of ``sliding_window_features`` over ``images``: the fastest of ``repeats`` passes after a
    warm-up (on a shared machine the fastest pass is the one least disturbed by other load)."""
    xs = [bb.normalize(torch.from_numpy(np.array(im))[None]).float() for im in images]  # (1, 3, H, W) each
    wins = sum(num_windows(im.shape[0], im.shape[1], crop, stride) for im in images)
    sliding_window_features(bb, xs[0], crop, stride, window_batch=batch, autocast_dtype=amp)  # warm-up
    passes = []
    for _ in range(repeats):
        t = time.perf_counter()
        for x in xs:
            sliding_window_features(bb, x, crop, stride, window_batch=batch, autocast_dtype=amp)
        passes.append(time.perf_counter() - t)
    dt = min(passes)
    return {
        "windows": wins,
        "seconds": dt,
        "seconds_median": float(np.median(passes)),
        "windows_per_s": wins / dt,
    }


def io_rates(dim: int, workdir: Path) -> dict[str, float]:
    """Write and read MB/s of a synthetic shard (uncompressed float16 MB), and one image's read latency."""
    rng = np.random.default_rng(0)
    n_img, h, w = 48, 42, 32  # ~ 672x512 images at patch 16
    spec = CacheSpec("synthetic", None, "synthetic", 224, 112, "maskclip", "float16", "io-bench")
    path = str(workdir / "io" / spec.fingerprint())
    write_spec(path, spec, {"num_shards": 1, "num_images": n_img, "dim": dim, "patch_size": 16}, {})
    entries = [ShardEntry(f"img{i:04d}", 0, h, w, h * 16, w * 16, "-") for i in range(n_img)]
    base = rng.standard_normal((h, w, dim)).astype(np.float32)
    feats = [base + 0.1 * rng.standard_normal((h, w, dim)).astype(np.float32) for _ in range(n_img)]
    mb = n_img * h * w * dim * 2 / 1e6
    t = time.perf_counter()
    wr = ShardWriter(path, 0, entries, dim=dim, dtype="float16")
    for e, f in zip(entries, feats, strict=True):
        wr.add(e.key, f)
    wr.commit()
    t_write = time.perf_counter() - t
    c = open_cache(path)
    t = time.perf_counter()
    for _ in c.iter_shard(0):
        pass
    t_read = time.perf_counter() - t
    c = open_cache(path)  # each image's targets read in random order from a freshly opened cache
    c.features(entries[0].key)  # opens the array
    keys = [e.key for e in entries]
    rng.shuffle(keys)
    lat = []
    for k in keys:
        t = time.perf_counter()
        c.features(k)
        lat.append(time.perf_counter() - t)
    return {
        "io_mb_float16": mb,
        "write_mb_s": mb / t_write,
        "read_mb_s": mb / t_read,
        "read_one_image_ms_median": 1e3 * float(np.median(lat)),
        "read_one_image_ms_p90": 1e3 * float(np.percentile(lat, 90)),
        "io_image_tokens": h * w,
    }


# ------------------------------------------------------------------------------------------ run


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print a report (also JSON with ``--json``)."""
    if args.codec_fidelity:
        return codec.run(args)
    threads = args.threads or os.cpu_count() or 1
    init_ray(num_cpus=os.cpu_count())  # before ingest, which would otherwise start a 1-CPU cluster
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict[str, Any] = {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch_threads": threads,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_1m": os.getloadavg()[0],
        }
    }
    with scratch_dir(args.workdir, "spar-bench-cache-") as tmp:
        images = args.images or ingest_photos(tmp, args.num_images, args.side)
        ims = open_imageset(images)
        pix = [ims.read(r.key) for r in ims.records]
        bb = build_backbone(args.teacher, args.pretrained, device=device)
        crop = args.crop or bb.native_size
        flops = vit_window_flops(bb, crop)["flops"]
        res["teacher"] = {
            "name": bb.name,
            "weights_id": bb.weights_id,
            "crop": crop,
            "stride": args.stride,
            "window_gflops_analytic": flops / 1e9,
            "window_gflops_counted": counted_window_flops(bb.cpu(), crop) / 1e9,
            "images": len(pix),
            "sizes": [list(p.shape[:2]) for p in pix],
            "windows": sum(num_windows(p.shape[0], p.shape[1], crop, args.stride) for p in pix),
        }
        bb = bb.to(device)
        res["teacher_sweep"] = _sweep(args, res, bb, pix, crop, flops, device)
        best = max(res["teacher_sweep"], key=lambda s: s["windows_per_s"])
        if not args.skip_precompute:
            res["precompute"] = _precompute(args, images, crop, best, tmp, flops, res)
        res["io"] = io_rates(bb.dim, tmp)
    _print(res)
    write_json(args.json, res)
    return 0


def _sweep(
    args: argparse.Namespace,
    res: dict[str, Any],
    bb: Backbone,
    pix: list[np.ndarray],
    crop: int,
    flops: float,
    device: str,
) -> list[dict[str, Any]]:
    """Teacher windows/s per precision and window batch (and once with weights not pre-cast), as fractions of
    the matmul rate measured before and after (the best of the two: load from other users varies)."""
    precisions = [s for s in args.precisions.split(",") if s]
    res["matmul_gflops"] = {p: matmul_gflops(DTYPES[p], device=device) for p in precisions}
    batches = [int(b) for b in args.batches.split(",")]
    runs = [(p, b, p != "none") for p in precisions for b in batches]
    if any(p != "none" for p in precisions):  # what pre-casting the frozen weights buys (precompute does it)
        runs.append((next(p for p in precisions if p != "none"), 8 if 8 in batches else batches[0], False))
    precast = copy.deepcopy(bb)
    sweep = []
    for prec, batch, cast in runs:
        amp = None if prec == "none" else DTYPES[prec]
        model = precast.precast_for_autocast(amp) if cast else bb
        r = teacher_rate(model, pix, crop, args.stride, batch, amp, repeats=args.repeats)
        achieved = r["windows_per_s"] * flops / 1e9
        sweep.append({"precision": prec, "precast_weights": cast, "window_batch": batch, **r,
                      "achieved_gflops": achieved})  # fmt: skip
        print(
            f"teacher {prec:>4}{' precast' if cast else ''} batch {batch:>3}: {r['windows_per_s']:.2f} windows/s, "
            f"{achieved:.1f} GFLOP/s = {achieved / res['matmul_gflops'][prec]:.2f} of matmul",
            flush=True,
        )
    for prec in precisions:
        res["matmul_gflops"][prec] = max(
            res["matmul_gflops"][prec], matmul_gflops(DTYPES[prec], device=device)
        )
    for s_ in sweep:  # the last key of each point, as fractions of the better of the two rates
        s_["fraction_of_matmul"] = s_["achieved_gflops"] / res["matmul_gflops"][s_["precision"]]
    return sweep


def _precompute(
    args: argparse.Namespace,
    images: str,
    crop: int,
    best: dict[str, Any],
    tmp: Path,
    flops: float,
    res: dict[str, Any],
) -> dict[str, Any]:
    """End-to-end ``precompute`` (one Ray task with all threads) at the best in-process setting."""
    cfg = PrecomputeConfig(
        images=images,
        teacher=args.teacher,
        pretrained=args.pretrained,
        crop=crop,
        stride=args.stride,
        cache_root=str(tmp / "cache"),
        autocast=best["precision"],
        window_batch=best["window_batch"],
        workers=1,
        cpus_per_task=res["machine"]["torch_threads"],
        progress=False,
    )
    t = time.perf_counter()
    path = precompute(cfg)
    wall = time.perf_counter() - t
    c = open_cache(path)
    assert not verify_cache(path)[1]
    task = _task_rate(path, images, cfg)
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    raw32 = sum(
        r.height // c.patch_size * (r.width // c.patch_size) * c.dim * 4
        for r in open_imageset(images).records
    )
    n = c.num_images
    wins = res["teacher"]["windows"]
    matmul = res["matmul_gflops"][best["precision"]]
    return {
        "precision": best["precision"],
        "window_batch": best["window_batch"],
        "wall_s": wall,
        "windows_per_s_end_to_end": wins / wall,
        "fraction_of_matmul_end_to_end": wins / wall * flops / 1e9 / matmul,
        "task_windows_per_s": task["windows_per_s"],
        "task_fraction_of_matmul": task["windows_per_s"] * flops / 1e9 / matmul,
        "task_vs_bare_teacher": task["windows_per_s"] / best["windows_per_s"],  # target: >= 0.9
        "task_seconds": {k: task[k] for k in ("seconds", "compute_s", "decode_wait_s", "write_wait_s")},
        "bytes_on_disk": disk,
        "bytes_per_image": disk / n,
        "raw_float32_bytes_per_image": raw32 / n,
        "ratio_vs_raw_float32": disk / raw32,
    }


def _task_rate(path: str, images: str, cfg: PrecomputeConfig) -> dict[str, float]:
    """The precompute task body run in-process with a warm teacher (no Ray start-up, no model build):
    decode, sliding-window teacher, Zarr write and commit of every shard, recomputed from scratch."""
    n = open_cache(path).num_shards
    invalidate_shards(path, [0])
    compute_shard(path, images, 0, asdict(cfg))  # warm-up: builds the teacher once in this process
    invalidate_shards(path, range(n))
    stats = [compute_shard(path, images, i, asdict(cfg)) for i in range(n)]
    wins, secs = sum(s["windows"] for s in stats), sum(s["seconds"] for s in stats)
    waits = {k: sum(s[k] for s in stats) for k in ("compute_s", "decode_wait_s", "write_wait_s")}
    return {"windows": wins, "seconds": secs, "windows_per_s": wins / secs, **waits}


def _print(res: dict[str, Any]) -> None:
    m, t = res["machine"], res["teacher"]
    print(
        f"\nmachine: {m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads, {m['device']}), load {m['loadavg_1m']:.1f}"
    )
    print(
        f"teacher: {t['name']} crop {t['crop']} stride {t['stride']}: {t['window_gflops_analytic']:.2f} GFLOP/window "
        f"analytic ({t['window_gflops_counted']:.2f} counted); {t['images']} images, {t['windows']} windows"
    )
    print("matmul: " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in res["matmul_gflops"].items()))
    for s in res["teacher_sweep"]:
        print(
            f"  {s['precision']:>4}{' precast' if s['precast_weights'] else ''} batch {s['window_batch']:>3}: "
            f"{s['windows_per_s']:.2f} win/s, "
            f"{s['achieved_gflops']:.1f} GFLOP/s, {s['fraction_of_matmul']:.2f} of matmul"
        )
    if "precompute" in res:
        _print_precompute(res["precompute"])
    io = res["io"]
    print(
        f"io ({io['io_mb_float16']:.0f} MB float16): write {io['write_mb_s']:.0f} MB/s, read {io['read_mb_s']:.0f} MB/s, "
        f"one image ({io['io_image_tokens']} tokens) {io['read_one_image_ms_median']:.2f} ms median, "
        f"{io['read_one_image_ms_p90']:.2f} ms p90"
    )


def _print_precompute(p: dict[str, Any]) -> None:
    print(
        f"precompute end-to-end ({p['precision']}, batch {p['window_batch']}): {p['wall_s']:.1f} s, "
        f"{p['windows_per_s_end_to_end']:.2f} win/s, {p['fraction_of_matmul_end_to_end']:.2f} of matmul "
        "(incl. Ray worker start and teacher build)"
    )
    print(
        f"precompute task body, warm teacher: {p['task_windows_per_s']:.2f} win/s, "
        f"{p['task_fraction_of_matmul']:.3f} of matmul"
    )
    ts = p["task_seconds"]
    print(
        f"precompute task body vs bare teacher: {p['task_vs_bare_teacher']:.2f}x windows/s (target >= 0.9); "
        f"task {ts['seconds']:.2f} s = teacher {ts['compute_s']:.2f} s + waiting for decode "
        f"{ts['decode_wait_s']:.2f} s + for the writer {ts['write_wait_s']:.2f} s (+ open, commit)"
    )
    print(
        f"size: {p['bytes_per_image'] / 1e3:.1f} KB/image on disk vs {p['raw_float32_bytes_per_image'] / 1e3:.1f} KB raw "
        f"float32 = {p['ratio_vs_raw_float32']:.3f}x"
    )
