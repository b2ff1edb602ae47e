"""The GPU check's sections, in :data:`SECTION_FNS` (what each measures and how they run: the package)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import ray
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.bench import gpu
from pipeline.bench.gpu import REL_TOL, Context, Left, check, headline, say
from pipeline.bench.measure import cpu_name, fastest, matmul_gflops
from pipeline.bench.teacher import naive_teacher_fp32
from pipeline.cache.precompute import PrecomputeConfig
from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, offline_photos, write_photos
from pipeline.common.tasks import init_ray, shutdown_ray
from pipeline.common.tracking import git_commit
from pipeline.data.augment import augmentation_for
from pipeline.data.config import IngestConfig
from pipeline.eval.config import EvalConfig, SegmentConfig
from pipeline.train.config import DistillConfig
from pipeline.workflow.config import DemoConfig, Recipe, RunConfig
from pipeline.workflow.orchestrator import Extras, PipelineResult, Reporter, run_pipeline
from spar_core.backbones import Backbone
from spar_core.flops import SIGLIP2_B16_512, vit_arch, vit_dense_flops
from spar_core.sliding import num_windows, sliding_window_features

Res = dict[str, Any]
STRIDE = 24  # the paper's teacher stride
LIBRARIES = ("numpy", "open_clip", "timm", "ray", "mlflow", "zarr", "webdataset", "pyarrow", "fsspec")
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _skip(res: Res, what: str, why: str = "") -> None:
    res.setdefault("skipped", []).append(f"{what}: out of time{why}")


def _version(mod: str) -> str | None:
    try:
        return version({"open_clip": "open_clip_torch"}.get(mod, mod))
    except Exception:  # noqa: BLE001 - absent or unreadable: reported as such
        return None


def section_environment(ctx: Context, res: Res, left: Left) -> None:
    """Versions, the host, the accelerator and the matmul rates (fp32 and tf32 skipped once out of time)."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    res["versions"] = versions | {"cudnn": cudnn} | {m: _version(m) for m in LIBRARIES}
    res.update(git_commit=git_commit(), device=ctx.device)
    res["host"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if ctx.cuda:
        props, cuda = torch.cuda.get_device_properties(0), torch.backends.cuda
        res["gpu"] = {
            "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(), "bf16_supported": torch.cuda.is_bf16_supported(),
            "sdpa_flash": cuda.flash_sdp_enabled(), "sdpa_mem_efficient": cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": getattr(cuda, "cudnn_sdp_enabled", lambda: None)(),
            "matmul_allow_tf32": cuda.matmul.allow_tf32, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }  # fmt: skip
    ctx.save()
    p, rates = ctx.plan, ctx.matmul_tflops
    res["matmul_tflops"], res["matmul_n"] = rates, p.matmul_n
    for name, dt in MATMUL_DTYPES.items():  # TFLOP/s of an n^3 matmul
        if name == "tf32" and not ctx.cuda:
            continue
        if left() < 0 and name in ("fp32", "tf32"):
            _skip(res, f"matmul {name}")
            continue
        with gpu.tf32(name == "tf32"):
            rates[name] = matmul_gflops(dt, p.matmul_n, p.matmul_seconds, ctx.device, p.matmul_inner) / 1e3
        say(f"environment: matmul {name} {rates[name]:.2f} TFLOP/s (n={p.matmul_n})")
        ctx.save()
    device = res.get("gpu", {}).get("name", ctx.device)
    listed = ", ".join(f"{k} {v:.3g}" for k, v in rates.items())
    headline(
        res, f"device {device}, torch {versions['torch']}, CUDA {versions['cuda']}; matmul TFLOP/s {listed}"
    )
    ok = bool(rates) and all(v > 0 and math.isfinite(v) for v in rates.values())
    check(res, "matmul rates measured", ok)


def _compare(y: torch.Tensor, ref: torch.Tensor, prec: str) -> Res:
    """Error of ``y`` against ``ref`` (both (..., D), in float64 on CPU), judged by ``prec``'s tolerance."""
    a, b = y.detach().cpu().double(), ref.detach().cpu().double()
    cos, rel, tol = F.cosine_similarity(a, b, dim=-1), float((a - b).norm() / b.norm()), REL_TOL[prec]
    ok = math.isfinite(rel) and rel <= tol and float(cos.mean()) >= 1 - 2 * tol * tol
    return {"rel_l2": rel, "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "max_abs_over_ref_rms": float((a - b).abs().max() / b.pow(2).mean().sqrt()),
            "units_of_roundoff": rel / gpu.UNIT_ROUNDOFF[prec], "ok": bool(ok)}  # fmt: skip


def section_correctness(ctx: Context, res: Res, left: Left) -> None:
    """Teacher and single pass on the device vs the CPU fp32 naive reference, per backbone and precision."""
    res.update(tolerance={"rel_l2": REL_TOL, "note": gpu.TOLERANCE_NOTE}, cases=[])
    res["reference"] = "CPU fp32, naive teacher (one window per forward, folded one window at a time)"
    for name, h, w in ctx.plan.correctness:
        if left() < 0:
            _skip(res, name)
            continue
        bb, t = ctx.cpu_model(name), time.perf_counter()
        crop, x = bb.native_size, bb.normalize(torch.from_numpy(gpu.photo(h, w))[None])  # (1, 3, H, W)
        with torch.no_grad():
            ref_t, ref_s = naive_teacher_fp32(bb, x, crop, STRIDE), bb.dense(x)  # (1, H/p, W/p, D) each
        ref = {"backbone": name, "input": {"photo": gpu.PHOTO, "size": [h, w], "resize": "PIL bicubic"},
               "crop": crop, "stride": STRIDE, "windows": num_windows(h, w, crop, STRIDE),
               "shape": list(ref_t.shape), "teacher_ref_norm": float(ref_t.double().norm()),
               "single_ref_norm": float(ref_s.double().norm()),
               "reference_seconds": round(time.perf_counter() - t, 2)}  # fmt: skip
        say(f"correctness: {name} {h}x{w}: CPU fp32 reference in {ref['reference_seconds']} s")
        dev_bb, xd = copy.deepcopy(bb).to(ctx.device), x.to(ctx.device)
        for prec in ("fp32", "tf32", "bf16", "fp16") if ctx.cuda else ("fp32", "bf16", "fp16"):
            amp = AMP.get(prec)
            model = copy.deepcopy(dev_bb).precast_for_autocast(amp) if amp is not None else dev_bb
            strict = sdpa_kernel(SDPBackend.MATH) if prec == "fp32" else contextlib.nullcontext()  # no TF32
            with gpu.tf32(prec == "tf32"), strict, torch.no_grad():
                y_t = sliding_window_features(model, xd, crop, STRIDE, ctx.plan.correctness_window_batch, amp)
                with torch.autocast(xd.device.type, dtype=amp, enabled=amp is not None):
                    y_s = model.dense(xd).float()
            te, si = _compare(y_t, ref_t, prec), _compare(y_s, ref_s, prec)
            res["cases"].append({**ref, "precision": prec, "device": ctx.device, "teacher": te, "single": si})
            rels = (
                f"teacher rel {te['rel_l2']:.2e}",
                f"single rel {si['rel_l2']:.2e}",
                f"tol {REL_TOL[prec]:.1e}",
            )
            ok = check(res, f"{name} {prec}", te["ok"] and si["ok"], ", ".join(rels))
            headline(res, f"correctness {name} {prec}: {rels[0]} cos {te['cosine_mean']:.6f}, {rels[1]} "
                          f"({rels[2]}) " + ("ok" if ok else "FAIL"))  # fmt: skip
            ctx.save()
        del dev_bb, xd, model
        ctx.free()


NOTES = [
    "attention runs through F.scaled_dot_product_attention (fused kernels on CUDA) in both readouts",
    "channels_last does not apply: the only convolution is the 16x16/16 patch embedding (one GEMM)",
    "fold_overhead = 1 - teacher windows/s / model-only windows/s at the same window batch: the share of the "
    "teacher's time spent gathering windows, upsampling and folding them (fp32, memory-bound)",
]


def _model_only(bb: Backbone, xb: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), torch.autocast(xb.device.type, dtype=torch.bfloat16):
        return bb.dense(xb)  # (B, h/p, w/p, D)


def _fraction(ctx: Context, tflops: float) -> float | None:
    """``tflops`` as a fraction of the measured bf16 matmul rate (None when it was not measured)."""
    peak = ctx.matmul_tflops.get("bf16")
    return tflops / peak if peak else None


def section_throughput(ctx: Context, res: Res, left: Left) -> None:
    """Per backbone (bf16, weights pre-cast): a window-batch sweep of the model alone and of the full teacher,
    then the single pass against the fastest teacher."""
    h, w = ctx.plan.throughput_image
    res.update(image=[h, w], precision="bf16 autocast, weights pre-cast (as precompute runs the teacher)",
               matmul_bf16_tflops=ctx.matmul_tflops.get("bf16"), notes=list(NOTES), backbones=[], targets=[])  # fmt: skip
    img = torch.from_numpy(gpu.photo(h, w))[None]  # (1, H, W, 3) uint8
    for name, crop, batches in ctx.plan.throughput:
        if left() < 0:
            _skip(res, name)
            continue
        bb = copy.deepcopy(ctx.cpu_model(name)).to(ctx.device).precast_for_autocast(torch.bfloat16)
        x, win_flops = bb.normalize(img.to(ctx.device)), vit_dense_flops(vit_arch(bb), crop, crop)["flops"]
        row = {"backbone": name, "crop": crop, "stride": STRIDE, "sweep": [],
               "windows": num_windows(h, w, crop, STRIDE), "window_gflops": win_flops / 1e9}  # fmt: skip
        res["backbones"].append(row)
        for batch in batches:
            if left() < 0 and row["sweep"]:
                _skip(res, f"{name} batch {batch}")
                continue
            row["sweep"].append(s := _sweep_point(ctx, bb, x, row, batch, win_flops))
            if "error" not in s:
                f = s["teacher_fraction_of_matmul"]
                say(f"throughput: {name} batch {batch}: model {s['model_windows_per_s']:.0f} win/s, teacher "
                    f"{s['teacher_windows_per_s']:.0f} win/s = {s['teacher_tflops']:.3g} TFLOP/s"
                    + (f" = {f:.2f} of matmul" if f is not None else ""))  # fmt: skip
            ctx.save()
        if ok := [s for s in row["sweep"] if "error" not in s]:
            best = max(ok, key=lambda s: s["teacher_windows_per_s"])
            _best_and_single_pass(ctx, res, row, bb, x, best, win_flops)
        del bb, x
        ctx.free()
    check(res, "teacher rates measured", bool(ctx.teacher_rates))


def _sweep_point(ctx: Context, bb: Backbone, x: torch.Tensor, row: Res, batch: int, win_flops: float) -> Res:
    """The model alone on ``batch`` windows, and the full teacher on ``x`` (1, 3, H, W) at that window batch."""
    crop, n = row["crop"], row["windows"]
    try:
        xb = torch.randn(batch, 3, crop, crop, device=ctx.device)
        ctx.peak_reset()
        t_model = fastest(lambda: _model_only(bb, xb), 3, ctx.device)
        mem_model = ctx.peak_gib()
        ctx.peak_reset()
        teacher = functools.partial(sliding_window_features, bb, x, crop, STRIDE, batch, torch.bfloat16)
        t_teacher = fastest(teacher, ctx.plan.throughput_repeats, ctx.device)
    except torch.cuda.OutOfMemoryError as e:  # a too-large batch is a finding, not the end of the sweep
        ctx.free()
        return {"window_batch": batch, "error": f"out of memory: {str(e).splitlines()[0]}"}
    tf, model_tf = n * win_flops / t_teacher / 1e12, batch * win_flops / t_model / 1e12
    return {"window_batch": batch, "model_windows_per_s": batch / t_model, "model_tflops": model_tf,
            "model_fraction_of_matmul": _fraction(ctx, model_tf), "model_peak_gib": mem_model,
            "teacher_seconds": t_teacher, "teacher_windows_per_s": n / t_teacher, "teacher_tflops": tf,
            "teacher_fraction_of_matmul": _fraction(ctx, tf), "teacher_peak_gib": ctx.peak_gib(),
            "fold_overhead": 1 - (n / t_teacher) / (batch / t_model)}  # fmt: skip


def _best_and_single_pass(ctx: Context, res: Res, row: Res, bb: Backbone, x: torch.Tensor, best: Res,
                          win_flops: float) -> None:  # fmt: skip
    """The fastest sweep point (the backbone's teacher rate for the projection, and its target), then one
    forward over the whole image against it."""
    name, crop, f = row["backbone"], row["crop"], best["teacher_fraction_of_matmul"]
    row["best"] = best
    ctx.teacher_rates[name] = {"crop": crop, "windows_per_s": best["teacher_windows_per_s"],
                               "tflops": best["teacher_tflops"], "fraction": f or 0.0, "window_flops": win_flops,
                               "window_batch": best["window_batch"]}  # fmt: skip
    of_matmul = f" = {f:.2f} of matmul" if f is not None else ""
    headline(res, f"throughput {name} crop {crop}: {best['teacher_windows_per_s']:.0f} win/s at batch "
                  f"{best['window_batch']}, {best['teacher_tflops']:.1f} TFLOP/s{of_matmul}, fold overhead "
                  f"{best['fold_overhead']:.2f}, peak {best.get('teacher_peak_gib')} GiB")  # fmt: skip
    if f is not None:
        target = f"{name} teacher >= 0.5 of the bf16 matmul rate"
        res["targets"].append({"name": target, "met": f >= 0.5, "value": f})
        headline(res, f"target {target}: {'met' if f >= 0.5 else 'NOT met'} ({f:.2f})")
    h, w = x.shape[2:]
    ctx.peak_reset()
    t_single = fastest(lambda: _model_only(bb, x), 3, ctx.device)
    sp = vit_dense_flops(vit_arch(bb), h, w)
    row["single_pass"] = r = {
        "seconds": t_single, "tflops": sp["flops"] / t_single / 1e12,
        "fraction_of_matmul": _fraction(ctx, sp["flops"] / t_single / 1e12),
        "attention_share_of_flops": sp["attention_flops"] / sp["flops"], "peak_gib": ctx.peak_gib(),
        "teacher_over_single_seconds": best["teacher_seconds"] / t_single,
        "teacher_over_single_flops": row["windows"] * win_flops / sp["flops"],
    }  # fmt: skip
    headline(res, f"  single pass {h}x{w}: {t_single * 1e3:.1f} ms, teacher/single "
                  f"{r['teacher_over_single_seconds']:.1f}x time ({r['teacher_over_single_flops']:.1f}x FLOPs)")  # fmt: skip
    ctx.save()


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
                       patch: int, seed: int = 0) -> Res:  # fmt: skip
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


def section_projection(ctx: Context, res: Res, left: Left) -> None:
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
        proj |= {k: proj[k] * PAPER_VIEWS / n for k in ("windows", "tflops", "cache_bytes_float16_raw")}
        proj["views"] = PAPER_VIEWS
    res.update(proj)
    # the SigLIP2 teacher's rate: measured, else another teacher's measured fraction of the bf16 matmul rate,
    # else half of that rate
    rate, bf16 = ctx.teacher_rates.get("siglip2-vit-b16-512"), ctx.matmul_tflops.get("bf16")
    if rate is not None:
        tflops_s = rate["tflops"]
        source = f"measured SigLIP2 crop-512 teacher ({rate['windows_per_s']:.0f} win/s)"
    elif ctx.teacher_rates and bf16:
        other, r = next(iter(ctx.teacher_rates.items()))
        tflops_s = r["fraction"] * bf16
        source = f"measured fraction {r['fraction']:.2f} of the bf16 matmul rate (teacher {other})"
    else:
        tflops_s = 0.5 * bf16 if bf16 else 0.0
        source = "assumed 0.5 of the measured bf16 matmul rate" if bf16 else "no measured rate"
    res.update(rate_tflops=tflops_s, rate_source=source, device=ctx.device)
    if tflops_s > 0:
        res["device_hours"] = res["tflops"] / tflops_s / 3600
        res["windows_per_s"] = tflops_s * 1e12 / win_flops
        headline(res, f"projection 25k SA-1B views, SigLIP2 crop 512 stride 24: {res['windows']:.3g} windows, "
                      f"{res['tflops']:.3g} TFLOP, {res['device_hours']:.1f} {ctx.device}-hours at {tflops_s:.1f} "
                      f"TFLOP/s ({source}), cache {res['cache_bytes_float16_raw'] / 1e9:.0f} GB float16 raw")  # fmt: skip
    check(res, "projection computed", res["windows"] > 0 and tflops_s > 0)


STAGES = ("ingest", "precompute", "distill", "eval", "segment")


def section_pipeline(ctx: Context, res: Res, left: Left) -> None:
    """ingest -> precompute -> distill (each precision) -> fidelity eval -> segment through run_pipeline, on real
    photos (offline ones only), with a local Ray that has the device's GPUs."""
    pp, work = ctx.plan.pipeline, ctx.workdir / "pipeline"
    gpus = torch.cuda.device_count() if ctx.cuda else 0
    res.update(plan=dataclasses.asdict(pp), stages={}, runs=[])
    t = time.perf_counter()
    _start_ray(res, gpus)
    res["ray"] = {"version": ray.__version__, "resources": dict(ray.cluster_resources())}
    res["stages"]["ray_start"] = time.perf_counter() - t
    check(res, "ray sees the GPUs", float(ray.cluster_resources().get("GPU", 0)) == gpus, f"{gpus} expected")
    # any download attempt fails at once (a closed local proxy port) instead of waiting on a timeout
    proxies = dict.fromkeys(("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"), "http://127.0.0.1:9")
    with mock.patch.dict(os.environ, proxies):
        n_train = write_photos(work / "raw" / "train", offline_photos(TRAIN_PHOTOS)[: pp.train_photos])
        n_held = write_photos(work / "raw" / "heldout", offline_photos(HELDOUT_PHOTOS)[: pp.heldout_photos])
    res["photos"] = {"train": n_train, "heldout": n_held}
    ctx.save()
    base = _recipe(pp, work)
    for i, prec in enumerate(pp.precisions):
        # a later run reuses the image sets and caches: it needs about the last run's distill + eval + segment
        need = sum(res["runs"][-1]["seconds"].get(k, 0.0) for k in STAGES[2:]) if res["runs"] else 0.0
        if i > 0 and left() < 0.6 * need:
            _skip(res, f"distill {prec}", f" ({left():.0f} s left, ~{need:.0f} s needed)")
            continue
        say(f"pipeline: run {i + 1}/{len(pp.precisions)}: distill precision {prec}")
        _run_once(ctx, res, base, prec, first=i == 0)
    timed = bool(res["runs"]) and all(set(STAGES) <= set(r["seconds"]) for r in res["runs"])
    check(res, "every stage reported a time", timed)


def _start_ray(res: Res, gpus: int, tries: int = 2) -> None:
    """A local Ray with this machine's CPUs and ``gpus`` GPUs (or the cluster at RAY_ADDRESS); a node that times
    out at start-up (an overloaded machine) is retried once."""
    for attempt in range(1, tries + 1):
        try:
            local = not os.environ.get("RAY_ADDRESS")  # an existing cluster brings its own resources
            return init_ray(**({"num_cpus": os.cpu_count(), "num_gpus": gpus} if local else {}))
        except Exception as e:  # noqa: BLE001 - retried once, then raised
            res.setdefault("ray_start_failures", []).append(f"{type(e).__name__}: {e}")
            shutdown_ray()
            if attempt == tries:
                raise


def _recipe(pp: gpu.PipelinePlan, work: Path) -> Recipe:
    """The run's recipe at the plan's sizes (distill precision set per run)."""
    return Recipe(
        run=RunConfig(workdir=str(work), experiment="spar-gpu-check", source=str(work / "raw" / "train"),
                      heldout_source=str(work / "raw" / "heldout")),
        ingest=IngestConfig(seed=0, shard_size=pp.shard_size, target_long=pp.target_long,
                            target_short=pp.target_short, min_short=pp.min_short, max_side=pp.max_side),
        precompute=PrecomputeConfig(teacher=pp.backbone, crop=pp.crop, stride=STRIDE, window_batch=pp.window_batch,
                                    autocast="bf16", cpus_per_task=pp.cpus_per_task, gpus_per_task=1.0,
                                    progress=False),
        distill=DistillConfig(trainable_blocks=2, lr=pp.lr, max_steps=pp.steps, epochs=1000,
                              warmup_steps=min(5, pp.steps // 4), checkpoint_every=pp.steps, workers=1,
                              trainer="ray",  # the check is of Ray Train on the device (one worker: auto = in process)
                              cpus_per_worker=pp.cpus_per_task, loader_workers=pp.loader_workers,
                              shuffle_buffer=8, log_every=5),
        eval=EvalConfig(fidelity=True, precision=pp.eval_precision, classes=DemoConfig.classes),
    )  # fmt: skip


def _run_once(ctx: Context, res: Res, base: Recipe, prec: str, first: bool) -> None:
    """One run_pipeline with distill precision ``prec``, and the evidence of where each stage ran."""
    pp, work, want = ctx.plan.pipeline, Path(base.run.workdir), "cuda" if ctx.cuda else "cpu"
    recipe = dataclasses.replace(base, distill=dataclasses.replace(base.distill, precision=prec))
    seg = SegmentConfig(classes=DemoConfig.classes, out=str(work / f"segment-{prec}"),
                        short_side=pp.segment_short_side, precision=pp.eval_precision)  # fmt: skip
    stats: list[Res] = []
    t = time.perf_counter()
    out = run_pipeline(recipe, Extras(segment=seg, precompute_stats=stats), Reporter("gpu-check"))
    run = {"precision": prec, "seconds": out.seconds, "total_seconds": time.perf_counter() - t}
    res["runs"].append(run)
    _precompute_evidence(res, run, stats, want if first else None)
    _distill_evidence(res, run, out, prec, want)
    ev = out.eval or {}  # the student must be closer to the teacher than the single pass
    run["fidelity"] = {k: ev.get(k) for k in ("images", "baseline", "student")}
    b, s = ev.get("baseline") or {}, ev.get("student") or {}
    closer = s.get("mse", math.inf) < b.get("mse", -math.inf)
    mses = f"student {s.get('mse')} vs baseline {b.get('mse')}"
    check(res, f"fidelity {prec}: student closer to the teacher than the single pass", closer, f"MSE {mses}")
    ctx.save()
    photos = sorted(str(f) for f in (work / "raw" / "heldout").glob("*.png"))
    run["segment"] = [{"image": Path(str(r["image"])).name, "classes_present": r["classes_present"]}
                      for r in out.segments]  # fmt: skip
    check(res, f"segment {prec}: one label map per photo", len(out.segments) == len(photos) > 0)
    times = ", ".join(f"{k} {v:.1f} s" for k, v in run["seconds"].items())
    headline(res, f"pipeline distill {prec}: {times}")
    ctx.save()


def _precompute_evidence(res: Res, run: Res, stats: list[Res], want: str | None) -> None:
    """Where the precompute tasks ran and how often each worker process built the teacher (checked when
    ``want``, the expected device, is given: in the first run, which computes the caches)."""
    computed = [s for s in stats if s.get("status") != "already-complete"]
    pids = sorted({s["pid"] for s in stats if "pid" in s})
    builds = [max(s.get("teacher_builds", 0) for s in stats if s.get("pid") == pid) for pid in pids]
    devices = sorted({s.get("device", "?") for s in computed})
    run["precompute_tasks"] = {
        "tasks": len(stats), "computed": len(computed), "devices": devices, "worker_pids": len(pids),
        "teacher_builds_per_worker": builds, "windows": sum(int(s.get("windows", 0)) for s in stats),
        "task_seconds": sum(float(s.get("seconds", 0.0)) for s in stats),
    }  # fmt: skip
    if want is not None:
        on_want = bool(computed) and all(s.get("device", "").startswith(want) for s in computed)
        check(res, f"precompute tasks ran on {want}", on_want, str(devices))
        once = bool(builds) and all(v == 1 for v in builds) and len(stats) > len(pids)
        detail = f"{len(stats)} tasks on {len(pids)} worker(s), builds {builds}"
        check(res, "teacher built once per worker and reused across tasks", once, detail)


def _distill_evidence(res: Res, run: Res, out: PipelineResult, prec: str, want: str) -> None:
    """What the Ray Train worker recorded in MLflow: device, autocast dtype, gradient scaler, loss curve."""
    r, client = out.distill, MlflowClient(out.distill.tracking_uri)
    tags = client.get_run(r.run_id).data.tags
    loss = [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
    scale = [m.value for m in client.get_metric_history(r.run_id, "grad_scale")]
    dev, dtype, first, last = tags.get("worker_device"), tags.get("autocast_dtype"), loss[:1], scale[-1:]
    run["distill"] = {
        "steps": r.steps, "final_loss": r.final_loss, "first_loss": (first or [None])[0], "worker_device": dev,
        "autocast_dtype": dtype, "grad_scaler": tags.get("grad_scaler"), "grad_scale_last": (last or [None])[0],
        "run_id": r.run_id,
    }  # fmt: skip
    amp = {"bf16": "bfloat16", "fp16": "float16", "fp32": "none"}[prec]
    finite = r.final_loss is not None and math.isfinite(r.final_loss)
    ok = str(dev).startswith(want) and dtype == amp and r.steps == r.total_steps and finite
    name = f"distill {prec}: on {want}, autocast {amp}, {r.steps}/{r.total_steps} steps, finite loss"
    loss_range = f"{run['distill']['first_loss']} -> {r.final_loss}"
    check(res, name, ok, f"device {dev}, autocast {dtype}, loss {loss_range}")
    if prec == "fp16":
        active = tags.get("grad_scaler") == "true" and bool(last) and last[0] > 0
        check(
            res, "distill fp16: gradient scaler active", active, f"scale {run['distill']['grad_scale_last']}"
        )


SECTION_FNS: dict[str, Callable[[Context, Res, Left], None]] = {
    "environment": section_environment,
    "correctness": section_correctness,
    "throughput": section_throughput,
    "projection": section_projection,
    "pipeline": section_pipeline,
}
