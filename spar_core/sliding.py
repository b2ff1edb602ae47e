"""The sliding-window teacher, vectorised.

Windows of ``crop x crop`` pixels at stride ``stride`` (plus a boundary window flush with the far edge) are run in
batches through the backbone's single-pass ``dense``; their features are upsampled by the fine-grid factor ``r``
and summed into a canvas of cells ``p/r`` pixels wide with one ``index_add_`` per window batch (no Python loop
per window), divided by the per-cell coverage count, and resized bilinearly to the patch grid ``(H/p, W/p)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from spar_core.backbones import Backbone, BackboneError

__all__ = [
    "window_starts",
    "fine_factor",
    "num_windows",
    "window_grid",
    "sliding_window_features",
    "validate_window_params",
    "window_forward",
    "TEACHER_STRIDE",
    "default_stride",
]


TEACHER_STRIDE = 24  # px: the authors' teacher stride for every backbone (slide_stride_gen in their configs)


def default_stride(crop: int) -> int:
    """The paper's teacher stride: 24 px at every crop (CLIP 224, SigLIP2 512, DINOv3 384); at most the crop."""
    return min(TEACHER_STRIDE, crop) if crop > 0 else TEACHER_STRIDE


def window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window start offsets along one axis: 0, s, 2s, ... up to L-c, plus L-c itself (boundary window).

    An axis no longer than ``crop`` gets a single window at 0 covering it.
    """
    if stride <= 0:
        raise BackboneError(f"stride must be > 0, got {stride}")
    if crop <= 0:
        raise BackboneError(f"crop must be > 0, got {crop}")
    if length <= crop:
        return [0]
    starts = list(range(0, length - crop + 1, stride))
    if starts[-1] != length - crop:
        starts.append(length - crop)
    return starts


def fine_factor(patch: int, stride: int) -> int:
    """Smallest r dividing p (the patch) with ``stride % (p / r) == 0`` (p=16, s=24 -> 2; r = p always is)."""
    return next(r for r in range(1, patch + 1) if patch % r == 0 and stride % (patch // r) == 0)


def validate_window_params(height: int, width: int, patch: int, crop: int, stride: int) -> None:
    """Raise :class:`BackboneError` for parameters the teacher cannot use, naming the problem."""
    if stride <= 0:
        raise BackboneError(f"stride must be > 0, got {stride}")
    if crop <= 0 or crop % patch:
        raise BackboneError(f"crop must be a positive multiple of the patch size {patch}, got {crop}")
    if height % patch or width % patch or height <= 0 or width <= 0:
        raise BackboneError(
            f"image size {height}x{width} is not a positive multiple of the patch size {patch}"
        )
    if stride > crop:
        raise BackboneError(f"stride {stride} is larger than the crop {crop}: windows would leave gaps")
    if crop > height and crop > width:
        raise BackboneError(
            f"crop {crop} is larger than the image {height}x{width} on both axes: use a single pass instead"
        )


def window_grid(height: int, width: int, crop: int, stride: int) -> tuple[list[int], list[int], int, int]:
    """Row starts, column starts and the window size (ch, cw) for an image (each axis clipped to the image)."""
    return (
        window_starts(height, crop, stride),
        window_starts(width, crop, stride),
        min(crop, height),
        min(crop, width),
    )


def num_windows(height: int, width: int, crop: int, stride: int) -> int:
    """Number of teacher windows for one image."""
    ys, xs, _, _ = window_grid(height, width, crop, stride)
    return len(ys) * len(xs)


def _crop_windows(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, ch: int, cw: int) -> torch.Tensor:
    """Gather windows by advanced indexing. x: (3, H, W); oy, ox: (n,) -> (n, 3, ch, cw)."""
    dev = x.device
    rows = oy[:, None, None] + torch.arange(ch, device=dev)[None, :, None]  # (n, ch, 1)
    cols = ox[:, None, None] + torch.arange(cw, device=dev)[None, None, :]  # (n, 1, cw)
    return x[:, rows, cols].permute(1, 0, 2, 3)  # (3, n, ch, cw) -> (n, 3, ch, cw)


def _cell_index(oy: torch.Tensor, ox: torch.Tensor, kh: int, kw: int, canvas_w: int) -> torch.Tensor:
    """Flat canvas indices covered by each window. oy, ox in cells: (n,) -> (n, kh*kw)."""
    dev = oy.device
    iy = oy[:, None, None] + torch.arange(kh, device=dev)[None, :, None]  # (n, kh, 1)
    ix = ox[:, None, None] + torch.arange(kw, device=dev)[None, None, :]  # (n, 1, kw)
    return (iy * canvas_w + ix).reshape(oy.shape[0], kh * kw)


def window_forward(backbone: Backbone, compile: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher's window forward: ``backbone.dense``, or its ``torch.compile`` (inductor) version when
    ``compile`` is True (the pipeline sets it from ``$SPAR_COMPILE``: pipeline.common.precision). The compiled function is built once per
    backbone object and reused; if compilation is unavailable or fails, a warning is given and the eager forward
    is used from then on (the results are the same, only slower)."""
    if not compile:
        return backbone.dense
    state = backbone.__dict__.setdefault("_spar_compiled", {})
    if state.get("failed"):
        return backbone.dense
    if "fn" not in state:
        try:
            state["fn"] = torch.compile(backbone.dense, dynamic=False)
        except Exception as e:  # noqa: BLE001 - no compiler on this platform: stay eager
            warnings.warn(
                f"torch.compile unavailable ({type(e).__name__}: {e}); using the eager teacher", stacklevel=2
            )
            state["failed"] = True
            return backbone.dense
    compiled = state["fn"]

    def run(wins: torch.Tensor) -> torch.Tensor:
        if state.get("failed"):
            return backbone.dense(wins)
        try:
            return compiled(wins)
        except BackboneError:
            raise
        except Exception as e:  # noqa: BLE001 - a compiler/toolchain failure: fall back for good
            warnings.warn(
                f"torch.compile failed ({type(e).__name__}: {e}); using the eager teacher", stacklevel=2
            )
            state["failed"] = True
            return backbone.dense(wins)

    return run


@torch.no_grad()
def sliding_window_features(
    backbone: Backbone,
    x: torch.Tensor,
    crop: int,
    stride: int,
    window_batch: int = 32,
    autocast_dtype: torch.dtype | None = None,
    compile: bool = False,
) -> torch.Tensor:
    """Teacher features: (B, 3, H, W) normalised images -> (B, H/p, W/p, D) float32.

    Args:
        crop, stride: window size and step in pixels (crop a multiple of the patch size).
        window_batch: windows per forward pass.
        autocast_dtype: run the windows under autocast in this dtype (bf16/fp16); ``None`` = backbone dtype.
        compile: run the windows through ``torch.compile`` (see :func:`window_forward`).
    """
    backbone.check_input(x)
    b, _, h, w = x.shape
    p = backbone.patch_size
    validate_window_params(h, w, p, crop, stride)
    if window_batch <= 0:
        raise BackboneError(f"window_batch must be > 0, got {window_batch}")
    r = fine_factor(p, stride)
    cell = p // r
    ys, xs, ch, cw = window_grid(h, w, crop, stride)
    dev = x.device
    oy = torch.tensor(ys, device=dev).repeat_interleave(len(xs))  # (n,) window row offsets, px
    ox = torch.tensor(xs, device=dev).repeat(len(ys))  # (n,)
    n = oy.shape[0]
    kh, kw = ch // cell, cw // cell  # window size in cells
    canvas_h, canvas_w = h // cell, w // cell
    idx = _cell_index(oy // cell, ox // cell, kh, kw, canvas_w)  # (n, kh*kw)

    count = torch.zeros(canvas_h * canvas_w, device=dev)
    count.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=dev))
    if bool((count == 0).any()):
        # cannot happen with boundary windows
        raise AssertionError("sliding window left canvas cells uncovered")

    amp = torch.autocast(dev.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    forward = window_forward(backbone, compile)
    out = []
    for i in range(b):
        canvas = None
        for s in range(0, n, window_batch):
            sl = slice(s, s + window_batch)
            wins = _crop_windows(x[i], oy[sl], ox[sl], ch, cw)  # (nb, 3, ch, cw)
            with amp:
                f = forward(wins)  # (nb, ch/p, cw/p, D)
            f = f.float().permute(0, 3, 1, 2)  # (nb, D, ch/p, cw/p)
            if r > 1:
                f = F.interpolate(f, scale_factor=r, mode="bilinear", align_corners=False)  # (nb, D, kh, kw)
            d = f.shape[1]
            if canvas is None:
                canvas = torch.zeros(canvas_h * canvas_w, d, device=dev)
            src = f.permute(0, 2, 3, 1).reshape(-1, d)  # (nb*kh*kw, D)
            canvas.index_add_(0, idx[sl].reshape(-1), src)
        feats = (canvas / count[:, None]).reshape(canvas_h, canvas_w, -1).permute(2, 0, 1)  # (D, Hc, Wc)
        if r > 1:
            feats = F.interpolate(feats[None], size=(h // p, w // p), mode="bilinear", align_corners=False)[0]
        out.append(feats.permute(1, 2, 0))  # (H/p, W/p, D)
    return torch.stack(out)  # (B, H/p, W/p, D)
