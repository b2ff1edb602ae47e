"""``spar bench core``: the teacher's fast path against a naive fp32 reference, and single pass vs teacher.

Measured side by side in one run on one image: the naive reference (one window per forward, fp32, fold one window
at a time), the batched teacher in fp32, the batched teacher at its default precision (bf16 autocast on CPU,
bf16/fp16 on GPU, as the paper's AMP), and the single pass. Prints times, speed ratios and the default-precision
teacher's relative error against fp32.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from spar_core import build_backbone, fine_factor, sliding_window_features
from spar_core.sliding import window_grid


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="maskclip-vit-b16")
    p.add_argument("--size", default="448x896", help="HxW")
    p.add_argument("--crop", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--stride", type=int, default=24)
    p.add_argument("--window-batch", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; the fastest time of each counts"
    )


def naive_teacher_fp32(bb, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
    """The reference: each window alone in fp32, its features folded into the canvas one window at a time."""
    _, _, h, w = x.shape
    p = bb.patch_size
    r = fine_factor(p, stride)
    cell = p // r
    ys, xs, ch, cw = window_grid(h, w, crop, stride)
    canvas = count = None
    for y0 in ys:
        for x0 in xs:
            with torch.no_grad():
                f = bb.dense(x[:, :, y0 : y0 + ch, x0 : x0 + cw]).permute(0, 3, 1, 2).float()
            if r > 1:
                f = F.interpolate(f, scale_factor=r, mode="bilinear", align_corners=False)
            if canvas is None:
                canvas = torch.zeros(1, f.shape[1], h // cell, w // cell, device=x.device)
                count = torch.zeros(1, 1, h // cell, w // cell, device=x.device)
            sy, sx = y0 // cell, x0 // cell
            canvas[:, :, sy : sy + f.shape[2], sx : sx + f.shape[3]] += f
            count[:, :, sy : sy + f.shape[2], sx : sx + f.shape[3]] += 1
    out = F.interpolate(canvas / count, size=(h // p, w // p), mode="bilinear", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _amp(dev: torch.device, dtype: torch.dtype, fn):
    with torch.autocast(dev.type, dtype=dtype):
        return fn()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    dev = torch.device(args.device)
    bb = build_backbone(args.backbone, device=dev)
    crop = args.crop or bb.native_size
    amp_dtype = torch.bfloat16 if dev.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    from skimage import data
    from skimage.transform import resize

    img = resize(data.astronaut(), (h, w), anti_aliasing=True, preserve_range=True).astype("uint8")
    x = bb.normalize(torch.from_numpy(img)[None].to(dev))
    ys, xs, _, _ = window_grid(h, w, crop, args.stride)
    n_win = len(ys) * len(xs)
    print(
        f"spar bench core: {args.backbone} (random weights), {h}x{w}, crop {crop}, stride {args.stride}, "
        f"{n_win} windows, device {dev}, {torch.get_num_threads()} threads, best of {args.rounds} round(s)"
    )
    bb16 = build_backbone(args.backbone, device=dev).precast_for_autocast(amp_dtype)  # as precompute does
    runs = {
        "naive": lambda: naive_teacher_fp32(bb, x, crop, args.stride),
        "fp32": lambda: sliding_window_features(bb, x, crop, args.stride, args.window_batch),
        "amp": lambda: sliding_window_features(
            bb16, x, crop, args.stride, args.window_batch, autocast_dtype=amp_dtype
        ),
        "single": lambda: bb.dense(x),
        "single_amp": lambda: _amp(dev, amp_dtype, lambda: bb16.dense(x)),
    }
    best: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        bb.dense(x[:, :, :crop, :crop])  # warm-up
        _amp(dev, amp_dtype, lambda: bb16.dense(x[:, :, :crop, :crop]))
        for _ in range(max(1, args.rounds)):  # interleaved, so a change in machine load hits every method
            for name, fn in runs.items():
                outs[name], t = _timed(fn)
                best[name] = min(best.get(name, float("inf")), t)
    ref, fp32, amp, single = outs["naive"], outs["fp32"], outs["amp"], outs["single"]
    t_naive, t_fp32, t_amp, t_single, t_single_amp = (
        best[k] for k in ("naive", "fp32", "amp", "single", "single_amp")
    )
    cos = float(F.cosine_similarity(amp.flatten(0, 2), ref.flatten(0, 2), dim=-1).mean())
    rows = [
        ("naive reference (1 window/pass, fp32)", t_naive),
        (f"teacher batched fp32 (batch {args.window_batch})", t_fp32),
        (f"teacher default precision ({str(amp_dtype).removeprefix('torch.')} autocast, pre-cast)", t_amp),
        ("single pass fp32", t_single),
        (f"single pass {str(amp_dtype).removeprefix('torch.')} autocast", t_single_amp),
    ]
    for name, t in rows:
        print(f"  {name:<48} {t:8.2f} s")
    print(f"  speed-up teacher default vs naive fp32:   {t_naive / t_amp:6.2f}x  (target >= 2x)")
    print(f"  speed-up batching alone (fp32):           {t_naive / t_fp32:6.2f}x")
    print(f"  teacher / single pass (same precision):   {t_amp / t_single_amp:6.1f}x")
    print(f"  teacher batched fp32 vs naive: rel. error {_rel_err(fp32, ref):.2e}")
    print(
        f"  teacher default precision vs fp32 naive: rel. error {_rel_err(amp, ref):.2e}, mean cosine {cos:.5f}"
    )
    print(
        f"  windows/s default precision: {n_win / t_amp:.1f}; single pass vs teacher rel. diff "
        f"{_rel_err(single, ref):.3f}"
    )
    return 0
