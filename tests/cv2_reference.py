"""An independent re-implementation of OpenCV's ``cv2.resize(..., interpolation=cv2.INTER_LINEAR)`` for tests.

Written from OpenCV's ``resizeGeneric`` (imgproc/src/resize.cpp): for output index ``d`` the source coordinate
is ``f = (d + 0.5) * (in / out) - 0.5``, ``s = floor(f)``, ``a = f - s``; if ``s < 0`` then ``s = 0, a = 0``;
if ``s >= in - 1`` then ``s = in - 1, a = 0``; the value is ``(1 - a) * src[s] + a * src[s + 1]``, separably
along x then y, with no low-pass filter. OpenCV rounds its 11-bit fixed-point result; this keeps float64.
(cv2 is not installed here; this is the formula, one tap at a time, in plain Python loops.)
"""

from __future__ import annotations

import math

import numpy as np


def cv2_taps(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
    """(left index, right index, right weight) per output sample, one at a time."""
    scale = 1.0 / (n_out / n_in)  # cv2: scale_x = 1. / inv_scale_x, inv_scale_x = dsize.width / ssize.width
    taps = []
    for d in range(n_out):
        f = (d + 0.5) * scale - 0.5
        s = math.floor(f)
        a = f - s
        if s < 0:
            s, a = 0, 0.0
        if s >= n_in - 1:
            s, a = n_in - 1, 0.0
        taps.append((s, min(s + 1, n_in - 1), a))
    return taps


def cv2_linear_float(src: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W[, C]) -> (h, w[, C]) float64, INTER_LINEAR before the final rounding."""
    a = src.astype(np.float64)
    rows = np.stack([(1 - t) * a[i] + t * a[j] for i, j, t in cv2_taps(a.shape[0], h)])  # (h, W[, C])
    cols = [(1 - t) * rows[:, i] + t * rows[:, j] for i, j, t in cv2_taps(a.shape[1], w)]
    return np.stack(cols, axis=1)  # (h, w[, C])


def cv2_linear(src: np.ndarray, h: int, w: int) -> np.ndarray:
    """INTER_LINEAR rounded half up to uint8."""
    return np.floor(cv2_linear_float(src, h, w) + 0.5).clip(0, 255).astype(np.uint8)


def cv2_linear_pixel(src: np.ndarray, h: int, w: int, y: int, x: int) -> np.ndarray:
    """One output pixel straight from the 2x2 neighbourhood (a per-pixel check of the separable form)."""
    (y0, y1, ay), (x0, x1, ax) = cv2_taps(src.shape[0], h)[y], cv2_taps(src.shape[1], w)[x]
    s = src.astype(np.float64)
    return (1 - ay) * ((1 - ax) * s[y0, x0] + ax * s[y0, x1]) + ay * ((1 - ax) * s[y1, x0] + ax * s[y1, x1])


def cv2_fixed_taps(n_in: int, n_out: int) -> list[tuple[int, int, int, int]]:
    """OpenCV's 8-bit taps: ``fx`` in float32, weights ``cvRound(w * 2048)`` (INTER_RESIZE_COEF_BITS = 11)."""
    scale = 1.0 / (n_out / n_in)
    taps = []
    for d in range(n_out):
        fx = np.float32((d + 0.5) * scale - 0.5)
        sx = math.floor(fx)
        fx = np.float32(fx - np.float32(sx))
        if sx < 0:
            sx, fx = 0, np.float32(0)
        if sx >= n_in - 1:
            sx, fx = n_in - 1, np.float32(0)
        w0 = int(np.rint(np.float32(np.float32(1) - fx) * np.float32(2048)))
        w1 = int(np.rint(fx * np.float32(2048)))
        taps.append((sx, min(sx + 1, n_in - 1), w0, w1))
    return taps


def cv2_fixed_pixel(src: np.ndarray, h: int, w: int, y: int, x: int) -> np.ndarray:
    """One output pixel of OpenCV's scalar fixed-point INTER_LINEAR: horizontal integer sums, then
    ``(b0 * row0 + b1 * row1 + (1 << 21)) >> 22`` (FixedPtCast with 22 bits)."""
    y0, y1, b0, b1 = cv2_fixed_taps(src.shape[0], h)[y]
    x0, x1, a0, a1 = cv2_fixed_taps(src.shape[1], w)[x]
    out = []
    for c in range(src.shape[2]):
        r0 = int(src[y0, x0, c]) * a0 + int(src[y0, x1, c]) * a1
        r1 = int(src[y1, x0, c]) * a0 + int(src[y1, x1, c]) * a1
        out.append((b0 * r0 + b1 * r1 + (1 << 21)) >> 22)
    return np.array(out, dtype=np.uint8)


def cv2_fixed(src: np.ndarray, h: int, w: int) -> np.ndarray:
    """A whole (H, W, C) uint8 image through :func:`cv2_fixed_pixel`'s arithmetic, pixel by pixel."""
    ty, tx = cv2_fixed_taps(src.shape[0], h), cv2_fixed_taps(src.shape[1], w)
    s = src.astype(np.int64)
    out = np.zeros((h, w, src.shape[2]), np.uint8)
    for y, (y0, y1, b0, b1) in enumerate(ty):
        for x, (x0, x1, a0, a1) in enumerate(tx):
            r0 = s[y0, x0] * a0 + s[y0, x1] * a1
            r1 = s[y1, x0] * a0 + s[y1, x1] * a1
            out[y, x] = (b0 * r0 + b1 * r1 + (1 << 21)) >> 22
    return out
