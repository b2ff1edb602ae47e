"""The GPU check's ``projection`` section: the paper-scale precompute (25k SA-1B-like views, SigLIP2 crop 512
stride 24, the ingest recipe's sizes) from the measured rate: windows, TFLOPs, device-hours, cache bytes."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.bench.gpu.context import Context
from pipeline.bench.gpu.report import check, say
from pipeline.bench.gpu.runner import Deadline
from pipeline.bench.measure import SIGLIP2_B16_512, vit_dense_flops
from pipeline.data.augment import augmentation_for
from pipeline.data.config import IngestConfig
from spar_core.sliding import num_windows

PAPER_VIEWS = 25_000
CROP, STRIDE = 512, 24


def sa1b_like_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` SA-1B-like original sizes (H, W): short side 1500 (SA-1B's released resolution), long side 2000
    (4:3, 50%), 2250 (3:2, 40%) or 2667 (16:9, 10%), landscape 80% / portrait 20% (an assumption, stated in the
    report)."""
    rng = np.random.default_rng(seed)
    longs = rng.choice([2000, 2250, 2667], size=n, p=[0.5, 0.4, 0.1])
    portrait = rng.random(n) < 0.2
    return [(int(lg), 1500) if pt else (1500, int(lg)) for lg, pt in zip(longs, portrait, strict=True)]


def project_precompute(
    sizes: list[tuple[int, int]],
    crop: int,
    stride: int,
    window_flops: float,
    dim: int,
    patch: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Windows, FLOPs and float16 cache bytes of precomputing the ingest recipe's views of ``sizes``.

    Each original gets the paper's frozen augmentation (``pipeline.data.ingest`` defaults: fit 2048x1024 x U(0.5, 1),
    short side >= 512, crop with prob 0.5, snap to 16), drawn as ingest draws it for key ``sa1b-<i>``.
    """
    cfg = IngestConfig(seed=seed)
    windows = np.empty(len(sizes), dtype=np.int64)
    tokens = np.empty(len(sizes), dtype=np.int64)
    pixels = np.empty(len(sizes), dtype=np.int64)
    for i, (h, w) in enumerate(sizes):
        _, _, ch, cw = augmentation_for(f"sa1b-{i}", h, w, cfg)["crop"]
        windows[i] = num_windows(ch, cw, crop, stride)
        tokens[i] = (ch // patch) * (cw // patch)
        pixels[i] = ch * cw
    total_w = int(windows.sum())
    return {
        "views": len(sizes),
        "windows": total_w,
        "windows_per_view_mean": float(windows.mean()),
        "windows_per_view_p10_p50_p90": [float(v) for v in np.percentile(windows, [10, 50, 90])],
        "megapixels_per_view_mean": float(pixels.mean() / 1e6),
        "tflops": total_w * window_flops / 1e12,
        "cache_bytes_float16_raw": int(tokens.sum()) * dim * 2,
    }


def section_projection(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Paper-scale precompute cost (SigLIP2 B/16 crop 512 stride 24) from the measured rate."""
    arch = SIGLIP2_B16_512
    win_flops = vit_dense_flops(arch, CROP, CROP)["flops"]
    n = ctx.plan.projection_views
    proj = project_precompute(sa1b_like_sizes(n), CROP, STRIDE, win_flops, arch.dim, arch.patch)
    res["assumptions"] = {
        "teacher": "siglip2-vit-b16-512, crop 512, stride 24, bf16",
        "views": n,
        "originals": "short side 1500, long 2000/2250/2667 (50/40/10%), 20% portrait",
        "ingest": "pipeline.data.ingest IngestConfig() defaults (the paper's recipe)",
        "window_gflops": win_flops / 1e9,
    }
    if n != PAPER_VIEWS:
        res["assumptions"]["scaled_to"] = PAPER_VIEWS
        scale = PAPER_VIEWS / n
        for k in ("windows", "tflops", "cache_bytes_float16_raw"):
            proj[k] = proj[k] * scale
        proj["views"] = PAPER_VIEWS
    res.update(proj)
    tflops_s, source = _rate(ctx)
    res["rate_tflops"] = tflops_s
    res["rate_source"] = source
    res["device"] = ctx.device
    if tflops_s > 0:
        res["device_hours"] = res["tflops"] / tflops_s / 3600
        res["windows_per_s"] = tflops_s * 1e12 / win_flops
        say(
            f"projection: {res['windows']:.3g} windows, {res['tflops']:.3g} TFLOP, {res['device_hours']:.1f} "
            f"{ctx.device}-hours at {tflops_s:.1f} TFLOP/s, cache {res['cache_bytes_float16_raw'] / 1e9:.0f} GB float16"
        )
    check(res, "projection computed", res["windows"] > 0 and tflops_s > 0)


def _rate(ctx: Context) -> tuple[float, str]:
    """The SigLIP2 teacher's TFLOP/s and where it comes from: measured, else another teacher's measured fraction
    of the bf16 matmul rate, else half of that rate."""
    rate = ctx.teacher_rates.get("siglip2-vit-b16-512")
    bf16 = ctx.matmul_tflops.get("bf16")
    if rate is not None:
        return rate["tflops"], f"measured SigLIP2 crop-512 teacher ({rate['windows_per_s']:.0f} win/s)"
    if ctx.teacher_rates and bf16:
        name, r = next(iter(ctx.teacher_rates.items()))
        return r[
            "fraction"
        ] * bf16, f"measured fraction {r['fraction']:.2f} of the bf16 matmul rate (teacher {name})"
    if bf16:
        return 0.5 * bf16, "assumed 0.5 of the measured bf16 matmul rate"
    return 0.0, "no measured rate"
