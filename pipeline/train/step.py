"""One optimizer step of distillation and its learning-rate schedule; shared by the Ray Train worker and the
benchmarks.

A step: the batch's uint8 images are normalised, the teacher target is read from the batch (cache) or computed by
the sliding-window teacher (online), the student's single pass runs under the run's precision
(:mod:`pipeline.common.precision`; fp16 adds a GradScaler), and AdamW updates the trainable blocks on the MSE.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from pipeline.common.precision import Precision, autocast, autocast_dtype, resolve
from pipeline.train.config import DistillError
from spar_core.backbones import Backbone
from spar_core.distill import distill_loss
from spar_core.sliding import sliding_window_features

__all__ = ["StepRunner", "StepSettings", "lr_at", "step_precision"]


class StepSettings(Protocol):
    """What a step reads from the run's settings (a DistillConfig or a DistillPlan)."""

    lr: float
    weight_decay: float
    warmup_steps: int
    schedule: str
    grad_clip: float
    precision: str
    window_batch: int


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant (``schedule`` "none" or
    "constant") or cosine to 0 at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return base_lr


def step_precision(name: str, device: torch.device) -> Precision:
    """The precision a step runs in on ``device`` (``auto``: the fastest there); fp16 needs a GPU."""
    p = resolve(name, device)
    if p == "fp16" and device.type != "cuda":
        raise DistillError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return p


class StepRunner:
    """One optimizer step of distillation on ``model`` (``bb`` itself, or its DDP wrapper)."""

    def __init__(
        self,
        bb: Backbone,
        model: torch.nn.Module,
        params: list[torch.nn.Parameter],
        cfg: StepSettings,
        device: torch.device,
        total_steps: int,
        teacher: Backbone | None = None,
        crop: int = 0,
        stride: int = 0,
    ) -> None:
        self.bb, self.model, self.params, self.cfg = bb, model, params, cfg
        self.device, self.total_steps = device, total_steps
        self.teacher, self.crop, self.stride = teacher, crop, stride
        self.precision = step_precision(cfg.precision, device)
        self.autocast_dtype = autocast_dtype(self.precision)
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def target(self, item: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        """The teacher target (B, h, w, D) float32: from the cache, or computed online."""
        if self.teacher is None:
            return item["target"].to(self.device, non_blocking=True).float()
        with torch.no_grad():
            return sliding_window_features(
                self.teacher, x, self.crop, self.stride, self.cfg.window_batch, self.autocast_dtype
            )

    def step(self, item: dict[str, Any], step: int) -> tuple[torch.Tensor, float]:
        """Train on one batch as optimizer step ``step``; returns (detached loss, lr used)."""
        lr = lr_at(step, self.cfg.lr, self.cfg.warmup_steps, self.cfg.schedule, self.total_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        img = item["image"].to(self.device, non_blocking=True)  # (B, H, W, 3) uint8
        x = self.bb.normalize(img)  # (B, 3, H, W)
        target = self.target(item, x)  # (B, H/p, W/p, D)
        with autocast(self.device, self.precision):
            out = self.model(x)  # (B, H/p, W/p, D)
        loss = distill_loss(out.float(), target)
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        return loss.detach(), lr
