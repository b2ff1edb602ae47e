"""``spar bench ingest``: ingest throughput (images/s) with 1 and 2 Ray workers on scikit-image's photos.

The bundled photos (PNG/JPEG files shipped inside ``skimage/data``) are copied ``--copies`` times into a scratch
folder (distinct names, so distinct augmentations), then ingested from scratch once per worker count on one local
Ray cluster. Ray start-up and a warm-up run are excluded; each timed run starts from an empty output folder.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import platform
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
from PIL import Image

from pipeline.bench.measure import scratch_dir, write_json
from pipeline.common.photos import sample_photo_files
from pipeline.common.tasks import init_ray
from pipeline.data import png
from pipeline.data.augment import apply_augmentation, augmentation_for, decode_source
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import open_imageset, pixel_sha256
from pipeline.data.ingest import IngestSummary, ingest
from pipeline.data.png import encode_png

Encoder = Callable[[np.ndarray], bytes]
SMALL_RECIPE = dict(target_long=256, target_short=128, min_short=128)


def _make_sources(dst: Path, copies: int) -> int:
    photos = sample_photo_files()
    for c in range(copies):
        (dst / f"c{c}").mkdir(parents=True, exist_ok=True)
        for p in photos:
            shutil.copyfile(p, dst / f"c{c}" / p.name)
    return len(photos) * copies


def cpu_breakdown(files: list[Path], cfg: IngestConfig) -> dict[str, float]:
    """CPU seconds per image for each step, in this process (no Ray): robust to other load on the machine."""
    steps = {"decode": 0.0, "augment": 0.0, "sha256": 0.0, "png_encode": 0.0}
    for i, f in enumerate(files):
        data = f.read_bytes()
        t0 = time.process_time()
        img, _ = decode_source(data, cfg)
        t1 = time.process_time()
        arr = apply_augmentation(img, augmentation_for(f"bench{i}", img.height, img.width, cfg))
        t2 = time.process_time()
        pixel_sha256(arr)
        t3 = time.process_time()
        encode_png(arr, cfg.png_compress_level)
        t4 = time.process_time()
        for k, dt in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            steps[k] += dt
    out = {k: v / len(files) for k, v in steps.items()}
    out["total"] = sum(out.values())
    return out


def _pil_png(arr: np.ndarray, level: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG", compress_level=level, optimize=False)
    return buf.getvalue()


def _zlib_up_png(arr: np.ndarray, level: int) -> bytes:
    with mock.patch.object(png, "_deflate", lambda data, lv: zlib.compress(data, lv)):
        return png.encode_png(arr, level)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_options() -> dict[str, Encoder]:
    """Lossless encodings of an ingest image: name -> fn(arr) -> bytes. The first is the previous default."""
    return {
        "PIL PNG level 1 (before)": functools.partial(_pil_png, level=1),
        "PIL PNG level 0 (stored)": functools.partial(_pil_png, level=0),
        "Up filter + zlib level 1": functools.partial(_zlib_up_png, level=1),
        **{
            f"Up filter + ISA-L level {lv}{' (default)' if lv == 1 else ''}": functools.partial(
                encode_png, level=lv
            )
            for lv in (0, 1, 2, 3)
        },
        "raw .npy (webdataset decodes it)": _npy,
    }


def encode_table(files: list[Path], cfg: IngestConfig, rounds: int = 3) -> list[dict[str, Any]]:
    """CPU ms and bytes per image of every lossless encoding on the augmented photos, with the decode checked.

    Process CPU time (not wall time), the fastest of ``rounds`` interleaved rounds: robust to other load."""
    arrs = []
    for i, f in enumerate(files):
        img, _ = decode_source(f.read_bytes(), cfg)
        arrs.append(apply_augmentation(img, augmentation_for(f"bench{i}", img.height, img.width, cfg)))
    opts = encode_options()
    best = {k: float("inf") for k in opts}
    sizes: dict[str, int] = {}
    for _ in range(max(1, rounds)):
        for name, enc in opts.items():
            t = time.process_time()
            out = [enc(a) for a in arrs]
            best[name] = min(best[name], time.process_time() - t)
            sizes[name] = sum(map(len, out))
            if "PNG" in name or "Up filter" in name:
                for b, a in zip(out, arrs, strict=True):  # lossless, by PIL's decoder
                    with Image.open(io.BytesIO(b)) as im:
                        assert np.array_equal(np.asarray(im.convert("RGB")), a), name
            elif "npy" in name:
                assert all(np.array_equal(np.load(io.BytesIO(b)), a) for b, a in zip(out, arrs, strict=True))
    raw = sum(a.nbytes for a in arrs)
    base = best[next(iter(opts))]
    return [
        {
            "option": k,
            "encode_ms_per_image": 1e3 * best[k] / len(arrs),
            "bytes_per_image": sizes[k] / len(arrs),
            "fraction_of_raw": sizes[k] / raw,
            "speedup_vs_before": base / best[k],
        }
        for k in opts
    ]


def _print_encode_table(rows: list[dict[str, Any]], n: int) -> None:
    print(f"lossless encoding of {n} augmented photos (CPU time, one process, best of interleaved rounds):")
    print(f"  {'option':<40} {'ms/image':>9} {'KB/image':>9} {'of raw':>7} {'speed-up':>9}")
    for r in rows:
        print(f"  {r['option']:<40} {r['encode_ms_per_image']:>9.2f} {r['bytes_per_image'] / 1e3:>9.1f} "
              f"{r['fraction_of_raw']:>7.3f} {r['speedup_vs_before']:>8.2f}x")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Time ingest at each worker count; print a table and the speed-up."""
    small = SMALL_RECIPE if args.recipe == "small" else {}
    if args.encode_only:
        files = sample_photo_files()
        rows = encode_table(files, IngestConfig(**small), args.encode_rounds)
        _print_encode_table(rows, len(files))
        write_json(args.json, {"encoding": rows})
        return 0
    counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    with scratch_dir(args.workdir, "spar-bench-ingest-") as base:
        n = _make_sources(base / "src", args.copies)
        shard_size = max(1, -(-n // (max(counts) * args.shards_per_worker)))
        cfg = IngestConfig(shard_size=shard_size, **small)
        init_ray(num_cpus=max(counts))
        ingest(str(base / "src" / "c0"), str(base / "warmup"), cfg, workers=max(counts), progress=False)
        results = [_timed_ingest(base, cfg, w) for w in counts]
        cpu = cpu_breakdown(sample_photo_files(), cfg)
        enc_rows = encode_table(sample_photo_files(), cfg, args.encode_rounds)
        info = {
            "recipe": args.recipe,
            "shard_size": shard_size,
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "same_fingerprint_across_worker_counts": len({r["fingerprint"] for r in results}) == 1,
            "results": results,
            "cpu_seconds_per_image": {k: round(v, 5) for k, v in cpu.items()},
            "encoding": enc_rows,
        }
        _print_results(args, n, info, cpu)
        write_json(args.json, info)
        return 0


def _timed_ingest(base: Path, cfg: IngestConfig, workers: int) -> dict[str, Any]:
    """One ingest of every source copy from an empty output folder with ``workers`` workers."""
    out = base / f"out-w{workers}"
    shutil.rmtree(out, ignore_errors=True)
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    s: IngestSummary = ingest(str(base / "src"), str(out), cfg, workers=workers, progress=False)
    wall = time.perf_counter() - t
    recs = open_imageset(str(out)).records
    tar_bytes = sum(f.stat().st_size for f in (out / "images").glob("shard-*.tar"))
    return {
        "workers": workers,
        "inputs": s.num_inputs,
        "accepted": s.accepted,
        "rejected": s.rejected,
        "shards": s.num_shards,
        "seconds": round(s.seconds, 3),
        "images_per_s": round(s.processed / s.seconds, 3),
        "wall_s_incl_listing_and_manifest": round(wall, 3),
        "loadavg_1m_before": round(load0, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "fingerprint": s.fingerprint,
        "mean_output_megapixels": round(sum(r.height * r.width for r in recs) / len(recs) / 1e6, 3),
        "tar_bytes_per_image": round(tar_bytes / len(recs)),
    }


def _print_results(args: argparse.Namespace, n: int, info: dict[str, Any], cpu: dict[str, float]) -> None:
    """The worker-count table, the CPU breakdown and the encoding table (adds the per-core ceilings to ``info``)."""
    results, enc_rows = info["results"], info["encoding"]
    print(f"ingest bench: {n} inputs ({args.copies} copies of {n // args.copies} scikit-image files), "
          f"recipe={args.recipe}, shard_size={info['shard_size']}, {os.cpu_count()} CPUs")  # fmt: skip
    r0 = results[0]
    print(
        f"outputs: {r0['mean_output_megapixels']} Mpx and {r0['tar_bytes_per_image'] / 1e6:.2f} MB per image"
    )
    print(f"{'workers':>7} {'images/s':>9} {'seconds':>8} {'accepted':>8} {'rejected':>8} {'load1m':>11}")
    for r in results:
        print(f"{r['workers']:>7} {r['images_per_s']:>9.2f} {r['seconds']:>8.2f} {r['accepted']:>8} "
              f"{r['rejected']:>8} {r['loadavg_1m_before']:>5.1f}->{r['loadavg_1m_after']:<5.1f}")  # fmt: skip
    if len(results) > 1:
        print(f"speed-up {results[-1]['workers']} vs {results[0]['workers']} workers: "
              f"{results[-1]['images_per_s'] / results[0]['images_per_s']:.2f}x; identical output: "
              f"{info['same_fingerprint_across_worker_counts']}")  # fmt: skip
    steps = ", ".join(f"{k} {1000 * v:.1f} ms" for k, v in cpu.items())
    print(
        f"CPU time per image (one process, no Ray): {steps} -> at most {1 / cpu['total']:.1f} images/s "
        "per fully available core"
    )
    _print_encode_table(enc_rows, len(sample_photo_files()))
    before = cpu["total"] - cpu["png_encode"] + enc_rows[0]["encode_ms_per_image"] / 1e3
    info["images_per_s_per_core_before_after"] = [1 / before, 1 / cpu["total"]]
    print(f"per-core ceiling: {1 / before:.1f} images/s with the previous encoder (PIL PNG level 1) -> "
          f"{1 / cpu['total']:.1f} images/s now = {before / cpu['total']:.2f}x")  # fmt: skip
