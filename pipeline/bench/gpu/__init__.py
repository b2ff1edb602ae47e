"""``spar bench gpu``: one prepared check of the GPU path, measured end to end, that never loses what it measured.

Sections, in order, each in its own ``try`` with its share of what is left of ``--budget-s`` (a soft budget it sizes
its optional work by, and a hard limit past which SIGALRM interrupts it); the JSON + Markdown report is rewritten
after every section and after every item inside one, so a crash, a timeout or a SIGTERM keeps what was measured:

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
This module: the plans (sizes per mode, time shares, tolerances), the report, one section under its time limits;
:mod:`.checks`: the sections; :mod:`.command`: the command, which runs them. Ray and tqdm read their settings from
the environment when imported, so the command sets it before importing the sections.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from pipeline.common.photos import sample_photo_rgb
from pipeline.common.storage import write_bytes_atomic
from spar_core.backbones import Backbone, build_backbone

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


GPU_BUDGETS = {"environment": 20, "correctness": 70, "throughput": 50, "projection": 10, "pipeline": 185}


@dataclass(frozen=True)
class PipelinePlan:
    """Sizes of the pipeline section (the defaults are the gpu mode's)."""

    backbone: str = "maskclip-vit-b16"
    crop: int = 224
    train_photos: int = 23  # how many of the demo's training photos
    heldout_photos: int = 3
    shard_size: int = 8
    target_long: int = 1024
    target_short: int = 768
    min_short: int = 448
    max_side: int = 1024
    steps: int = 60
    # AdamW step size for this random-weight backbone and step count. ViT-B/16: 1e-3 diverged on the H200 (loss
    # 0.15 -> 0.41, student worse than the single pass); a CPU sweep over 40 steps gave held-out MSE 0.053 (1e-3),
    # 0.014 (3e-4), 0.011 (1e-4) vs 0.015
    lr: float = 1e-4
    precisions: tuple[str, ...] = ("bf16", "fp16")  # distill precisions, one run each
    eval_precision: str = "bf16"
    loader_workers: int = 2
    cpus_per_task: int = 4
    window_batch: int = 128
    segment_short_side: int = 448


@dataclass(frozen=True)
class Plan:
    """Everything the sections size themselves by (the defaults are the gpu mode's)."""

    mode: str = "gpu"
    matmul_n: int = 8192  # n^3 matmuls, timed for matmul_seconds, matmul_inner per timing
    matmul_seconds: float = 1.5
    matmul_inner: int = 10
    correctness: tuple[tuple[str, int, int], ...] = (  # (backbone, height, width)
        ("maskclip-vit-b16", 448, 672), ("siglip2-vit-b16-512", 512, 768))  # fmt: skip
    correctness_window_batch: int = 64
    throughput: tuple[tuple[str, int, tuple[int, ...]], ...] = (  # (backbone, crop, window batches)
        ("maskclip-vit-b16", 224, (64, 128, 256)), ("siglip2-vit-b16-512", 512, (16, 32, 64)))  # fmt: skip
    throughput_image: tuple[int, int] = (1344, 2016)  # teacher and single pass on this image (H, W)
    throughput_repeats: int = 2
    projection_views: int = 25_000
    pipeline: PipelinePlan = PipelinePlan()
    budgets: dict[str, float] = field(default_factory=lambda: dict(GPU_BUDGETS))  # share of --budget-s


GPU_PLAN = Plan()
CPU_PLAN = Plan(
    mode="cpu", matmul_n=512, matmul_seconds=0.3, matmul_inner=2,
    correctness=(("tiny-clip-64", 112, 176), ("tiny-clip-224", 224, 288)), correctness_window_batch=8,
    throughput=(("tiny-clip-64", 64, (8, 32)),), throughput_image=(192, 288), throughput_repeats=1,
    projection_views=2_000,
    pipeline=PipelinePlan(
        backbone="tiny-clip-64", crop=64, train_photos=4, heldout_photos=2, shard_size=2, target_long=160,
        target_short=112, min_short=64, max_side=160, steps=3,
        lr=1e-3,  # the demo's step size for its tiny random model
        precisions=("bf16", "fp32"), eval_precision="fp32", loader_workers=0, cpus_per_task=1, window_batch=16,
        segment_short_side=96,
    ),
    budgets={"environment": 10, "correctness": 20, "throughput": 15, "projection": 5, "pipeline": 150},
)  # fmt: skip


class Report:
    """``report.json`` (everything) and ``report.md`` (readable), each rewritten atomically on save (temp file +
    rename: a kill mid-write leaves the previous version)."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"meta": meta, "sections": {}}

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def save(self) -> None:
        self.data["meta"]["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        write_bytes_atomic(str(self.out / "report.json"), json.dumps(jsonable(self.data), indent=1).encode())
        try:
            md = render_markdown(self.data)
        except Exception:  # noqa: BLE001 - the JSON is what counts; say why the Markdown is missing
            md = "# GPU check\n\nMarkdown rendering failed:\n\n```\n" + traceback.format_exc() + "```\n"
        write_bytes_atomic(str(self.out / "report.md"), md.encode())


def jsonable(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become strings ("nan", "inf"), unknown objects their str()."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, bool | int | str) or x is None:
        return x
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else str(float(x))
    return int(x) if isinstance(x, np.integer) else str(x)


def say(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def headline(result: dict[str, Any], line: str) -> None:
    """A headline number of a section: said now, and listed in the report's summary."""
    result.setdefault("summary", []).append(line)
    say(line)


def check(result: dict[str, Any], name: str, ok: bool, detail: str = "") -> bool:
    result.setdefault("checks", []).append({"name": name, "ok": bool(ok), "detail": detail})
    return bool(ok)


def summary_lines(data: dict[str, Any]) -> list[str]:
    """Each section's status and headlines, what was skipped and the failed checks (printed at the end, and at the
    top of report.md)."""
    sec = data.get("sections", {})
    results = {n: e.get("result", {}) for n, e in sec.items()}
    lines = [f"{n}: {e.get('status')} ({e.get('seconds', '-')} s)" + (f" — {e['error']}" if e.get("error") else "")
             for n, e in sec.items()] + [line for r in results.values() for line in r.get("summary", [])]  # fmt: skip
    skipped = [f"{n}: {s}" for n, r in results.items() for s in r.get("skipped", [])]
    failed = [f"{n}: {c['name']}" for n, r in results.items() for c in r.get("checks", []) if not c["ok"]]
    return [*lines, *(["skipped: " + "; ".join(skipped)] if skipped else []),
            "failed checks: " + ("; ".join(failed) if failed else "none")]  # fmt: skip


def render_markdown(data: dict[str, Any]) -> str:
    """report.md: the summary, then per section its status, checks, traceback and full result."""
    meta = data.get("meta", {})
    out = [f"# spar GPU check ({meta.get('mode')} mode)", "", f"Started {meta.get('started')}, updated "
           f"{meta.get('updated')}.", "", "## Summary", "", *(f"- {line}" for line in summary_lines(data)), ""]  # fmt: skip
    for name, e in data.get("sections", {}).items():
        result = e.get("result", {})
        out += [f"## {name}: {e.get('status')}", "", f"{e.get('seconds', '-')} s (budget {e.get('budget_s', '-')} s)", ""]  # fmt: skip
        if result.get("checks"):
            rows = [
                f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['detail']} |"
                for c in result["checks"]
            ]
            out += ["| check | ok | detail |", "|---|---|---|", *rows, ""]
        if e.get("traceback"):
            out += ["```", e["traceback"].rstrip(), "```", ""]
        body = json.dumps(jsonable({k: v for k, v in result.items() if k != "checks"}), indent=1)
        out += ["<details><summary>result</summary>", "", "```json", body[:60000], "```", "</details>", ""]
    return "\n".join(out)


C = TypeVar("C")  # what the sections share (Context)
Left = Callable[[], float]  # seconds left of a section's soft budget (negative once spent)


class SectionTimeout(Exception):
    """A section ran past its hard time limit."""


class Terminated(BaseException):
    """The process got SIGTERM (e.g. from ``timeout``): record it, write the report, stop."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated("SIGTERM")


@contextlib.contextmanager
def hard_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread() or seconds <= 0:
        yield
        return

    def fire(signum: int, frame: FrameType | None) -> None:
        raise SectionTimeout(f"section ran past its hard limit of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_section(report: Report, name: str, fn: Callable[[C, dict[str, Any], Left], None], ctx: C,
                budget_s: float, hard_s: float | None = None) -> str:  # fmt: skip
    """Run one section: ``fn(ctx, result, left)`` fills ``result`` as it goes (``ctx.save()`` writes it).

    ``budget_s`` is the soft budget the section sizes its optional work by (``left()``); past ``hard_s`` (default
    1.6 x budget + 10 s) it is interrupted. An exception or the hard limit is recorded with its traceback and the
    caller goes on with the next section; SIGTERM is recorded, the report written, and re-raised. Returns the
    section's status.
    """
    entry, result = report.section(name), {}
    entry.clear()
    entry.update(status="running", budget_s=round(budget_s, 1), result=result)
    report.save()
    say(f"{name}: start (budget {budget_s:.0f} s)")
    t0 = time.perf_counter()
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)  # re-armed per section: Ray may install its own
        with hard_limit(hard_s if hard_s is not None else budget_s * 1.6 + 10):
            fn(ctx, result, lambda: t0 + budget_s - time.perf_counter())
        entry["status"] = "ok"
    except SectionTimeout as e:
        entry.update(status="timeout", error=str(e), traceback=traceback.format_exc())
    except Exception as e:  # noqa: BLE001 - recorded, and the next section runs
        entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    except (Terminated, KeyboardInterrupt) as e:
        killed = isinstance(e, Terminated)
        entry.update(status="killed" if killed else "interrupted", traceback=traceback.format_exc())
        entry.update({"error": "SIGTERM"} if killed else {}, seconds=round(time.perf_counter() - t0, 2))
        report.save()
        raise
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    failed = [c["name"] for c in result.get("checks", []) if not c.get("ok")]
    if failed and entry["status"] == "ok":
        entry["status"] = "checks-failed"
    report.save()
    error = f" ({entry['error']})" if "error" in entry else ""
    say(f"{name}: {entry['status']} in {entry['seconds']:.1f} s{error}")
    if failed:
        say(f"{name}: failed checks: {', '.join(failed)}")
    return entry["status"]


@dataclass
class Context:
    """What the sections share: the plan, the device, the report, the CPU fp32 models (built once), and the rates
    measured so far (the environment's matmul rates, the throughput's teacher rates, used by the projection)."""

    plan: Plan
    device: str
    report: Report
    workdir: Path
    cpu_models: dict[str, Backbone] = field(default_factory=dict)
    matmul_tflops: dict[str, float] = field(default_factory=dict)
    teacher_rates: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def save(self) -> None:
        self.report.save()

    def cpu_model(self, name: str) -> Backbone:
        """The backbone ``name`` on CPU in fp32, random weights (seed 0), built once."""
        if name not in self.cpu_models:
            self.cpu_models[name] = build_backbone(name, device="cpu")
        return self.cpu_models[name]

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def peak_reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 3) if self.cuda else None


def photo(h: int, w: int) -> np.ndarray:
    return np.array(Image.fromarray(sample_photo_rgb(PHOTO)).resize((w, h), Image.BICUBIC))


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set cuBLAS and cuDNN TF32 for the block (strict fp32 when disabled), then restore."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
