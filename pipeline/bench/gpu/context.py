"""What the GPU check's sections share: the plan, the device, the report, the CPU fp32 models (built once), and
the rates measured so far (the environment section's matmul rates, the throughput section's teacher rates, which
the projection section turns into device-hours). Also the device utilities the sections time and compare with:
the sample photo at a given size, TF32 and strict-attention switches, peak memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.bench.gpu.plan import PHOTO, Plan
from pipeline.bench.gpu.report import Report
from pipeline.bench.measure import sync
from pipeline.common.photos import sample_photo_rgb
from spar_core.backbones import Backbone, build_backbone


@dataclass
class Context:
    """What the sections share: the plan, the device, built models, measured rates."""

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

    def sync(self) -> None:
        sync(self.device)

    def free(self) -> None:
        """Return cached device memory (between backbones)."""
        if self.cuda:
            torch.cuda.empty_cache()

    def peak_reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        """Peak device memory since :meth:`peak_reset` in GiB (None on CPU)."""
        if self.cuda:
            return round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return None


def photo(h: int, w: int) -> np.ndarray:
    """The sample photo resized (PIL bicubic) to (h, w, 3) uint8."""
    return np.array(Image.fromarray(sample_photo_rgb(PHOTO)).resize((w, h), Image.BICUBIC))


@contextlib.contextmanager
def tf32(enabled: bool) -> Iterator[None]:
    """Set cuBLAS and cuDNN TF32 for the block (strict fp32 when disabled), then restore."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def strict_sdpa(enabled: bool) -> Iterator[None]:
    """Attention through the plain fp32 math kernel (no fused kernel that may use TF32), when enabled."""
    if not enabled:
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
