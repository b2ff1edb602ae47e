"""Distillation objective (MSE onto the teacher's dense features) and trainable-parameter selection."""

from __future__ import annotations

import torch

from spar_core.backbones import Backbone, BackboneError

__all__ = ["distill_loss", "trainable_parameters"]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Plain MSE over all positions and channels: mean((student - teacher)^2).

    student, teacher: (B, h, w, D) (any equal shapes); computed in float32.
    """
    if student.shape != teacher.shape:
        raise BackboneError(
            f"student features {tuple(student.shape)} and teacher targets {tuple(teacher.shape)} differ in shape"
        )
    return (student.float() - teacher.float()).pow(2).mean()


def trainable_parameters(backbone: Backbone, last_k: int | str = 2) -> list[torch.nn.Parameter]:
    """Freeze the backbone except its last ``k`` blocks (0: none, ``"all"``: all) and return those parameters."""
    backbone.set_trainable(last_k)
    return [p for p in backbone.parameters() if p.requires_grad]
