"""What every benchmark measures with: the machine's matmul rate, a ViT's analytic FLOPs per forward, timing that
waits for the device, the CPU's name, and a scratch folder that goes away after the run.

The benchmarks (:mod:`pipeline.bench.teacher`, ``cache``, ``train``, ``ingest`` and the GPU check in
:mod:`pipeline.bench.gpu`) report rates as a fraction of what this machine's matmuls reach, so the FLOP count of a
teacher window and the matmul rate come from here, one definition each.
"""

from __future__ import annotations

import contextlib
import json
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.eval.model import synchronize
from pipeline.train.config import DistillConfig
from pipeline.train.step import StepRunner
from spar_core.backbones import Backbone, build_backbone
from spar_core.distill import trainable_parameters
from spar_core.flops import vit_arch, vit_dense_flops

T = TypeVar("T")

# ------------------------------------------------------------------------------------------ machine


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(path: str | None, obj: Any) -> None:
    """``--json PATH``: the results written there as indented JSON (nothing when no path is given)."""
    if path:
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def scratch_dir(workdir: str | None, prefix: str) -> Iterator[Path]:
    """``workdir`` when given (kept), else a fresh temporary folder removed when the block ends."""
    if workdir:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)


# ------------------------------------------------------------------------------------------ timing


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds, the device synchronised before and after."""
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def fastest(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Fastest of ``repeats`` synchronised calls after one warm-up call, in seconds."""
    fn()
    return min(timed(fn, device)[1] for _ in range(repeats))


def step_times(runner: StepRunner, items: Iterable[dict[str, Any]], n: int, skip: int) -> list[float]:
    """Per-step wall times (data wait + step), the first ``skip`` steps (loader start-up) not counted."""
    out = []
    it = iter(items)
    for s in range(n + skip):
        t0 = time.perf_counter()
        item = next(it)
        loss, _ = runner.step(item, s)
        float(loss)
        if s >= skip:
            out.append(time.perf_counter() - t0)
    return out


def cpu_runner(
    backbone: str,
    cfg: DistillConfig,
    total: int,
    crop: int = 0,
    stride: int = 0,
    *,
    pretrained: str | None = None,
    blocks: int = 2,
    seed: int = 0,
) -> StepRunner:
    """The training step on the CPU: ``backbone`` as its own student (its last ``blocks`` blocks trained, torch
    seeded with ``seed``) and, with ``cfg.teacher_online``, a second copy as the teacher (``crop``, ``stride``)."""
    torch.manual_seed(seed)
    bb = build_backbone(backbone, pretrained)
    params = trainable_parameters(bb, blocks)
    teacher = build_backbone(backbone, pretrained) if cfg.teacher_online else None
    cpu = torch.device("cpu")
    return StepRunner(bb, bb, params, cfg, cpu, total, teacher=teacher, crop=crop, stride=stride)


def matmul_gflops(
    dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, device: str = "cpu", inner: int = 1
) -> float:
    """Sustained GFLOP/s of a square matmul of up to n x n in ``dtype`` (best of repeated timings).

    The size starts at 256 and doubles up to ``n`` only while one matmul of the next size would take under a
    quarter of ``seconds``: a dtype that this machine emulates (bf16 on a CPU without AVX512-BF16 or AMX runs at
    well under 1 GFLOP/s, so one 2048^3 product takes minutes) is measured in about ``seconds`` too. Each timing
    covers ``inner`` back-to-back matmuls between two synchronisations (on a GPU a single 8192^3 GEMM takes about
    a millisecond, so timing several hides the launch and synchronisation cost)."""
    size = min(n, 256)
    while True:
        a, b, c = _matmul_operands(size, dtype, device)
        torch.matmul(a, b, out=c)  # warm-up (kernel choice, lazy initialisation)
        t_one = _timed_matmuls(a, b, c, device, 1)
        if size >= n or 8 * t_one > seconds / 4:  # twice the size: eight times the work
            break
        size = min(n, 2 * size)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        best = max(best, inner * 2 * size**3 / _timed_matmuls(a, b, c, device, inner) / 1e9)
    return best


def _matmul_operands(
    n: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return a, b, torch.empty(n, n, device=device, dtype=dtype)


def _timed_matmuls(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, device: str, inner: int) -> float:
    """Seconds for ``inner`` back-to-back ``a @ b`` (into ``c``), synchronised before and after."""
    return timed(lambda: [torch.matmul(a, b, out=c) for _ in range(inner)], device)[1]


# ------------------------------------------------------------------------------------------ FLOPs


def vit_window_flops(bb: Backbone, crop: int) -> dict[str, float]:
    """Analytic FLOPs of one ``crop x crop`` teacher window (see :func:`vit_dense_flops`)."""
    return vit_dense_flops(vit_arch(bb), crop, crop)


def counted_window_flops(bb: Backbone, crop: int) -> float:
    """FLOPs of one window as counted by torch's FlopCounterMode (cross-check of the analytic count)."""
    x = torch.randn(1, 3, crop, crop)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.dense(x)
    return float(fc.get_total_flops())
