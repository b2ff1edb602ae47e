"""Image resizing as the authors' code does it: OpenCV's ``INTER_LINEAR`` (the one home for it).

The reference resizes with mmcv/cv2 everywhere the numbers depend on it: the training-image generation
(``RandomResize`` and ``RandomCropOrFullImage`` in ``utils/image_generation_utils.py``) and the evaluation
``Resize(keep_ratio=True)``. ``INTER_LINEAR`` is bilinear with half-pixel centres
(``src = (dst + 0.5) · in/out − 0.5``, clamped at the edges) and *no* antialiasing when shrinking (PIL's
``BILINEAR``/``BICUBIC`` and torchvision's default low-pass filter first, which the reference never does).

Pure NumPy (ingest workers do not import torch), in OpenCV's scalar fixed-point arithmetic for 8-bit images:
source positions in float32, each tap weight rounded to 1/2048 (``INTER_RESIZE_COEF_BITS`` = 11), integer sums,
the result ``(sum + 2^21) >> 22`` (rounding half up). OpenCV's SIMD kernels approximate that last step, so real
cv2 output may still differ by one grey level at single pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["resize_linear", "linear_taps", "COEF_SCALE"]


COEF_SCALE = 2048  # OpenCV INTER_RESIZE_COEF_SCALE


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``(i0, i1)`` and integer weights ``(w0, w1)`` (in 1/2048) per output sample, as OpenCV."""
    scale = 1.0 / (n_out / n_in)  # cv2: scale_x = 1. / inv_scale_x
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    a = (f - i0.astype(np.float32)).astype(np.float32)
    left, right = i0 < 0, i0 >= n_in - 1
    i0 = np.where(left, 0, np.where(right, n_in - 1, i0))  # edges: one tap with weight 1
    a = np.where(left | right, np.float32(0), a)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = np.rint((np.float32(1) - a) * COEF_SCALE).astype(np.int32)
    w1 = np.rint(a * COEF_SCALE).astype(np.int32)
    return i0, i1, w0, w1


def resize_linear(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) uint8 image to ``size`` = (h, w) as cv2 ``INTER_LINEAR`` → uint8."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {h}x{w}")
    if img.shape[:2] == (h, w):
        return img
    a = img.astype(np.int32)
    x0, x1, wx0, wx1 = linear_taps(img.shape[1], w)
    y0, y1, wy0, wy1 = linear_taps(img.shape[0], h)
    ex = (1, -1) + (1,) * (a.ndim - 2)
    rows = a[:, x0] * wx0.reshape(ex) + a[:, x1] * wx1.reshape(ex)  # (H, w[, C]) horizontal pass, < 2^20
    ey = (-1,) + (1,) * (a.ndim - 1)
    out = rows[y0] * wy0.reshape(ey) + rows[y1] * wy1.reshape(ey)  # (h, w[, C]) < 2^31
    return ((out + (1 << 21)) >> 22).clip(0, 255).astype(np.uint8)
