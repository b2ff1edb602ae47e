"""``spar bench ingest``: ingest throughput (images/s) with 1 and 2 Ray workers on scikit-image's photos.

The bundled photos (PNG/JPEG files shipped inside ``skimage/data``) are copied ``--copies`` times into a scratch
folder (distinct names, so distinct augmentations), then ingested from scratch once per worker count on one local
Ray cluster. Ray start-up and a warm-up run are excluded; each timed run starts from an empty output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.imageset import open_imageset
from pipeline.ingest import IngestConfig, ingest

PHOTO_SUFFIXES = (".png", ".jpg")


def skimage_photos() -> list[Path]:
    """The image files bundled with scikit-image (sorted)."""
    import skimage.data

    d = Path(skimage.data.__file__).parent
    return sorted(p for p in d.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``spar bench ingest``."""
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time (default 1,2)")
    p.add_argument(
        "--copies", type=int, default=3, help="copies of the photo set (more images, steadier timing)"
    )
    p.add_argument("--recipe", choices=("paper", "small"), default="paper",
                   help="paper: DESIGN §2 sizes (2048x1024, short side >= 512); small: 256x128, >= 128")  # fmt: skip
    p.add_argument("--shards-per-worker", type=int, default=4, help="shards per worker (sets shard_size)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")


def _make_sources(dst: Path, copies: int) -> int:
    photos = skimage_photos()
    for c in range(copies):
        (dst / f"c{c}").mkdir(parents=True, exist_ok=True)
        for p in photos:
            shutil.copyfile(p, dst / f"c{c}" / p.name)
    return len(photos) * copies


def cpu_breakdown(files: list[Path], cfg: IngestConfig) -> dict[str, float]:
    """CPU seconds per image for each step, in this process (no Ray): robust to other load on the machine."""
    from pipeline.imageset import pixel_sha256
    from pipeline.ingest import apply_augmentation, augmentation_for, decode_source, encode_png

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


def run(args: argparse.Namespace) -> int:
    """Time ingest at each worker count; print a table and the speed-up."""
    from pipeline.raycluster import init_ray

    counts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    base = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="spar-bench-ingest-"))
    try:
        n = _make_sources(base / "src", args.copies)
        small = dict(target_long=256, target_short=128, min_short=128) if args.recipe == "small" else {}
        shard_size = max(1, -(-n // (max(counts) * args.shards_per_worker)))
        cfg = IngestConfig(shard_size=shard_size, **small)
        init_ray(num_cpus=max(counts))
        ingest(str(base / "src" / "c0"), str(base / "warmup"), cfg, workers=max(counts), progress=False)
        results = []
        for w in counts:
            out = base / f"out-w{w}"
            shutil.rmtree(out, ignore_errors=True)
            load0 = os.getloadavg()[0]
            t = time.perf_counter()
            s = ingest(str(base / "src"), str(out), cfg, workers=w, progress=False)
            wall = time.perf_counter() - t
            recs = open_imageset(str(out)).records
            tar_bytes = sum(f.stat().st_size for f in (out / "images").glob("shard-*.tar"))
            results.append(
                {
                    "workers": w,
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
                    "mean_output_megapixels": round(
                        sum(r.height * r.width for r in recs) / len(recs) / 1e6, 3
                    ),
                    "tar_bytes_per_image": round(tar_bytes / len(recs)),
                }
            )
        cpu = cpu_breakdown(skimage_photos(), cfg)
        fps = {r["fingerprint"] for r in results}
        info = {
            "recipe": args.recipe,
            "shard_size": shard_size,
            "cpu_count": os.cpu_count(),
            "machine": platform.platform(),
            "same_fingerprint_across_worker_counts": len(fps) == 1,
            "results": results,
            "cpu_seconds_per_image": {k: round(v, 5) for k, v in cpu.items()},
        }
        print(f"ingest bench: {n} inputs ({args.copies} copies of {n // args.copies} scikit-image files), "
              f"recipe={args.recipe}, shard_size={shard_size}, {os.cpu_count()} CPUs")  # fmt: skip
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
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=2) + "\n")
        return 0
    finally:
        if not args.workdir:
            shutil.rmtree(base, ignore_errors=True)
