"""The vectorised teacher against a deliberately naive reference written here (one window, one cell at a time)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spar_core import build_backbone, fine_factor, sliding_window_features, window_starts
from spar_core.backbones import BackboneError


def naive_starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    out, v = [], 0
    while v + crop <= length:
        out.append(v)
        v += stride
    if out[-1] + crop != length:
        out.append(length - crop)
    return out


def naive_teacher(bb, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """The sliding-window recipe step by step: every window alone, every cell added by hand."""
    b, _, h, w = x.shape
    p = bb.patch_size
    r = 1
    while not (p % r == 0 and stride % (p // r) == 0):
        r += 1
    cell = p // r
    canvas, count = None, torch.zeros(h // cell, w // cell)
    ch, cw = min(crop, h), min(crop, w)
    for y0 in naive_starts(h, crop, stride):
        for x0 in naive_starts(w, crop, stride):
            with torch.no_grad():
                f = bb.dense(x[:, :, y0 : y0 + ch, x0 : x0 + cw]).permute(0, 3, 1, 2)  # (B, D, ch/p, cw/p)
            if r > 1:
                f = F.interpolate(f, scale_factor=r, mode="bilinear", align_corners=False)
            if canvas is None:
                canvas = torch.zeros(b, f.shape[1], h // cell, w // cell)
            for i in range(f.shape[2]):
                for j in range(f.shape[3]):
                    canvas[:, :, y0 // cell + i, x0 // cell + j] += f[:, :, i, j]
                    count[y0 // cell + i, x0 // cell + j] += 1
    assert (count > 0).all()
    avg = canvas / count
    out = F.interpolate(avg, size=(h // p, w // p), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny():
    return build_backbone("tiny-clip-64", seed=3)


@pytest.mark.parametrize(
    "size",
    [(128, 128), (96, 224), (208, 112), (144, 176)],  # square, wide, tall, not a multiple of the stride
)
@pytest.mark.parametrize("stride", [16, 24, 40, 112])
def test_teacher_matches_naive_reference(tiny, size, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    crop = max(64, stride)
    fast = sliding_window_features(tiny, x, crop=crop, stride=stride, window_batch=5)
    ref = naive_teacher(tiny, x, crop=crop, stride=stride)
    assert fast.shape == (2, size[0] // 16, size[1] // 16, tiny.dim)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_teacher_handles_axis_shorter_than_crop(tiny):
    x = torch.randn(1, 3, 48, 160)  # height below the crop: one window row of height 48
    fast = sliding_window_features(tiny, x, crop=64, stride=24)
    torch.testing.assert_close(fast, naive_teacher(tiny, x, 64, 24), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stride", [16, 32, 64])
def test_image_equal_to_crop_is_single_pass(tiny, stride):
    # With r = 1 (stride a multiple of the patch) one window is folded and resized unchanged. (With r > 1 the
    # bilinear up-by-r then down-to-patch-grid smooths even a single window.)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        single = tiny.dense(x)
    torch.testing.assert_close(sliding_window_features(tiny, x, 64, stride), single, atol=1e-6, rtol=1e-6)


def test_window_starts_hand_computed():
    assert window_starts(224, 224, 24) == [0]
    assert window_starts(100, 224, 24) == [0]
    assert window_starts(448, 224, 24) == [0, 24, 48, 72, 96, 120, 144, 168, 192, 216, 224]  # boundary window
    assert window_starts(448, 224, 112) == [0, 112, 224]  # already flush: no extra window
    assert window_starts(160, 64, 40) == [0, 40, 80, 96]


def test_fine_factor_hand_computed():
    assert fine_factor(16, 24) == 2  # cells of 8 px
    assert fine_factor(16, 16) == 1
    assert fine_factor(16, 112) == 1
    assert fine_factor(16, 40) == 2
    assert fine_factor(16, 20) == 4
    assert fine_factor(16, 17) == 16


def test_every_cell_covered_and_boundary_present(tiny):
    # A constant-feature check: if a cell were missed, its average would be 0/0 (NaN) or the fold would raise.
    x = torch.randn(1, 3, 176, 208)
    out = sliding_window_features(tiny, x, 64, 40)
    assert torch.isfinite(out).all()
    starts = window_starts(208, 64, 40)
    assert starts[-1] == 208 - 64 and (208 - 64) % 40 != 0  # the boundary window is there


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"crop": 64, "stride": 0}, "stride must be > 0"),
        ({"crop": 64, "stride": -8}, "stride must be > 0"),
        ({"crop": 60, "stride": 24}, "multiple of the patch size"),
        ({"crop": 256, "stride": 24}, "larger than the image"),
        ({"crop": 64, "stride": 80}, "windows would leave gaps"),
    ],
)
def test_bad_window_parameters(tiny, kwargs, match):
    with pytest.raises(BackboneError, match=match):
        sliding_window_features(tiny, torch.randn(1, 3, 128, 128), **kwargs)


def test_bad_images(tiny):
    with pytest.raises(BackboneError, match="3 colour channels"):
        sliding_window_features(tiny, torch.randn(1, 4, 128, 128), 64, 24)
    with pytest.raises(BackboneError, match="multiple of the patch size"):
        sliding_window_features(tiny, torch.randn(1, 3, 130, 128), 64, 24)


def test_bf16_autocast_close_to_fp32(tiny):
    x = torch.randn(1, 3, 128, 160)
    ref = sliding_window_features(tiny, x, 64, 24)
    amp = sliding_window_features(tiny, x, 64, 24, autocast_dtype=torch.bfloat16)
    rel = (amp - ref).norm() / ref.norm()
    assert rel < 0.05
