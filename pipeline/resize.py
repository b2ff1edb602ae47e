"""Image resizing as the authors' code does it: OpenCV's ``INTER_LINEAR`` (the one home for it).

The reference resizes with mmcv/cv2 everywhere the numbers depend on it: the training-image generation
(``RandomResize`` and ``RandomCropOrFullImage`` in ``utils/image_generation_utils.py``) and the evaluation
``Resize(keep_ratio=True)``. ``INTER_LINEAR`` is bilinear with half-pixel centres
(``src = (dst + 0.5) · in/out − 0.5``, clamped at the edges) and *no* antialiasing when shrinking (PIL's
``BILINEAR``/``BICUBIC`` and torchvision's default low-pass filter first, which the reference never does).

Pure NumPy (ingest workers do not import torch); float32 weights, rounded half up to uint8. OpenCV itself uses
11-bit fixed-point weights, so single pixels can differ by one grey level from it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_linear", "linear_taps"]


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(i0, i1)`` and weight ``lam`` of ``i1`` for each of ``n_out`` output samples."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)  # left edge: clamp (cv2: sx < 0 -> sx = 0, fx = 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)  # right edge: both taps on the last pixel
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) uint8 image to ``size`` = (h, w) as cv2 ``INTER_LINEAR`` → uint8."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {h}x{w}")
    if img.shape[:2] == (h, w):
        return img
    a = img.astype(np.float32)
    y0, y1, ly = linear_taps(img.shape[0], h)
    x0, x1, lx = linear_taps(img.shape[1], w)
    ly = ly.reshape((-1,) + (1,) * (a.ndim - 1))  # (h, 1[, 1])
    rows = a[y0] * (1.0 - ly) + a[y1] * ly  # (h, W[, C])
    lx = lx.reshape((1, -1) + (1,) * (a.ndim - 2))  # (1, w[, 1])
    out = rows[:, x0] * (1.0 - lx) + rows[:, x1] * lx  # (h, w[, C])
    return np.floor(out + 0.5).clip(0, 255).astype(np.uint8)
