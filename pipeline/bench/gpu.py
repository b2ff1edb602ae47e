"""``spar bench gpu``: one prepared check of the GPU path, measured end to end, that never loses what it measured.

Sections (each in its own ``try``, with its own time budget; the JSON + Markdown report is rewritten after every
section and after every item inside one, so a crash or a kill keeps everything measured so far):

* ``environment``: versions, the accelerator, measured matmul TFLOP/s (bf16, fp16, fp32, tf32; 8192^3 on a GPU);
* ``correctness``: the teacher and the single pass on the device, in fp32 (and tf32) and under bf16/fp16
  autocast, against an independent CPU fp32 reference (a naive one-window-at-a-time teacher) on a real photo;
* ``throughput``: teacher windows/s and achieved TFLOP/s as a fraction of the measured matmul rate for a window
  batch sweep (model alone and the full sliding teacher), single pass vs teacher on one large image, peak memory;
* ``projection``: the paper-scale precompute (25k SA-1B-like views, SigLIP2 crop 512 stride 24, the ingest
  recipe's sizes) from the measured rate: windows, TFLOPs, GPU-hours, cache bytes;
* ``pipeline``: ingest -> precompute (Ray GPU tasks) -> distill (Ray Train, bf16, then fp16 + gradient scaling or
  fp32 on CPU) -> fidelity eval -> segment, on real photos with a local Ray and the embedded MLflow store,
  through :func:`pipeline.workflow.orchestrator.run_pipeline`; each stage's time and where it really ran.

``--mode cpu`` runs the same sections with tiny models and images (CI runs it so the script cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SECTIONS = ("environment", "correctness", "throughput", "projection", "pipeline")
PHOTO = "astronaut"  # scikit-image sample photo used for correctness and throughput

# Error tolerances against the CPU fp32 reference, as relative L2 error ||y - ref|| / ||ref||.
# Low-precision formats round every matmul input to a unit roundoff u = 2^-(significand bits): bf16 2^-8,
# fp16 and tf32 2^-11. Rounding errors of a GEMM's inputs give the output a relative error of order u (they average
# out along the reduction), and the depth of a ViT compounds them: measured on CPU for random-weight ViT-B/16 and
# SigLIP2 B/16 single passes, bf16 gives 2.6-3.1 u and fp16 2.5-3.1 u. The tolerance is 8 u, 2.5x that. fp32 on two
# devices differs only by summation order (u = 2^-24, reductions of <= 3072 terms, 12 blocks): 1e-4 leaves
# a 10x margin over sqrt(K) u x depth growth. The mean per-position cosine must be >= 1 - 2 tol^2 (a uniform
# relative error r costs r^2 / 2 of cosine; 4x margin).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "fp16": 2.0**-11, "bf16": 2.0**-8}
REL_TOL = {"fp32": 1e-4, "tf32": 8 * 2.0**-11, "fp16": 8 * 2.0**-11, "bf16": 8 * 2.0**-8}
TOLERANCE_NOTE = (
    "relative L2 error vs the CPU fp32 reference <= 8 u (u = unit roundoff: bf16 2^-8, fp16/tf32 2^-11; measured "
    "2.5-3.1 u for random ViT-B/16 and SigLIP2 B/16 on CPU), fp32 <= 1e-4 (summation order only); mean cosine "
    ">= 1 - 2 tol^2"
)


# ----------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True)
class PipelinePlan:
    """Sizes of the pipeline section."""

    backbone: str
    crop: int
    train_photos: int  # how many of the demo's training photos
    heldout_photos: int
    shard_size: int
    target_long: int
    target_short: int
    min_short: int
    max_side: int
    steps: int
    lr: float  # AdamW step size for this random-weight backbone and step count
    precisions: tuple[str, ...]  # distill precisions, one run each
    eval_precision: str
    loader_workers: int
    cpus_per_task: int
    window_batch: int
    segment_short_side: int


@dataclass(frozen=True)
class Plan:
    """Everything the sections size themselves by (``gpu`` or ``cpu``)."""

    mode: str
    matmul_n: int
    matmul_seconds: float
    matmul_inner: int
    correctness: tuple[tuple[str, int, int], ...]  # (backbone, height, width)
    correctness_window_batch: int
    throughput: tuple[tuple[str, int, tuple[int, ...]], ...]  # (backbone, crop, window batches)
    throughput_image: tuple[int, int]  # teacher and single pass on this image (H, W)
    throughput_repeats: int
    projection_views: int
    pipeline: PipelinePlan
    budgets: dict[str, float] = field(default_factory=dict)  # share of --budget-s per section


GPU_PLAN = Plan(
    mode="gpu",
    matmul_n=8192,
    matmul_seconds=1.5,
    matmul_inner=10,
    correctness=(("maskclip-vit-b16", 448, 672), ("siglip2-vit-b16-512", 512, 768)),
    correctness_window_batch=64,
    throughput=(("maskclip-vit-b16", 224, (64, 128, 256)), ("siglip2-vit-b16-512", 512, (16, 32, 64))),
    throughput_image=(1344, 2016),
    throughput_repeats=2,
    projection_views=25_000,
    pipeline=PipelinePlan(
        backbone="maskclip-vit-b16",
        crop=224,
        train_photos=23,
        heldout_photos=3,
        shard_size=8,
        target_long=1024,
        target_short=768,
        min_short=448,
        max_side=1024,
        steps=60,
        # ViT-B/16 with random weights: 1e-3 diverged on the H200 (loss 0.15 -> 0.41, student worse than the single
        # pass); a CPU sweep over 40 steps gave held-out MSE 0.053 (1e-3), 0.014 (3e-4), 0.011 (1e-4) vs 0.015
        lr=1e-4,
        precisions=("bf16", "fp16"),
        eval_precision="bf16",
        loader_workers=2,
        cpus_per_task=4,
        window_batch=128,
        segment_short_side=448,
    ),
    budgets={"environment": 20, "correctness": 70, "throughput": 50, "projection": 10, "pipeline": 185},
)

CPU_PLAN = Plan(
    mode="cpu",
    matmul_n=512,
    matmul_seconds=0.3,
    matmul_inner=2,
    correctness=(("tiny-clip-64", 112, 176), ("tiny-clip-224", 224, 288)),
    correctness_window_batch=8,
    throughput=(("tiny-clip-64", 64, (8, 32)),),
    throughput_image=(192, 288),
    throughput_repeats=1,
    projection_views=2_000,
    pipeline=PipelinePlan(
        backbone="tiny-clip-64",
        crop=64,
        train_photos=4,
        heldout_photos=2,
        shard_size=2,
        target_long=160,
        target_short=112,
        min_short=64,
        max_side=160,
        steps=3,
        lr=1e-3,  # the demo's step size for its tiny random model
        precisions=("bf16", "fp32"),
        eval_precision="fp32",
        loader_workers=0,
        cpus_per_task=1,
        window_batch=16,
        segment_short_side=96,
    ),
    budgets={"environment": 10, "correctness": 20, "throughput": 15, "projection": 5, "pipeline": 150},
)


# ----------------------------------------------------------------------------------------------- report


class Report:
    """The report: ``report.json`` (everything) and ``report.md`` (readable), rewritten atomically on save."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        """Write both files (temp file + rename: a kill mid-write leaves the previous version)."""
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _atomic_write(self.out / "report.json", json.dumps(_jsonable(self.data), indent=1))
        try:
            md = render_markdown(self.data)
        except Exception:  # noqa: BLE001 - the JSON is what counts; say why the Markdown is missing
            md = "# GPU check\n\nMarkdown rendering failed:\n\n```\n" + traceback.format_exc() + "```\n"
        _atomic_write(self.out / "report.md", md)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), unknown objects their str()."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer):
        return int(x)
    return str(x)


class SectionTimeout(Exception):
    """A section ran past its hard time limit."""


class Terminated(BaseException):
    """The process got SIGTERM (e.g. from ``timeout``): record it, write the report, stop."""


@dataclass
class Deadline:
    """A section's soft budget: optional work is skipped once it is spent."""

    end: float

    def left(self) -> float:
        return self.end - time.perf_counter()


@contextlib.contextmanager
def _hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (no-op outside the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum: int, frame: Any) -> None:
        raise SectionTimeout(f"section ran past its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated("SIGTERM")


def say(msg: str) -> None:
    """A progress line (flushed: the device's log shows how far a run got)."""
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_section(
    report: Report,
    name: str,
    fn: Callable[[Any, dict[str, Any], Deadline], None],
    ctx: Any,
    budget_s: float,
    hard_s: float | None = None,
) -> str:
    """Run one section: ``fn(ctx, result, deadline)`` fills ``result`` as it goes (``ctx.save()`` writes it).

    ``budget_s`` is the soft budget the section sizes its optional work by; past ``hard_s`` (default
    1.6 x budget + 10 s) it is interrupted. Any exception (and the hard time limit) is recorded with its traceback; the caller goes on with the next
    section. SIGTERM is recorded, the report written, and re-raised. Returns the section's status.
    """
    entry = report.section(name)
    result: dict[str, Any] = {}
    entry.clear()
    entry.update(status="running", budget_s=round(budget_s, 1), result=result)
    report.save()
    say(f"{name}: start (budget {budget_s:.0f} s)")
    t0 = time.perf_counter()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)  # re-armed per section: Ray may install its own
        with _hard_limit(hard_s if hard_s is not None else budget_s * 1.6 + 10):
            fn(ctx, result, Deadline(t0 + budget_s))
        entry["status"] = "ok"
    except SectionTimeout as e:
        entry.update(status="timeout", error=str(e), traceback=traceback.format_exc())
    except Terminated:
        entry.update(status="killed", error="SIGTERM", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report.save()
        raise
    except Exception as e:  # noqa: BLE001 - recorded, and the next section runs
        entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    except KeyboardInterrupt:
        entry.update(status="interrupted", traceback=traceback.format_exc())
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report.save()
        raise
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    failed = [c["name"] for c in result.get("checks", []) if not c.get("ok")]
    if failed and entry["status"] == "ok":
        entry["status"] = "checks-failed"
    report.save()
    say(
        f"{name}: {entry['status']} in {entry['seconds']:.1f} s"
        + (f" ({entry.get('error')})" if "error" in entry else "")
    )
    if failed:
        say(f"{name}: failed checks: {', '.join(failed)}")
    return entry["status"]


def check(result: dict[str, Any], name: str, ok: bool, detail: str = "") -> bool:
    """Record a pass/fail check in a section's result."""
    result.setdefault("checks", []).append({"name": name, "ok": bool(ok), "detail": detail})
    return bool(ok)


# ----------------------------------------------------------------------------------------------- context


@dataclass
class Context:
    """What the sections share: the plan, the device, built models, measured rates."""

    plan: Plan
    device: str
    report: Report
    workdir: Path
    cpu_models: dict[str, Any] = field(default_factory=dict)
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    teacher_rates: dict[str, dict[str, float]] = field(default_factory=dict)

    def save(self) -> None:
        self.report.save()

    def cpu_model(self, name: str) -> Any:
        """The backbone ``name`` on CPU in fp32, random weights (seed 0), built once."""
        if name not in self.cpu_models:
            from spar_core.backbones import build_backbone

            self.cpu_models[name] = build_backbone(name, device="cpu")
        return self.cpu_models[name]

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()


def _photo(h: int, w: int) -> np.ndarray:
    """The sample photo resized (PIL bicubic) to (h, w, 3) uint8."""
    from PIL import Image

    from pipeline.common.photos import sample_photo_rgb

    return np.array(Image.fromarray(sample_photo_rgb(PHOTO)).resize((w, h), Image.BICUBIC))


# ----------------------------------------------------------------------------------------------- environment


def section_environment(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Versions, the accelerator and the measured matmul rates."""
    import torch

    from pipeline.bench.cache import matmul_gflops
    from pipeline.common.tracking import git_commit

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for mod in ("numpy", "open_clip", "timm", "ray", "mlflow", "zarr", "webdataset", "pyarrow", "fsspec"):
        versions[mod] = _version(mod)
    res["versions"] = versions
    res["git_commit"] = git_commit()
    res["host"] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    res["device"] = ctx.device
    if ctx.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        res["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        }
    ctx.save()
    p = ctx.plan
    rates: dict[str, float] = {}
    res["matmul_tflops"] = rates
    res["matmul_n"] = p.matmul_n
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
    for name, dt in dtypes.items():
        if name == "tf32" and not ctx.device.startswith("cuda"):
            continue
        if dl.left() < 0 and name in ("fp32", "tf32"):
            res.setdefault("skipped", []).append(f"matmul {name}: out of time")
            continue
        with _tf32(name == "tf32"):
            g = matmul_gflops(
                dt, n=p.matmul_n, seconds=p.matmul_seconds, device=ctx.device, inner=p.matmul_inner
            )
        rates[name] = g / 1e3
        say(f"environment: matmul {name} {g / 1e3:.2f} TFLOP/s (n={p.matmul_n})")
        ctx.save()
    ctx.matmul_tflops.update(rates)
    check(
        res, "matmul rates measured", all(v > 0 and math.isfinite(v) for v in rates.values()) and bool(rates)
    )


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version({"open_clip": "open_clip_torch"}.get(mod, mod))
    except Exception:  # noqa: BLE001 - absent or unreadable: reported as such
        return None


def _cpu_name() -> str:
    from pipeline.bench.cache import _cpu_name as name

    return name()


@contextlib.contextmanager
def _tf32(enabled: bool) -> Iterator[None]:
    """Set cuBLAS and cuDNN TF32 for the block (strict fp32 when disabled), then restore."""
    import torch

    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ----------------------------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def _strict_sdpa(enabled: bool) -> Iterator[None]:
    """Attention through the plain fp32 math kernel (no fused kernel that may use TF32), when enabled."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def compare(y: Any, ref: Any) -> dict[str, float]:
    """Error of ``y`` against ``ref`` (both (..., D), compared in float64 on CPU)."""
    import torch

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
    import torch

    from pipeline.bench.teacher import naive_teacher_fp32
    from spar_core.sliding import num_windows, sliding_window_features

    res["tolerance"] = {"rel_l2": REL_TOL, "note": TOLERANCE_NOTE}
    res["reference"] = "CPU fp32, naive teacher (one window per forward, folded one window at a time)"
    res["cases"] = []
    for name, h, w in ctx.plan.correctness:
        if dl.left() < 0:
            res.setdefault("skipped", []).append(f"{name}: out of time")
            continue
        bb = ctx.cpu_model(name)
        crop, stride = bb.native_size, 24
        img = _photo(h, w)
        x = bb.normalize(torch.from_numpy(img)[None])  # (1, 3, H, W) float32
        t = time.perf_counter()
        with torch.no_grad():
            ref_t = naive_teacher_fp32(bb, x, crop, stride)  # (1, H/p, W/p, D)
            ref_s = bb.dense(x)  # (1, H/p, W/p, D)
        ref = {
            "backbone": name,
            "input": {"photo": PHOTO, "size": [h, w], "resize": "PIL bicubic"},
            "crop": crop,
            "stride": stride,
            "windows": num_windows(h, w, crop, stride),
            "shape": list(ref_t.shape),
            "teacher_ref_norm": float(ref_t.double().norm()),
            "single_ref_norm": float(ref_s.double().norm()),
            "reference_seconds": round(time.perf_counter() - t, 2),
        }
        say(f"correctness: {name} {h}x{w}: CPU fp32 reference in {ref['reference_seconds']} s")
        dev_bb = copy.deepcopy(bb).to(ctx.device)
        xd = x.to(ctx.device)
        for prec in _precisions(ctx.device):
            amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
            model = copy.deepcopy(dev_bb).precast_for_autocast(amp) if amp is not None else dev_bb
            with _tf32(prec == "tf32"), _strict_sdpa(prec == "fp32"), torch.no_grad():
                y_t = sliding_window_features(
                    model, xd, crop, stride, ctx.plan.correctness_window_batch, autocast_dtype=amp
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
                    math.isfinite(e["rel_l2"])
                    and e["rel_l2"] <= tol
                    and e["cosine_mean"] >= 1 - 2 * tol * tol
                )
            res["cases"].append(case)
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
            ctx.save()
            del model
        del dev_bb, xd
        _free(ctx)


def _free(ctx: Context) -> None:
    if ctx.device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- throughput


def _timed(ctx: Context, fn: Callable[[], Any], repeats: int) -> float:
    """Fastest of ``repeats`` timed calls after one warm-up (synchronised)."""
    fn()
    ctx.sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ctx.sync()
        best = min(best, time.perf_counter() - t)
    return best


def _peak_reset(ctx: Context) -> None:
    if ctx.device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_gib(ctx: Context) -> float | None:
    if ctx.device.startswith("cuda"):
        import torch

        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return None


def section_throughput(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Teacher windows/s, achieved fraction of the measured bf16 matmul rate, single pass vs teacher."""
    import torch

    p = ctx.plan
    h, w = p.throughput_image
    res["image"] = [h, w]
    res["precision"] = "bf16 autocast, weights pre-cast (as precompute runs the teacher)"
    res["matmul_bf16_tflops"] = ctx.matmul_tflops.get("bf16")
    res["notes"] = [
        "attention runs through F.scaled_dot_product_attention (fused kernels on CUDA) in both readouts",
        "channels_last does not apply: the only convolution is the 16x16/16 patch embedding (one GEMM)",
        "fold_overhead = 1 - teacher windows/s / model-only windows/s at the same window batch: the share of the "
        "teacher's time spent gathering windows, upsampling and folding them (fp32, memory-bound)",
    ]
    res["backbones"] = []
    res["targets"] = []
    img = torch.from_numpy(_photo(h, w))[None]  # (1, H, W, 3) uint8
    for name, crop, batches in p.throughput:
        if dl.left() < 0:
            res.setdefault("skipped", []).append(f"{name}: out of time")
            continue
        row: dict[str, Any] = {"backbone": name, "crop": crop, "stride": 24, "sweep": []}
        res["backbones"].append(row)
        _throughput_backbone(ctx, res, row, img, batches, dl)
        _free(ctx)
    check(res, "teacher rates measured", bool(ctx.teacher_rates))


def _throughput_backbone(
    ctx: Context, res: dict[str, Any], row: dict[str, Any], img: Any, batches: tuple[int, ...], dl: Deadline
) -> None:
    """The window-batch sweep and the single pass of one backbone (fills ``row``)."""
    import torch

    from pipeline.bench.cache import vit_arch, vit_dense_flops
    from spar_core.sliding import num_windows, sliding_window_features

    name, crop = row["backbone"], row["crop"]
    h, w = img.shape[1:3]
    peak = ctx.matmul_tflops.get("bf16")
    bf16 = torch.bfloat16
    bb = copy.deepcopy(ctx.cpu_model(name)).to(ctx.device).precast_for_autocast(bf16)
    arch = vit_arch(bb)
    win_flops = vit_dense_flops(arch, crop, crop)["flops"]
    x = bb.normalize(img.to(ctx.device))  # (1, 3, H, W)
    n_win = num_windows(h, w, crop, 24)
    row.update(windows=n_win, window_gflops=win_flops / 1e9)

    def frac(tflops: float) -> float | None:
        return tflops / peak if peak else None

    def model_only(xb: Any) -> Any:
        with torch.no_grad(), torch.autocast(xb.device.type, dtype=bf16):
            return bb.dense(xb)  # (B, c/p, c/p, D)

    for b in batches:
        if dl.left() < 0 and row["sweep"]:
            res.setdefault("skipped", []).append(f"{name} batch {b}: out of time")
            continue
        try:
            xb = torch.randn(b, 3, crop, crop, device=ctx.device)
            _peak_reset(ctx)
            t_model = _timed(ctx, lambda xb=xb: model_only(xb), 3)
            mem_model = _peak_gib(ctx)
            _peak_reset(ctx)
            t_teacher = _timed(
                ctx,
                lambda b=b: sliding_window_features(bb, x, crop, 24, b, autocast_dtype=bf16),
                ctx.plan.throughput_repeats,
            )
            tf = n_win * win_flops / t_teacher / 1e12
            s = {
                "window_batch": b,
                "model_windows_per_s": b / t_model,
                "model_tflops": b * win_flops / t_model / 1e12,
                "model_fraction_of_matmul": frac(b * win_flops / t_model / 1e12),
                "model_peak_gib": mem_model,
                "teacher_seconds": t_teacher,
                "teacher_windows_per_s": n_win / t_teacher,
                "teacher_tflops": tf,
                "teacher_fraction_of_matmul": frac(tf),
                "teacher_peak_gib": _peak_gib(ctx),
                "fold_overhead": 1 - (n_win / t_teacher) / (b / t_model),
            }
            del xb
        except torch.cuda.OutOfMemoryError as e:  # a too-large batch is a finding, not the end of the sweep
            s = {"window_batch": b, "error": f"out of memory: {str(e).splitlines()[0]}"}
            _free(ctx)
        row["sweep"].append(s)
        if "error" not in s:
            say(
                f"throughput: {name} batch {b}: model {s['model_windows_per_s']:.0f} win/s, teacher "
                f"{s['teacher_windows_per_s']:.0f} win/s = {s['teacher_tflops']:.3g} TFLOP/s"
                + (f" = {s['teacher_fraction_of_matmul']:.2f} of matmul" if peak else "")
            )
        ctx.save()
    ok = [s for s in row["sweep"] if "error" not in s]
    if not ok:
        return
    best = max(ok, key=lambda s: s["teacher_windows_per_s"])
    row["best"] = best
    ctx.teacher_rates[name] = {
        "crop": crop,
        "windows_per_s": best["teacher_windows_per_s"],
        "tflops": best["teacher_tflops"],
        "fraction": best["teacher_fraction_of_matmul"] or 0.0,
        "window_flops": win_flops,
        "window_batch": best["window_batch"],
    }
    if peak:
        f = best["teacher_fraction_of_matmul"]
        res["targets"].append(
            {"name": f"{name} teacher >= 0.5 of the bf16 matmul rate", "met": f >= 0.5, "value": f}
        )
    _peak_reset(ctx)
    t_single = _timed(ctx, lambda: model_only(x), 3)
    sp = vit_dense_flops(arch, h, w)
    row["single_pass"] = {
        "seconds": t_single,
        "tflops": sp["flops"] / t_single / 1e12,
        "fraction_of_matmul": frac(sp["flops"] / t_single / 1e12),
        "attention_share_of_flops": sp["attention_flops"] / sp["flops"],
        "peak_gib": _peak_gib(ctx),
        "teacher_over_single_seconds": best["teacher_seconds"] / t_single,
        "teacher_over_single_flops": n_win * win_flops / sp["flops"],
    }
    say(
        f"throughput: {name} single pass {h}x{w}: {t_single * 1e3:.1f} ms; teacher/single "
        f"{row['single_pass']['teacher_over_single_seconds']:.1f}x"
    )
    ctx.save()


# ----------------------------------------------------------------------------------------------- projection


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
    from pipeline.data.augment import augmentation_for
    from pipeline.data.config import IngestConfig
    from spar_core.sliding import num_windows

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
    from pipeline.bench.cache import SIGLIP2_B16_512, vit_dense_flops

    crop, stride = 512, 24
    arch = SIGLIP2_B16_512
    win_flops = vit_dense_flops(arch, crop, crop)["flops"]
    n = ctx.plan.projection_views
    sizes = sa1b_like_sizes(n)
    proj = project_precompute(sizes, crop, stride, win_flops, arch.dim, arch.patch)
    res["assumptions"] = {
        "teacher": "siglip2-vit-b16-512, crop 512, stride 24, bf16",
        "views": n,
        "originals": "short side 1500, long 2000/2250/2667 (50/40/10%), 20% portrait",
        "ingest": "pipeline.data.ingest IngestConfig() defaults (the paper's recipe)",
        "window_gflops": win_flops / 1e9,
    }
    if n != 25_000:
        res["assumptions"]["scaled_to"] = 25_000
        scale = 25_000 / n
        for k in ("windows", "tflops", "cache_bytes_float16_raw"):
            proj[k] = proj[k] * scale
        proj["views"] = 25_000
    res.update(proj)
    rate = ctx.teacher_rates.get("siglip2-vit-b16-512")
    if rate is not None:
        tflops_s, source = (
            rate["tflops"],
            f"measured SigLIP2 crop-512 teacher ({rate['windows_per_s']:.0f} win/s)",
        )
    elif ctx.teacher_rates and ctx.matmul_tflops.get("bf16"):
        r = next(iter(ctx.teacher_rates.values()))
        tflops_s = r["fraction"] * ctx.matmul_tflops["bf16"]
        source = f"measured fraction {r['fraction']:.2f} of the bf16 matmul rate (teacher {next(iter(ctx.teacher_rates))})"
    elif ctx.matmul_tflops.get("bf16"):
        tflops_s, source = 0.5 * ctx.matmul_tflops["bf16"], "assumed 0.5 of the measured bf16 matmul rate"
    else:
        tflops_s, source = 0.0, "no measured rate"
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


# ----------------------------------------------------------------------------------------------- pipeline


def section_pipeline(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """ingest -> precompute -> distill (each precision) -> fidelity eval -> segment, through run_pipeline."""
    import dataclasses

    import torch

    from pipeline.cache.precompute import PrecomputeConfig
    from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, write_photos
    from pipeline.data.config import IngestConfig
    from pipeline.eval.config import EvalConfig, SegmentConfig
    from pipeline.train.config import DistillConfig
    from pipeline.workflow.config import DemoConfig, Recipe, RunConfig
    from pipeline.workflow.orchestrator import Extras, Reporter, run_pipeline

    pp = ctx.plan.pipeline
    work = ctx.workdir / "pipeline"
    gpus = torch.cuda.device_count() if ctx.device.startswith("cuda") else 0
    res["plan"] = asdict(pp)
    res["stages"] = {}
    t = time.perf_counter()
    _start_ray(res, gpus)
    import ray

    res["ray"] = {"version": ray.__version__, "resources": dict(ray.cluster_resources())}
    res["stages"]["ray_start"] = time.perf_counter() - t
    check(res, "ray sees the GPUs", float(ray.cluster_resources().get("GPU", 0)) == gpus, f"{gpus} expected")
    with _no_network():
        n_train = write_photos(work / "raw" / "train", _offline_photos(TRAIN_PHOTOS)[: pp.train_photos])
        n_held = write_photos(work / "raw" / "heldout", _offline_photos(HELDOUT_PHOTOS)[: pp.heldout_photos])
    res["photos"] = {"train": n_train, "heldout": n_held}
    ctx.save()
    classes = DemoConfig.classes
    base = Recipe(
        run=RunConfig(
            workdir=str(work),
            experiment="spar-gpu-check",
            source=str(work / "raw" / "train"),
            heldout_source=str(work / "raw" / "heldout"),
        ),
        ingest=IngestConfig(
            seed=0,
            shard_size=pp.shard_size,
            target_long=pp.target_long,
            target_short=pp.target_short,
            min_short=pp.min_short,
            max_side=pp.max_side,
        ),
        precompute=PrecomputeConfig(
            teacher=pp.backbone,
            crop=pp.crop,
            stride=24,
            window_batch=pp.window_batch,
            autocast="bf16",
            cpus_per_task=pp.cpus_per_task,
            gpus_per_task=1.0,
            progress=False,
        ),
        distill=DistillConfig(
            trainable_blocks=2,
            lr=pp.lr,
            max_steps=pp.steps,
            epochs=1000,
            warmup_steps=min(5, pp.steps // 4),
            checkpoint_every=pp.steps,
            workers=1,
            cpus_per_worker=pp.cpus_per_task,
            loader_workers=pp.loader_workers,
            shuffle_buffer=8,
            log_every=5,
        ),
        eval=EvalConfig(fidelity=True, precision=pp.eval_precision, classes=classes),
    )
    res["runs"] = []
    for i, prec in enumerate(pp.precisions):
        if i > 0:  # a later run reuses the image sets and caches: it costs about distill + eval + segment
            prev = res["runs"][-1]["seconds"] if res["runs"] else {}
            need = sum(prev.get(k, 0.0) for k in ("distill", "eval", "segment"))
            if dl.left() < 0.6 * need:
                res.setdefault("skipped", []).append(
                    f"distill {prec}: out of time ({dl.left():.0f} s left, ~{need:.0f} s needed)"
                )
                continue
        recipe = dataclasses.replace(base, distill=dataclasses.replace(base.distill, precision=prec))
        stats: list[dict[str, Any]] = []
        say(f"pipeline: run {i + 1}/{len(pp.precisions)}: distill precision {prec}")
        seg = SegmentConfig(
            classes=classes,
            out=str(work / f"segment-{prec}"),
            short_side=pp.segment_short_side,
            precision=pp.eval_precision,
        )
        t = time.perf_counter()
        out = run_pipeline(recipe, Extras(segment=seg, precompute_stats=stats), Reporter("gpu-check"))
        run = {"precision": prec, "seconds": out.seconds, "total_seconds": time.perf_counter() - t}
        res["runs"].append(run)
        _precompute_evidence(ctx, res, run, stats, first=i == 0)
        _distill_evidence(ctx, res, run, out, prec)
        ev = out.eval or {}
        run["fidelity"] = {k: ev.get(k) for k in ("images", "baseline", "student")}
        b, s = ev.get("baseline") or {}, ev.get("student") or {}
        check(
            res,
            f"fidelity {prec}: student closer to the teacher than the single pass",
            s.get("mse", math.inf) < b.get("mse", -math.inf),
            f"MSE student {s.get('mse')} vs baseline {b.get('mse')}",
        )
        ctx.save()
        recs = out.segments
        photos = sorted(str(f) for f in (work / "raw" / "heldout").glob("*.png"))
        run["segment"] = [
            {"image": Path(str(r["image"])).name, "classes_present": r["classes_present"]} for r in recs
        ]
        check(res, f"segment {prec}: one label map per photo", len(recs) == len(photos) > 0)
        stage_line = ", ".join(f"{k} {v:.1f} s" for k, v in run["seconds"].items())
        say(f"pipeline: {prec}: {stage_line}")
        ctx.save()
    check(
        res,
        "every stage reported a time",
        all(
            all(k in r["seconds"] for k in ("ingest", "precompute", "distill", "eval", "segment"))
            for r in res["runs"]
        )
        and bool(res["runs"]),
    )


def _start_ray(res: dict[str, Any], gpus: int, tries: int = 2) -> None:
    """A local Ray cluster with this machine's CPUs and ``gpus`` GPUs (or the cluster at RAY_ADDRESS); a node
    that times out at start-up (an overloaded machine) is retried once."""
    from pipeline.common.tasks import init_ray, shutdown_ray

    for attempt in range(1, tries + 1):
        try:
            if os.environ.get("RAY_ADDRESS"):  # an existing cluster brings its own resources
                init_ray()
            else:
                init_ray(num_cpus=os.cpu_count(), num_gpus=gpus)
            return
        except Exception as e:  # noqa: BLE001 - retried once, then raised
            res.setdefault("ray_start_failures", []).append(f"{type(e).__name__}: {e}")
            shutdown_ray()
            if attempt == tries:
                raise


def _offline_photos(names: tuple[str, ...]) -> tuple[str, ...]:
    """The scikit-image photos among ``names`` that load without a download (the device machine is offline):
    those whose registry file is on disk, and the aliases of bundled files (no registry entry of that name)."""
    try:
        import skimage.data as sd
        from skimage.data import _registry

        dirs = [Path(sd.__file__).parent, Path(str(getattr(sd, "data_dir", sd.__file__)))]
        keep = []
        for n in names:
            keys = [k for k in _registry.registry if Path(k).stem == n]
            if not keys or any((d / Path(k).name).exists() for k in keys for d in dirs):
                keep.append(n)
        return tuple(keep)
    except Exception:  # noqa: BLE001 - another scikit-image layout: try them all (failures are skipped)
        return names


@contextlib.contextmanager
def _no_network() -> Iterator[None]:
    """Make any download attempt fail at once (a closed local proxy port) instead of waiting on a timeout."""
    keys = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict.fromkeys(keys, "http://127.0.0.1:9"))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _precompute_evidence(
    ctx: Context, res: dict[str, Any], run: dict[str, Any], stats: list, first: bool
) -> None:
    """Where the precompute tasks ran and whether each worker process built the teacher only once."""
    computed = [s for s in stats if s.get("status") != "already-complete"]
    pids = sorted({s["pid"] for s in stats if "pid" in s})
    builds = {pid: max(s.get("teacher_builds", 0) for s in stats if s.get("pid") == pid) for pid in pids}
    run["precompute_tasks"] = {
        "tasks": len(stats),
        "computed": len(computed),
        "devices": sorted({s.get("device", "?") for s in computed}),
        "worker_pids": len(pids),
        "teacher_builds_per_worker": list(builds.values()),
        "windows": sum(int(s.get("windows", 0)) for s in stats),
        "task_seconds": sum(float(s.get("seconds", 0.0)) for s in stats),
    }
    if not first:
        return
    want = "cuda" if ctx.device.startswith("cuda") else "cpu"
    check(
        res,
        f"precompute tasks ran on {want}",
        bool(computed) and all(s.get("device", "").startswith(want) for s in computed),
        str(run["precompute_tasks"]["devices"]),
    )
    check(
        res,
        "teacher built once per worker and reused across tasks",
        bool(builds) and all(v == 1 for v in builds.values()) and len(stats) > len(pids),
        f"{len(stats)} tasks on {len(pids)} worker(s), builds {list(builds.values())}",
    )


def _distill_evidence(ctx: Context, res: dict[str, Any], run: dict[str, Any], out: Any, prec: str) -> None:
    """What the Ray Train worker recorded in MLflow: device, autocast dtype, gradient scaler, loss curve."""
    from mlflow import MlflowClient

    r = out.distill
    client = MlflowClient(r.tracking_uri)
    tags = client.get_run(r.run_id).data.tags
    loss = [m.value for m in sorted(client.get_metric_history(r.run_id, "loss"), key=lambda m: m.step)]
    scale = [m.value for m in client.get_metric_history(r.run_id, "grad_scale")]
    run["distill"] = {
        "steps": r.steps,
        "final_loss": r.final_loss,
        "first_loss": loss[0] if loss else None,
        "worker_device": tags.get("worker_device"),
        "autocast_dtype": tags.get("autocast_dtype"),
        "grad_scaler": tags.get("grad_scaler"),
        "grad_scale_last": scale[-1] if scale else None,
        "run_id": r.run_id,
    }
    d = run["distill"]
    want_dev = "cuda" if ctx.device.startswith("cuda") else "cpu"
    want_amp = {"bf16": "bfloat16", "fp16": "float16", "fp32": "none"}[prec]
    check(
        res,
        f"distill {prec}: on {want_dev}, autocast {want_amp}, {r.steps}/{r.total_steps} steps, finite loss",
        str(d["worker_device"]).startswith(want_dev)
        and d["autocast_dtype"] == want_amp
        and r.steps == r.total_steps
        and r.final_loss is not None
        and math.isfinite(r.final_loss),
        f"device {d['worker_device']}, autocast {d['autocast_dtype']}, loss {d['first_loss']} -> {d['final_loss']}",
    )
    if prec == "fp16":
        check(
            res,
            "distill fp16: gradient scaler active",
            d["grad_scaler"] == "true" and d["grad_scale_last"] is not None and d["grad_scale_last"] > 0,
            f"scale {d['grad_scale_last']}",
        )


# ----------------------------------------------------------------------------------------------- markdown


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """The headline numbers, one line each (printed at the end and at the top of report.md)."""
    sec = data.get("sections", {})
    lines = []
    for name, e in sec.items():
        lines.append(
            f"{name}: {e.get('status')} ({e.get('seconds', '-')} s)"
            + (f" — {e['error']}" if e.get("error") else "")
        )
    env = sec.get("environment", {}).get("result", {})
    if env:
        gpu = env.get("gpu", {})
        lines.append(
            f"device {gpu.get('name', env.get('device'))}, torch {env.get('versions', {}).get('torch')}, "
            f"CUDA {env.get('versions', {}).get('cuda')}; matmul TFLOP/s "
            + ", ".join(f"{k} {v:.3g}" for k, v in env.get("matmul_tflops", {}).items())
        )
    cor = sec.get("correctness", {}).get("result", {})
    for c in cor.get("cases", []):
        lines.append(
            f"correctness {c['backbone']} {c['precision']}: teacher rel {c['teacher']['rel_l2']:.2e}, single rel "
            f"{c['single']['rel_l2']:.2e} (tol {REL_TOL[c['precision']]:.1e}) "
            + ("ok" if c["teacher"]["ok"] and c["single"]["ok"] else "FAIL")
        )
    thr = sec.get("throughput", {}).get("result", {})
    for b in thr.get("backbones", []):
        best, sp = b.get("best"), b.get("single_pass")
        if best:
            f = best.get("teacher_fraction_of_matmul")
            lines.append(
                f"throughput {b['backbone']} crop {b['crop']}: {best['teacher_windows_per_s']:.0f} win/s at batch "
                f"{best['window_batch']}, {best['teacher_tflops']:.1f} TFLOP/s"
                + (f" = {f:.2f} of matmul" if f is not None else "")
                + f", fold overhead {best['fold_overhead']:.2f}, peak {best.get('teacher_peak_gib')} GiB"
            )
        if sp:
            lines.append(
                f"  single pass {thr['image'][0]}x{thr['image'][1]}: {sp['seconds'] * 1e3:.1f} ms, teacher/single "
                f"{sp['teacher_over_single_seconds']:.1f}x time ({sp['teacher_over_single_flops']:.1f}x FLOPs)"
            )
    pro = sec.get("projection", {}).get("result", {})
    if pro.get("device_hours") is not None:
        lines.append(
            f"projection 25k SA-1B views, SigLIP2 crop 512 stride 24: {pro['windows']:.3g} windows, "
            f"{pro['tflops']:.3g} TFLOP, {pro['device_hours']:.1f} {pro.get('device')}-hours "
            f"({pro['rate_source']}), cache {pro['cache_bytes_float16_raw'] / 1e9:.0f} GB float16 raw"
        )
    pip = sec.get("pipeline", {}).get("result", {})
    for r in pip.get("runs", []):
        lines.append(
            f"pipeline distill {r['precision']}: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in r.get("seconds", {}).items())
        )
    for t in thr.get("targets", []):
        lines.append(f"target {t['name']}: {'met' if t['met'] else 'NOT met'} ({t['value']:.2f})")
    skipped = [f"{n}: {s}" for n, e in sec.items() for s in e.get("result", {}).get("skipped", [])]
    if skipped:
        lines.append("skipped: " + "; ".join(skipped))
    failed = [
        f"{n}: {c['name']}"
        for n, e in sec.items()
        for c in e.get("result", {}).get("checks", [])
        if not c["ok"]
    ]
    lines.append("failed checks: " + ("; ".join(failed) if failed else "none"))
    return lines


def render_markdown(data: dict[str, Any]) -> str:
    """report.md: summary, then per section its status, checks, error and full result."""
    meta = data.get("meta", {})
    out = [
        f"# spar GPU check ({meta.get('mode')} mode)",
        "",
        f"Started {meta.get('started')}, updated {meta.get('updated')}.",
        "",
    ]
    out += ["## Summary", ""] + [f"- {line}" for line in summary_lines(data)] + [""]
    for name, e in data.get("sections", {}).items():
        out += [
            f"## {name}: {e.get('status')}",
            "",
            f"{e.get('seconds', '-')} s (budget {e.get('budget_s', '-')} s)",
            "",
        ]
        checks = e.get("result", {}).get("checks", [])
        if checks:
            out += ["| check | ok | detail |", "|---|---|---|"]
            out += [f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |" for c in checks]
            out.append("")
        if e.get("traceback"):
            out += ["```", e["traceback"].rstrip(), "```", ""]
        body = {k: v for k, v in e.get("result", {}).items() if k != "checks"}
        out += [
            "<details><summary>result</summary>",
            "",
            "```json",
            json.dumps(_jsonable(body), indent=1)[:60000],
            "```",
            "</details>",
            "",
        ]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- run

SECTION_FNS: dict[str, Callable[[Context, dict[str, Any], Deadline], None]] = {
    "environment": section_environment,
    "correctness": section_correctness,
    "throughput": section_throughput,
    "projection": section_projection,
    "pipeline": section_pipeline,
}


def run(args: argparse.Namespace) -> int:
    """Run the sections in order; returns 0 when every section finished and every check passed."""
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    cuda = torch.cuda.is_available()
    mode = args.mode if args.mode != "auto" else ("gpu" if cuda else "cpu")
    if mode == "gpu" and not cuda:
        print("spar bench gpu: --mode gpu but CUDA is not available (use --mode cpu)", file=sys.stderr)
        return 2
    plan = GPU_PLAN if mode == "gpu" else CPU_PLAN
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTION_FNS]
    if unknown:
        print(f"spar bench gpu: unknown section(s) {unknown}; known: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="spar-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(
        out,
        {
            "mode": mode,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv,
            "budget_s": args.budget_s,
            "sections": names,
            "plan": asdict(plan),
            "workdir": str(work),
        },
    )
    ctx = Context(plan=plan, device="cuda" if mode == "gpu" else "cpu", report=report, workdir=work)
    t0 = time.perf_counter()
    old_term = signal.getsignal(signal.SIGTERM)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    say(f"mode {mode}, sections {', '.join(names)}, budget {args.budget_s:.0f} s, report in {out}")
    try:
        for i, name in enumerate(names):
            left = args.budget_s - (time.perf_counter() - t0)
            if left <= 5:
                e = report.section(name)
                e.update(status="skipped", error="the total budget was spent")
                report.save()
                continue
            # this section's share of what is left (time a section did not use passes on to the next ones)
            shares = [plan.budgets.get(n, 10) for n in names[i:]]
            budget = left * shares[0] / sum(shares)
            run_section(
                report, name, SECTION_FNS[name], ctx, budget, hard_s=min(budget * 1.6 + 10, left + 15)
            )
    except (Terminated, KeyboardInterrupt):
        say("stopped by a signal; the report holds everything measured so far")
    finally:
        report.data["meta"]["total_seconds"] = round(time.perf_counter() - t0, 1)
        report.save()
        if not ray_was_up:  # stop only the local cluster this run started
            _shutdown_ray()
        signal.signal(signal.SIGTERM, old_term)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + "=" * 100)
    print(
        f"spar GPU check ({mode} mode) in {report.data['meta']['total_seconds']} s; report: {out / 'report.md'}"
    )
    for line in summary_lines(report.data):
        print("  " + line)
    print("=" * 100, flush=True)
    statuses = [e.get("status") for e in report.data["sections"].values()]
    return 0 if all(s == "ok" for s in statuses) else 1


def _shutdown_ray() -> None:
    try:
        from pipeline.common.tasks import shutdown_ray

        shutdown_ray()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass
