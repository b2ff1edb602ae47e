"""The GPU check's ``throughput`` section: teacher windows/s and achieved TFLOP/s as a fraction of the measured
bf16 matmul rate over a window-batch sweep (the model alone and the full sliding teacher), then the single pass vs
the teacher on one large image, with peak memory. The best teacher rate per backbone goes to ``ctx.teacher_rates``
for the projection section."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.bench.gpu.context import Context, photo
from pipeline.bench.gpu.report import check, say
from pipeline.bench.gpu.runner import Deadline
from pipeline.bench.measure import ViTArch, fastest, vit_arch, vit_dense_flops
from spar_core.backbones import Backbone
from spar_core.sliding import num_windows, sliding_window_features

STRIDE = 24
NOTES = [
    "attention runs through F.scaled_dot_product_attention (fused kernels on CUDA) in both readouts",
    "channels_last does not apply: the only convolution is the 16x16/16 patch embedding (one GEMM)",
    "fold_overhead = 1 - teacher windows/s / model-only windows/s at the same window batch: the share of the "
    "teacher's time spent gathering windows, upsampling and folding them (fp32, memory-bound)",
]


def section_throughput(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Teacher windows/s, achieved fraction of the measured bf16 matmul rate, single pass vs teacher."""
    p = ctx.plan
    h, w = p.throughput_image
    res["image"] = [h, w]
    res["precision"] = "bf16 autocast, weights pre-cast (as precompute runs the teacher)"
    res["matmul_bf16_tflops"] = ctx.matmul_tflops.get("bf16")
    res["notes"] = list(NOTES)
    res["backbones"] = []
    res["targets"] = []
    img = torch.from_numpy(photo(h, w))[None]  # (1, H, W, 3) uint8
    for name, crop, batches in p.throughput:
        if dl.left() < 0:
            res.setdefault("skipped", []).append(f"{name}: out of time")
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


def _throughput_backbone(
    ctx: Context,
    res: dict[str, Any],
    row: dict[str, Any],
    img: torch.Tensor,
    batches: tuple[int, ...],
    dl: Deadline,
) -> None:
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
            res.setdefault("skipped", []).append(f"{name} batch {batch}: out of time")
            continue
        s = _sweep_point(b, batch)
        row["sweep"].append(s)
        if "error" not in s:
            say(
                f"throughput: {name} batch {batch}: model {s['model_windows_per_s']:.0f} win/s, teacher "
                f"{s['teacher_windows_per_s']:.0f} win/s = {s['teacher_tflops']:.3g} TFLOP/s"
                + (
                    f" = {s['teacher_fraction_of_matmul']:.2f} of matmul"
                    if ctx.matmul_tflops.get("bf16")
                    else ""
                )
            )
        ctx.save()
    ok = [s for s in row["sweep"] if "error" not in s]
    if ok:
        best = max(ok, key=lambda s: s["teacher_windows_per_s"])
        _record_best(b, res, row, best)
        _single_pass(b, row, best)


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
        tf = b.windows * b.window_flops / t_teacher / 1e12
        model_tf = batch * b.window_flops / t_model / 1e12
        s = {
            "window_batch": batch,
            "model_windows_per_s": batch / t_model,
            "model_tflops": model_tf,
            "model_fraction_of_matmul": b.fraction(model_tf),
            "model_peak_gib": mem_model,
            "teacher_seconds": t_teacher,
            "teacher_windows_per_s": b.windows / t_teacher,
            "teacher_tflops": tf,
            "teacher_fraction_of_matmul": b.fraction(tf),
            "teacher_peak_gib": ctx.peak_gib(),
            "fold_overhead": 1 - (b.windows / t_teacher) / (batch / t_model),
        }
    except torch.cuda.OutOfMemoryError as e:  # a too-large batch is a finding, not the end of the sweep
        s = {"window_batch": batch, "error": f"out of memory: {str(e).splitlines()[0]}"}
        ctx.free()
    return s


def _record_best(b: _Bench, res: dict[str, Any], row: dict[str, Any], best: dict[str, Any]) -> None:
    """The fastest sweep point: the backbone's teacher rate (for the projection) and its target."""
    name = row["backbone"]
    row["best"] = best
    b.ctx.teacher_rates[name] = {
        "crop": b.crop,
        "windows_per_s": best["teacher_windows_per_s"],
        "tflops": best["teacher_tflops"],
        "fraction": best["teacher_fraction_of_matmul"] or 0.0,
        "window_flops": b.window_flops,
        "window_batch": best["window_batch"],
    }
    if b.ctx.matmul_tflops.get("bf16"):
        f = best["teacher_fraction_of_matmul"]
        res["targets"].append(
            {"name": f"{name} teacher >= 0.5 of the bf16 matmul rate", "met": f >= 0.5, "value": f}
        )


def _single_pass(b: _Bench, row: dict[str, Any], best: dict[str, Any]) -> None:
    """One forward over the whole image, against the best teacher."""
    ctx = b.ctx
    h, w = b.x.shape[2:]
    ctx.peak_reset()
    t_single = fastest(lambda: b.model_only(b.x), 3, ctx.device)
    sp = vit_dense_flops(b.arch, h, w)
    row["single_pass"] = {
        "seconds": t_single,
        "tflops": sp["flops"] / t_single / 1e12,
        "fraction_of_matmul": b.fraction(sp["flops"] / t_single / 1e12),
        "attention_share_of_flops": sp["attention_flops"] / sp["flops"],
        "peak_gib": ctx.peak_gib(),
        "teacher_over_single_seconds": best["teacher_seconds"] / t_single,
        "teacher_over_single_flops": b.windows * b.window_flops / sp["flops"],
    }
    say(
        f"throughput: {row['backbone']} single pass {h}x{w}: {t_single * 1e3:.1f} ms; teacher/single "
        f"{row['single_pass']['teacher_over_single_seconds']:.1f}x"
    )
    ctx.save()
