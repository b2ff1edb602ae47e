"""``loader_workers = "auto"``: how many decode processes keep one trainer fed, so that the data wait stays under
5 % of the step time (``spar bench loader`` measures the figures this rests on; BENCHMARKS.md "Loader vs step").

Per sample the loader decodes the PNG and hashes its pixels (cost ~ pixels) and reads and checks the cached target
(cost ~ stored bytes); the trainer's step costs ~ its FLOPs. With ``n`` decode processes in steady state the loader
delivers ``n / t_load`` samples/s against ``1 / t_step`` consumed, so ``n >= t_load / t_step`` leaves no wait;
``HEADROOM`` covers the spread between samples and processes. ``n <= 1`` is the in-process decode thread
(``loader_workers = 0``): no hand-over between processes.

Pure arithmetic (no I/O, no torch); the driver hands in the image sizes, the target width and the device kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "GPU_STEP_FLOPS_PER_S",
    "CPU_STEP_FLOPS_PER_S",
    "LoaderSizing",
    "sample_load_seconds",
    "student_step_flops",
    "auto_loader_workers",
]

# one decode thread, one core of an AMD EPYC (Zen 4, AVX512-BF16, no AMX), 2048x1024 PNG (level 1) + its 64x128x512 float16 target
# (spar bench loader, BENCHMARKS.md "Loader vs step"): PNG decode + pixel sha256 per pixel, tar read included;
# Zarr read (zstd) + sha256 check per stored target byte
DECODE_S_PER_PIXEL = 36e-9  # 11.0 ms tar read + 64.2 ms decode and hash per 2048x1024 image
READ_S_PER_TARGET_BYTE = 5.1e-9  # 42.9 ms per 8.4 MB target
# a distillation step's rate on a GPU: the teacher's measured share of the bf16 matmul rate (0.36) times that rate
# on the fastest GPU measured (H200, 797 TFLOP/s; docs/bench/gpu-h200-2026-11-26). A slower GPU needs fewer decoders:
# sizing for the fastest over-provisions there, never under.
GPU_STEP_FLOPS_PER_S = 0.36 * 797e12
# the same on a CPU: a fast one (so the step is not overestimated); measured ViT-B/16 step at 2048x1024 on the
# Zen 4 above (spar bench loader) is well below it, and one decode thread keeps up with any CPU step by far
CPU_STEP_FLOPS_PER_S = 2e12
HEADROOM = 1.25


@dataclass(frozen=True)
class LoaderSizing:
    """What ``auto`` decided and why (logged by the driver)."""

    workers: int  # loader_workers to use (0 = one decode thread in the trainer)
    load_s: float  # estimated seconds of one decode thread per sample
    step_s: float  # estimated seconds of one training step
    capped: bool  # True when ``max_workers`` kept it below what the estimate asks for


def sample_load_seconds(height: int, width: int, target_bytes: int) -> float:
    """Estimated seconds one decode thread spends on one sample (image ``height x width``, stored target bytes)."""
    return height * width * DECODE_S_PER_PIXEL + target_bytes * READ_S_PER_TARGET_BYTE


def student_step_flops(forward_flops: float, depth: int, trainable_blocks: int) -> float:
    """FLOPs of one step: the student's forward, plus the backward through its trainable blocks (~2x their
    forward: gradients of inputs and of weights). ``forward_flops``: the dense forward at the image's size."""
    per_block = forward_flops / depth
    return forward_flops + 2.0 * min(trainable_blocks, depth) * per_block


def auto_loader_workers(load_s: float, step_s: float, max_workers: int) -> LoaderSizing:
    """Decode processes for a step of ``step_s`` seconds and ``load_s`` seconds of decoding per sample (see the
    module docstring); at most ``max_workers``. 0 when one decode thread keeps up."""
    if step_s <= 0:
        raise ValueError(f"step_s must be > 0, got {step_s}")
    need = math.ceil(HEADROOM * load_s / step_s)
    if need <= 1:
        return LoaderSizing(0, load_s, step_s, False)
    n = min(need, max(1, max_workers))
    return LoaderSizing(n, load_s, step_s, n < need)
