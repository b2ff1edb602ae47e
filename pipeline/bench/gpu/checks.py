"""The GPU check's sections on the device: ``environment``, ``correctness``, ``throughput`` and ``projection``
(what each measures: :mod:`pipeline.bench.gpu`; ``pipeline``, the whole run, is :mod:`.end_to_end`)."""

from __future__ import annotations

import contextlib
import copy
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.bench.gpu.end_to_end import section_pipeline
from pipeline.bench.gpu.harness import (
    PHOTO,
    REL_TOL,
    TOLERANCE_NOTE,
    UNIT_ROUNDOFF,
    Context,
    Deadline,
    check,
    headline,
    photo,
    say,
    tf32,
)
from pipeline.bench.measure import cpu_name, fastest, matmul_gflops
from pipeline.bench.teacher import naive_teacher_fp32
from pipeline.common.tracking import git_commit
from pipeline.data.augment import augmentation_for
from pipeline.data.config import IngestConfig
from spar_core.backbones import Backbone
from spar_core.flops import SIGLIP2_B16_512, ViTArch, vit_arch, vit_dense_flops
from spar_core.sliding import num_windows, sliding_window_features

STRIDE = 24  # the paper's teacher stride


# ------------------------------------------------------------------------------------------ shared


def _skip(res: dict[str, Any], what: str) -> None:
    res.setdefault("skipped", []).append(f"{what}: out of time")


# ------------------------------------------------------------------------------------------ environment

LIBRARIES = ("numpy", "open_clip", "timm", "ray", "mlflow", "zarr", "webdataset", "pyarrow", "fsspec")
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def section_environment(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Versions, the accelerator and the measured matmul rates."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    res["versions"] = versions | {"cudnn": cudnn} | {m: _version(m) for m in LIBRARIES}
    res["git_commit"] = git_commit()
    res["host"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    res["device"] = ctx.device
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        res["gpu"] = {
            "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(), "bf16_supported": torch.cuda.is_bf16_supported(),
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }  # fmt: skip
    ctx.save()
    p, rates = ctx.plan, {}
    res["matmul_tflops"], res["matmul_n"] = rates, p.matmul_n
    for name, dt in MATMUL_DTYPES.items():  # TFLOP/s of an n^3 matmul; fp32 and tf32 skipped once out of time
        if name == "tf32" and not ctx.cuda:
            continue
        if dl.left() < 0 and name in ("fp32", "tf32"):
            _skip(res, f"matmul {name}")
            continue
        with tf32(name == "tf32"):
            rates[name] = matmul_gflops(dt, p.matmul_n, p.matmul_seconds, ctx.device, p.matmul_inner) / 1e3
        say(f"environment: matmul {name} {rates[name]:.2f} TFLOP/s (n={p.matmul_n})")
        ctx.save()
    ctx.matmul_tflops.update(rates)
    gpu = res.get("gpu", {})
    headline(res, f"device {gpu.get('name', ctx.device)}, torch {versions['torch']}, CUDA {versions['cuda']}; "
                  "matmul TFLOP/s " + ", ".join(f"{k} {v:.3g}" for k, v in rates.items()))  # fmt: skip
    check(
        res, "matmul rates measured", bool(rates) and all(v > 0 and math.isfinite(v) for v in rates.values())
    )


def _version(mod: str) -> str | None:
    try:
        return version({"open_clip": "open_clip_torch"}.get(mod, mod))
    except Exception:  # noqa: BLE001 - absent or unreadable: reported as such
        return None


# ------------------------------------------------------------------------------------------ correctness

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Error of ``y`` against ``ref`` (both (..., D), compared in float64 on CPU)."""
    a, b = y.detach().cpu().double(), ref.detach().cpu().double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"rel_l2": float((a - b).norm() / b.norm()), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "max_abs_over_ref_rms": float((a - b).abs().max() / b.pow(2).mean().sqrt())}  # fmt: skip


def section_correctness(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Teacher and single pass on the device vs the CPU fp32 reference, per backbone and precision."""
    res["tolerance"] = {"rel_l2": REL_TOL, "note": TOLERANCE_NOTE}
    res["reference"] = "CPU fp32, naive teacher (one window per forward, folded one window at a time)"
    res["cases"] = []
    precisions = ["fp32", "tf32", "bf16", "fp16"] if ctx.cuda else ["fp32", "bf16", "fp16"]
    for name, h, w in ctx.plan.correctness:
        if dl.left() < 0:
            _skip(res, name)
            continue
        bb = ctx.cpu_model(name)
        x = bb.normalize(torch.from_numpy(photo(h, w))[None])  # (1, 3, H, W) float32
        ref, ref_t, ref_s = _reference(bb, x, name)
        say(f"correctness: {name} {h}x{w}: CPU fp32 reference in {ref['reference_seconds']} s")
        dev_bb, xd = copy.deepcopy(bb).to(ctx.device), x.to(ctx.device)
        for prec in precisions:
            case = _case(ctx, dev_bb, xd, ref, prec, ref_t, ref_s)
            res["cases"].append(case)
            t, s, tol = case["teacher"], case["single"], REL_TOL[prec]
            ok = check(res, f"{name} {prec}", t["ok"] and s["ok"],
                       f"teacher rel {t['rel_l2']:.2e}, single rel {s['rel_l2']:.2e}, tol {tol:.1e}")  # fmt: skip
            headline(res, f"correctness {name} {prec}: teacher rel {t['rel_l2']:.2e} cos {t['cosine_mean']:.6f}, "
                          f"single rel {s['rel_l2']:.2e} (tol {tol:.1e}) " + ("ok" if ok else "FAIL"))  # fmt: skip
            ctx.save()
        del dev_bb, xd
        ctx.free()


def _reference(bb: Backbone, x: torch.Tensor, name: str) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The CPU fp32 teacher (naive) and single pass of ``x`` (1, 3, H, W), and the case fields they fix."""
    h, w = x.shape[2:]
    crop, t = bb.native_size, time.perf_counter()
    with torch.no_grad():
        ref_t = naive_teacher_fp32(bb, x, crop, STRIDE)  # (1, H/p, W/p, D)
        ref_s = bb.dense(x)  # (1, H/p, W/p, D)
    ref = {"backbone": name, "input": {"photo": PHOTO, "size": [h, w], "resize": "PIL bicubic"}, "crop": crop,
           "stride": STRIDE, "windows": num_windows(h, w, crop, STRIDE), "shape": list(ref_t.shape),
           "teacher_ref_norm": float(ref_t.double().norm()), "single_ref_norm": float(ref_s.double().norm()),
           "reference_seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
    return ref, ref_t, ref_s


def _case(ctx: Context, dev_bb: Backbone, xd: torch.Tensor, ref: dict[str, Any], prec: str, ref_t: torch.Tensor,
          ref_s: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """Teacher and single pass on the device in ``prec``, each compared with its reference and judged."""
    amp = AMP.get(prec)
    model = copy.deepcopy(dev_bb).precast_for_autocast(amp) if amp is not None else dev_bb
    strict = (
        sdpa_kernel(SDPBackend.MATH) if prec == "fp32" else contextlib.nullcontext()
    )  # no TF32 in attention
    with tf32(prec == "tf32"), strict, torch.no_grad():
        y_t = sliding_window_features(model, xd, ref["crop"], STRIDE, ctx.plan.correctness_window_batch, amp)
        with torch.autocast(xd.device.type, dtype=amp, enabled=amp is not None):
            y_s = model.dense(xd).float()
    case = {**ref, "precision": prec, "device": ctx.device, "teacher": compare(y_t, ref_t), "single": compare(y_s, ref_s)}  # fmt: skip
    tol = REL_TOL[prec]
    for e in (case["teacher"], case["single"]):
        e["units_of_roundoff"] = e["rel_l2"] / UNIT_ROUNDOFF[prec]
        e["ok"] = bool(
            math.isfinite(e["rel_l2"]) and e["rel_l2"] <= tol and e["cosine_mean"] >= 1 - 2 * tol * tol
        )
    return case


# ------------------------------------------------------------------------------------------ throughput

NOTES = [
    "attention runs through F.scaled_dot_product_attention (fused kernels on CUDA) in both readouts",
    "channels_last does not apply: the only convolution is the 16x16/16 patch embedding (one GEMM)",
    "fold_overhead = 1 - teacher windows/s / model-only windows/s at the same window batch: the share of the "
    "teacher's time spent gathering windows, upsampling and folding them (fp32, memory-bound)",
]


def section_throughput(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Teacher windows/s, achieved fraction of the measured bf16 matmul rate, single pass vs teacher."""
    h, w = ctx.plan.throughput_image
    res.update(image=[h, w], precision="bf16 autocast, weights pre-cast (as precompute runs the teacher)",
               matmul_bf16_tflops=ctx.matmul_tflops.get("bf16"), notes=list(NOTES), backbones=[], targets=[])  # fmt: skip
    img = torch.from_numpy(photo(h, w))[None]  # (1, H, W, 3) uint8
    for name, crop, batches in ctx.plan.throughput:
        if dl.left() < 0:
            _skip(res, name)
            continue
        row: dict[str, Any] = {"backbone": name, "crop": crop, "stride": STRIDE, "sweep": []}
        res["backbones"].append(row)
        _throughput_backbone(ctx, res, row, img, batches, dl)
        ctx.free()
    check(res, "teacher rates measured", bool(ctx.teacher_rates))


@dataclass
class _Bench:
    """One backbone on the device in bf16 (weights pre-cast) and the image it runs the teacher on."""

    ctx: Context
    bb: Backbone
    arch: ViTArch
    crop: int
    x: torch.Tensor  # (1, 3, H, W) normalised, on the device
    windows: int
    window_flops: float

    def fraction(self, tflops: float) -> float | None:
        peak = self.ctx.matmul_tflops.get("bf16")
        return tflops / peak if peak else None

    def model_only(self, xb: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(xb.device.type, dtype=torch.bfloat16):
            return self.bb.dense(xb)  # (B, c/p, c/p, D)

    def teacher(self, batch: int) -> torch.Tensor:
        return sliding_window_features(
            self.bb, self.x, self.crop, STRIDE, batch, autocast_dtype=torch.bfloat16
        )


def _throughput_backbone(ctx: Context, res: dict[str, Any], row: dict[str, Any], img: torch.Tensor,
                         batches: tuple[int, ...], dl: Deadline) -> None:  # fmt: skip
    """The window-batch sweep and the single pass of one backbone (fills ``row``)."""
    name, crop = row["backbone"], row["crop"]
    h, w = img.shape[1:3]
    bb = copy.deepcopy(ctx.cpu_model(name)).to(ctx.device).precast_for_autocast(torch.bfloat16)
    arch = vit_arch(bb)
    x = bb.normalize(img.to(ctx.device))  # (1, 3, H, W)
    b = _Bench(
        ctx, bb, arch, crop, x, num_windows(h, w, crop, STRIDE), vit_dense_flops(arch, crop, crop)["flops"]
    )
    row.update(windows=b.windows, window_gflops=b.window_flops / 1e9)
    for batch in batches:
        if dl.left() < 0 and row["sweep"]:
            _skip(res, f"{name} batch {batch}")
            continue
        s = _sweep_point(b, batch)
        row["sweep"].append(s)
        if "error" not in s:
            f = s["teacher_fraction_of_matmul"]
            say(f"throughput: {name} batch {batch}: model {s['model_windows_per_s']:.0f} win/s, teacher "
                f"{s['teacher_windows_per_s']:.0f} win/s = {s['teacher_tflops']:.3g} TFLOP/s"
                + (f" = {f:.2f} of matmul" if f is not None else ""))  # fmt: skip
        ctx.save()
    ok = [s for s in row["sweep"] if "error" not in s]
    if ok:
        best = max(ok, key=lambda s: s["teacher_windows_per_s"])
        _record_best(b, res, row, best)
        _single_pass(b, res, row, best)


def _sweep_point(b: _Bench, batch: int) -> dict[str, Any]:
    """The model alone on ``batch`` windows and the full teacher at window batch ``batch``."""
    ctx = b.ctx
    try:
        xb = torch.randn(batch, 3, b.crop, b.crop, device=ctx.device)
        ctx.peak_reset()
        t_model = fastest(lambda: b.model_only(xb), 3, ctx.device)
        mem_model = ctx.peak_gib()
        ctx.peak_reset()
        t_teacher = fastest(lambda: b.teacher(batch), ctx.plan.throughput_repeats, ctx.device)
        tf, model_tf = b.windows * b.window_flops / t_teacher / 1e12, batch * b.window_flops / t_model / 1e12
        return {"window_batch": batch, "model_windows_per_s": batch / t_model, "model_tflops": model_tf,
                "model_fraction_of_matmul": b.fraction(model_tf), "model_peak_gib": mem_model,
                "teacher_seconds": t_teacher, "teacher_windows_per_s": b.windows / t_teacher, "teacher_tflops": tf,
                "teacher_fraction_of_matmul": b.fraction(tf), "teacher_peak_gib": ctx.peak_gib(),
                "fold_overhead": 1 - (b.windows / t_teacher) / (batch / t_model)}  # fmt: skip
    except torch.cuda.OutOfMemoryError as e:  # a too-large batch is a finding, not the end of the sweep
        ctx.free()
        return {"window_batch": batch, "error": f"out of memory: {str(e).splitlines()[0]}"}


def _record_best(b: _Bench, res: dict[str, Any], row: dict[str, Any], best: dict[str, Any]) -> None:
    """The fastest sweep point: the backbone's teacher rate (for the projection) and its target."""
    name, f = row["backbone"], best["teacher_fraction_of_matmul"]
    row["best"] = best
    b.ctx.teacher_rates[name] = {"crop": b.crop, "windows_per_s": best["teacher_windows_per_s"],
                                 "tflops": best["teacher_tflops"], "fraction": f or 0.0,
                                 "window_flops": b.window_flops, "window_batch": best["window_batch"]}  # fmt: skip
    headline(res, f"throughput {name} crop {b.crop}: {best['teacher_windows_per_s']:.0f} win/s at batch "
                  f"{best['window_batch']}, {best['teacher_tflops']:.1f} TFLOP/s"
                  + (f" = {f:.2f} of matmul" if f is not None else "")
                  + f", fold overhead {best['fold_overhead']:.2f}, peak {best.get('teacher_peak_gib')} GiB")  # fmt: skip
    if f is not None:
        target = {"name": f"{name} teacher >= 0.5 of the bf16 matmul rate", "met": f >= 0.5, "value": f}
        res["targets"].append(target)
        headline(res, f"target {target['name']}: {'met' if target['met'] else 'NOT met'} ({f:.2f})")


def _single_pass(b: _Bench, res: dict[str, Any], row: dict[str, Any], best: dict[str, Any]) -> None:
    """One forward over the whole image, against the best teacher."""
    ctx = b.ctx
    h, w = b.x.shape[2:]
    ctx.peak_reset()
    t_single = fastest(lambda: b.model_only(b.x), 3, ctx.device)
    sp = vit_dense_flops(b.arch, h, w)
    row["single_pass"] = sp_row = {
        "seconds": t_single, "tflops": sp["flops"] / t_single / 1e12,
        "fraction_of_matmul": b.fraction(sp["flops"] / t_single / 1e12),
        "attention_share_of_flops": sp["attention_flops"] / sp["flops"], "peak_gib": ctx.peak_gib(),
        "teacher_over_single_seconds": best["teacher_seconds"] / t_single,
        "teacher_over_single_flops": b.windows * b.window_flops / sp["flops"],
    }  # fmt: skip
    headline(res, f"  single pass {h}x{w}: {t_single * 1e3:.1f} ms, teacher/single "
                  f"{sp_row['teacher_over_single_seconds']:.1f}x time ({sp_row['teacher_over_single_flops']:.1f}x FLOPs)")  # fmt: skip
    ctx.save()


# ------------------------------------------------------------------------------------------ projection

PAPER_VIEWS = 25_000
CROP = 512  # SigLIP2's teacher crop


def sa1b_like_sizes(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` SA-1B-like original sizes (H, W): short side 1500 (SA-1B's released resolution), long side 2000
    (4:3, 50%), 2250 (3:2, 40%) or 2667 (16:9, 10%), landscape 80% / portrait 20% (an assumption, stated in the
    report)."""
    rng = np.random.default_rng(seed)
    longs = rng.choice([2000, 2250, 2667], size=n, p=[0.5, 0.4, 0.1])
    portrait = rng.random(n) < 0.2
    return [(int(lg), 1500) if pt else (1500, int(lg)) for lg, pt in zip(longs, portrait, strict=True)]


def project_precompute(sizes: list[tuple[int, int]], crop: int, stride: int, window_flops: float, dim: int,
                       patch: int, seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Windows, FLOPs and float16 cache bytes of precomputing the ingest recipe's views of ``sizes``.

    Each original gets the paper's frozen augmentation (``pipeline.data.ingest`` defaults: fit 2048x1024 x U(0.5, 1),
    short side >= 512, crop with prob 0.5, snap to 16), drawn as ingest draws it for key ``sa1b-<i>``.
    """
    cfg = IngestConfig(seed=seed)
    views = [augmentation_for(f"sa1b-{i}", h, w, cfg)["crop"][2:] for i, (h, w) in enumerate(sizes)]
    windows = np.array([num_windows(ch, cw, crop, stride) for ch, cw in views], dtype=np.int64)
    tokens = np.array([(ch // patch) * (cw // patch) for ch, cw in views], dtype=np.int64)
    pixels = np.array([ch * cw for ch, cw in views], dtype=np.int64)
    return {"views": len(sizes), "windows": int(windows.sum()), "windows_per_view_mean": float(windows.mean()),
            "windows_per_view_p10_p50_p90": [float(v) for v in np.percentile(windows, [10, 50, 90])],
            "megapixels_per_view_mean": float(pixels.mean() / 1e6), "tflops": int(windows.sum()) * window_flops / 1e12,
            "cache_bytes_float16_raw": int(tokens.sum()) * dim * 2}  # fmt: skip


def section_projection(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Paper-scale precompute cost (SigLIP2 B/16 crop 512 stride 24) from the measured rate."""
    arch, n = SIGLIP2_B16_512, ctx.plan.projection_views
    win_flops = vit_dense_flops(arch, CROP, CROP)["flops"]
    proj = project_precompute(sa1b_like_sizes(n), CROP, STRIDE, win_flops, arch.dim, arch.patch)
    res["assumptions"] = {"teacher": "siglip2-vit-b16-512, crop 512, stride 24, bf16", "views": n,
                          "originals": "short side 1500, long 2000/2250/2667 (50/40/10%), 20% portrait",
                          "ingest": "pipeline.data.ingest IngestConfig() defaults (the paper's recipe)",
                          "window_gflops": win_flops / 1e9}  # fmt: skip
    if n != PAPER_VIEWS:
        res["assumptions"]["scaled_to"] = PAPER_VIEWS
        for k in ("windows", "tflops", "cache_bytes_float16_raw"):
            proj[k] = proj[k] * PAPER_VIEWS / n
        proj["views"] = PAPER_VIEWS
    res.update(proj)
    tflops_s, source = _rate(ctx)
    res.update(rate_tflops=tflops_s, rate_source=source, device=ctx.device)
    if tflops_s > 0:
        res["device_hours"] = res["tflops"] / tflops_s / 3600
        res["windows_per_s"] = tflops_s * 1e12 / win_flops
        headline(res, f"projection 25k SA-1B views, SigLIP2 crop 512 stride 24: {res['windows']:.3g} windows, "
                      f"{res['tflops']:.3g} TFLOP, {res['device_hours']:.1f} {ctx.device}-hours at {tflops_s:.1f} "
                      f"TFLOP/s ({source}), cache {res['cache_bytes_float16_raw'] / 1e9:.0f} GB float16 raw")  # fmt: skip
    check(res, "projection computed", res["windows"] > 0 and tflops_s > 0)


def _rate(ctx: Context) -> tuple[float, str]:
    """The SigLIP2 teacher's TFLOP/s and where it comes from: measured, else another teacher's measured fraction
    of the bf16 matmul rate, else half of that rate."""
    rate, bf16 = ctx.teacher_rates.get("siglip2-vit-b16-512"), ctx.matmul_tflops.get("bf16")
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


SECTION_FNS: dict[str, Callable[[Context, dict[str, Any], Deadline], None]] = {
    "environment": section_environment,
    "correctness": section_correctness,
    "throughput": section_throughput,
    "projection": section_projection,
    "pipeline": section_pipeline,
}
