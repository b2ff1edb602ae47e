"""The GPU check's ``correctness`` section: the teacher and the single pass on the device, in fp32 (and tf32 on
CUDA) and under bf16/fp16 autocast, against an independent CPU fp32 reference (the naive one-window-at-a-time
teacher of :mod:`pipeline.bench.teacher`) on a real photo, judged by the tolerances of :mod:`.plan`."""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch

from pipeline.bench.gpu.context import Context, photo, strict_sdpa, tf32
from pipeline.bench.gpu.plan import PHOTO, REL_TOL, TOLERANCE_NOTE, UNIT_ROUNDOFF
from pipeline.bench.gpu.report import check, say
from pipeline.bench.gpu.runner import Deadline
from pipeline.bench.teacher import naive_teacher_fp32
from spar_core.backbones import Backbone
from spar_core.sliding import num_windows, sliding_window_features

STRIDE = 24
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Error of ``y`` against ``ref`` (both (..., D), compared in float64 on CPU)."""
    a = y.detach().cpu().double()
    b = ref.detach().cpu().double()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {
        "rel_l2": float((a - b).norm() / b.norm()),
        "cosine_mean": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "max_abs_over_ref_rms": float((a - b).abs().max() / b.pow(2).mean().sqrt()),
    }


def _precisions(device: str) -> list[str]:
    return ["fp32", "tf32", "bf16", "fp16"] if device.startswith("cuda") else ["fp32", "bf16", "fp16"]


def section_correctness(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Teacher and single pass on the device vs the CPU fp32 reference, per backbone and precision."""
    res["tolerance"] = {"rel_l2": REL_TOL, "note": TOLERANCE_NOTE}
    res["reference"] = "CPU fp32, naive teacher (one window per forward, folded one window at a time)"
    res["cases"] = []
    for name, h, w in ctx.plan.correctness:
        if dl.left() < 0:
            res.setdefault("skipped", []).append(f"{name}: out of time")
            continue
        bb = ctx.cpu_model(name)
        x = bb.normalize(torch.from_numpy(photo(h, w))[None])  # (1, 3, H, W) float32
        ref, ref_t, ref_s = _reference(bb, x, name)
        say(f"correctness: {name} {h}x{w}: CPU fp32 reference in {ref['reference_seconds']} s")
        dev_bb = copy.deepcopy(bb).to(ctx.device)
        xd = x.to(ctx.device)
        for prec in _precisions(ctx.device):
            case = _case(ctx, dev_bb, xd, ref, prec, ref_t, ref_s)
            res["cases"].append(case)
            _record(res, case, name, prec)
            ctx.save()
        del dev_bb, xd
        ctx.free()


def _reference(bb: Backbone, x: torch.Tensor, name: str) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """The CPU fp32 teacher (naive) and single pass of ``x`` (1, 3, H, W), and the case fields they fix."""
    h, w = x.shape[2:]
    crop = bb.native_size
    t = time.perf_counter()
    with torch.no_grad():
        ref_t = naive_teacher_fp32(bb, x, crop, STRIDE)  # (1, H/p, W/p, D)
        ref_s = bb.dense(x)  # (1, H/p, W/p, D)
    ref = {
        "backbone": name,
        "input": {"photo": PHOTO, "size": [h, w], "resize": "PIL bicubic"},
        "crop": crop,
        "stride": STRIDE,
        "windows": num_windows(h, w, crop, STRIDE),
        "shape": list(ref_t.shape),
        "teacher_ref_norm": float(ref_t.double().norm()),
        "single_ref_norm": float(ref_s.double().norm()),
        "reference_seconds": round(time.perf_counter() - t, 2),
    }
    return ref, ref_t, ref_s


def _case(
    ctx: Context,
    dev_bb: Backbone,
    xd: torch.Tensor,
    ref: dict[str, Any],
    prec: str,
    ref_t: torch.Tensor,
    ref_s: torch.Tensor,
) -> dict[str, Any]:
    """Teacher and single pass on the device in ``prec``, each compared with its reference and judged."""
    amp = AMP.get(prec)
    model = copy.deepcopy(dev_bb).precast_for_autocast(amp) if amp is not None else dev_bb
    with tf32(prec == "tf32"), strict_sdpa(prec == "fp32"), torch.no_grad():
        y_t = sliding_window_features(
            model, xd, ref["crop"], STRIDE, ctx.plan.correctness_window_batch, autocast_dtype=amp
        )
        with torch.autocast(xd.device.type, dtype=amp, enabled=amp is not None):
            y_s = model.dense(xd).float()
    case = {**ref, "precision": prec, "device": ctx.device, "teacher": compare(y_t, ref_t)}
    case["single"] = compare(y_s, ref_s)
    tol = REL_TOL[prec]
    for part in ("teacher", "single"):
        e = case[part]
        e["units_of_roundoff"] = e["rel_l2"] / UNIT_ROUNDOFF[prec]
        e["ok"] = bool(
            math.isfinite(e["rel_l2"]) and e["rel_l2"] <= tol and e["cosine_mean"] >= 1 - 2 * tol * tol
        )
    return case


def _record(res: dict[str, Any], case: dict[str, Any], name: str, prec: str) -> None:
    tol = REL_TOL[prec]
    check(
        res,
        f"{name} {prec}",
        case["teacher"]["ok"] and case["single"]["ok"],
        f"teacher rel {case['teacher']['rel_l2']:.2e}, single rel {case['single']['rel_l2']:.2e}, tol {tol:.1e}",
    )
    say(
        f"correctness: {name} {prec}: teacher rel {case['teacher']['rel_l2']:.2e} "
        f"cos {case['teacher']['cosine_mean']:.6f}, single rel {case['single']['rel_l2']:.2e} (tol {tol:.1e})"
    )
