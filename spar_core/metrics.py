"""Segmentation and feature-fidelity metrics."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["IoUAccumulator", "feature_fidelity"]


class IoUAccumulator:
    """Intersection/union counts over a whole evaluation set; mIoU is computed once at the end.

    Pixels whose label is ``ignore_index`` are skipped. Labels outside ``[0, num_classes)`` (other than the
    ignore index) are counted in ``out_of_range`` and skipped, never crash the evaluation.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be > 0, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.intersection = np.zeros(num_classes, dtype=np.int64)
        self.union = np.zeros(num_classes, dtype=np.int64)
        self.label_area = np.zeros(num_classes, dtype=np.int64)
        self.out_of_range = 0

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        """Add one batch. pred, label: integer arrays of the same shape."""
        pred, label = (torch.as_tensor(a).long().flatten() for a in (pred, label))
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        k = self.num_classes
        valid = label != self.ignore_index
        in_range = (label >= 0) & (label < k)
        self.out_of_range += int((valid & ~in_range).sum())
        keep = valid & in_range
        pred, label = pred[keep].cpu(), label[keep].cpu()
        pred_ok = (pred >= 0) & (pred < k)
        inter = torch.bincount(label[pred == label], minlength=k).numpy()
        area_pred = torch.bincount(pred[pred_ok], minlength=k).numpy()
        area_label = torch.bincount(label, minlength=k).numpy()
        self.intersection += inter
        self.label_area += area_label
        self.union += area_pred + area_label - inter

    def merge(self, other: IoUAccumulator) -> None:
        """Add another accumulator's counts (e.g. from a parallel worker)."""
        self.intersection += other.intersection
        self.union += other.union
        self.label_area += other.label_area
        self.out_of_range += other.out_of_range

    def iou(self) -> np.ndarray:
        """Per-class IoU (num_classes,); NaN for classes absent from both labels and predictions."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in the labels or predictions."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


def feature_fidelity(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Distance of dense features ``a`` to reference ``b``: MSE and mean cosine over positions. a, b: (..., D)."""
    if a.shape != b.shape:
        raise ValueError(f"feature shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.float(), b.float()
    mse = (a - b).pow(2).mean()
    cos = torch.nn.functional.cosine_similarity(
        a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1
    )
    return {"mse": float(mse), "cosine": float(cos.mean())}
