"""``spar bench core``: the teacher's fast path against the authors' loop and a naive fp32 reference.

Measured side by side in one run on one image (interleaved rounds, the fastest of each counts):

* the **authors' loop**, re-implemented here from the reference code's description (SPAR ``segmentor_vit.py``
  ``forward_slide``): every window cropped in a Python loop and concatenated, batches of 10 windows, each batch's
  features upsampled and folded into the canvas one window at a time in Python, weights not pre-cast; run in fp32
  and in bf16 autocast, and the faster of the two is the reference;
* the naive reference (one window per forward, fp32, fold one window at a time);
* the project's teacher in fp32 and at its default precision (``auto``: :mod:`pipeline.common.precision`; weights
  pre-cast as precompute does), and the single pass.

Prints times, "project vs authors' loop", the rate of each teacher as a fraction of this machine's measured matmul
rate in its dtype, and each fast path's relative error against the naive fp32 reference.
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from skimage.transform import resize

from pipeline.bench.measure import matmul_gflops, timed, vit_window_flops
from pipeline.common.photos import sample_photo_rgb
from pipeline.common.precision import Precision, autocast_dtype, resolve
from pipeline.eval.model import pick_device
from spar_core import build_backbone, fine_factor, sliding_window_features
from spar_core.backbones import Backbone
from spar_core.sliding import num_windows, window_grid

AUTHORS_WINDOW_BATCH = 10  # the reference configs' gen_windowslide_bs


def naive_teacher_fp32(bb: Backbone, x: torch.Tensor, crop: int, stride: int) -> torch.Tensor:
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


def authors_loop(
    bb: Backbone, x: torch.Tensor, crop: int, stride: int, amp: torch.dtype | None
) -> torch.Tensor:
    """The reference code's teacher loop, re-implemented: (1, 3, H, W) -> (1, H/p, W/p, D) float32.

    Windows are cut one by one in Python and concatenated; every batch of 10 runs through the backbone (under
    plain autocast when ``amp``, so frozen weights are re-cast on every call, as in the reference), its features
    are upsampled by the fold factor, and each window is added into the canvas by its own Python statement.
    """
    _, _, h, w = x.shape
    p = bb.patch_size
    r = fine_factor(p, stride)
    cell = p // r
    ys, xs, ch, cw = window_grid(h, w, crop, stride)
    pos = [(y0, x0) for y0 in ys for x0 in xs]
    wins_t = torch.cat([x[:, :, y0 : y0 + ch, x0 : x0 + cw] for y0, x0 in pos], dim=0)  # (n, 3, ch, cw)
    recon = count = None
    for i in range(0, wins_t.shape[0], AUTHORS_WINDOW_BATCH):
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            f = bb.dense(wins_t[i : i + AUTHORS_WINDOW_BATCH])  # (b, ch/p, cw/p, D)
        f = f.permute(0, 3, 1, 2)  # (b, D, ch/p, cw/p)
        f = F.interpolate(f, size=(f.shape[-2] * r, f.shape[-1] * r), mode="bilinear")  # (b, D, kh, kw)
        if recon is None:
            recon = torch.zeros(1, f.shape[1], h // cell, w // cell, device=x.device)
            count = torch.zeros(1, 1, h // cell, w // cell, device=x.device)
        for j in range(f.shape[0]):
            y0, x0 = pos[i + j]
            hs, ws = y0 // cell, x0 // cell
            recon[:, :, hs : hs + f.shape[2], ws : ws + f.shape[3]].add_(f[j : j + 1])
            count[:, :, hs : hs + f.shape[2], ws : ws + f.shape[3]].add_(1)
    recon.div_(count.clamp(min=1))
    out = F.interpolate(recon, size=(h // p, w // p), mode="bilinear")  # (1, D, H/p, W/p)
    return out.permute(0, 2, 3, 1)


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm())


@dataclass
class _Setup:
    """One run's image, models and settings."""

    args: argparse.Namespace
    dev: torch.device
    bb: Backbone  # fp32, as loaded
    bb_proj: Backbone  # the project's teacher: pre-cast for its autocast dtype
    x: torch.Tensor  # (1, 3, H, W) normalised, on the device
    crop: int
    prec: Precision
    amp: torch.dtype | None
    ref_precs: list[Precision]
    n_win: int
    t_compile: float | None = None
    runs: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    """Time every teacher in interleaved rounds and print the comparison."""
    if args.threads:
        torch.set_num_threads(args.threads)
    st = _setup(args)
    print(
        f"spar bench core: {args.backbone} (random weights), {st.x.shape[2]}x{st.x.shape[3]}, crop {st.crop}, "
        f"stride {args.stride}, {st.n_win} windows, device {st.dev}, {torch.get_num_threads()} threads, best of "
        f"{args.rounds} round(s); project precision {args.precision} -> {st.prec}"
    )
    _add_runs(st)
    best, outs, t_warm = _time_rounds(st)
    _print(st, best, outs, t_warm)
    return 0


def _setup(args: argparse.Namespace) -> _Setup:
    h, w = (int(v) for v in args.size.lower().split("x"))
    dev = pick_device(args.device)
    bb = build_backbone(args.backbone, device=dev)
    crop = args.crop or bb.native_size
    prec = resolve(args.precision, dev)
    amp = autocast_dtype(prec)
    img = resize(sample_photo_rgb("astronaut"), (h, w), anti_aliasing=True, preserve_range=True)
    x = bb.normalize(torch.from_numpy(img.astype("uint8"))[None].to(dev))
    bb_proj = build_backbone(args.backbone, device=dev)
    if amp is not None:
        bb_proj.precast_for_autocast(amp)  # as precompute does
    ref_precs = [resolve(q, dev) for q in args.authors_precisions.split(",") if q]
    return _Setup(args, dev, bb, bb_proj, x, crop, prec, amp, ref_precs, num_windows(h, w, crop, args.stride))


def _add_runs(st: _Setup) -> None:
    """The methods to time, by name (the compiled one compiled here, its first call timed apart)."""
    a, bb, x, crop = st.args, st.bb, st.x, st.crop
    st.runs = {f"authors_{q}": functools.partial(authors_loop, bb, x, crop, a.stride, autocast_dtype(q))
               for q in st.ref_precs}  # fmt: skip
    if not a.skip_naive:
        st.runs["naive"] = lambda: naive_teacher_fp32(bb, x, crop, a.stride)
    st.runs["fp32"] = lambda: sliding_window_features(bb, x, crop, a.stride, a.window_batch)
    st.runs["project"] = lambda: sliding_window_features(
        st.bb_proj, x, crop, a.stride, a.window_batch, autocast_dtype=st.amp
    )
    if a.compile:
        bb_comp = copy.deepcopy(st.bb_proj)  # its own module to compile
        comp = lambda: sliding_window_features(  # noqa: E731
            bb_comp, x, crop, a.stride, a.window_batch, autocast_dtype=st.amp, compile=True
        )
        with torch.no_grad():
            t0 = time.perf_counter()
            comp()  # compiles the full and the last (partial) window batch shapes
            st.t_compile = time.perf_counter() - t0
        st.runs["project_compiled"] = comp
    st.runs["single"] = lambda: bb.dense(x)


def _time_rounds(st: _Setup) -> tuple[dict[str, float], dict[str, torch.Tensor], float]:
    """The fastest time and the output of every run, and the project teacher's first call."""
    a = st.args
    best: dict[str, float] = {}
    outs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        t_warm = time.perf_counter()
        sliding_window_features(st.bb_proj, st.x, st.crop, a.stride, a.window_batch, autocast_dtype=st.amp)
        t_warm = time.perf_counter() - t_warm  # first call: includes compilation where it is on
        st.bb.dense(st.x[:, :, : st.crop, : st.crop])
        for _ in range(max(1, a.rounds)):  # interleaved, so a change in machine load hits every method
            for name, fn in st.runs.items():
                outs[name], t = timed(fn, st.dev.type)
                best[name] = min(best.get(name, float("inf")), t)
    return best, outs, t_warm


def _print(st: _Setup, best: dict[str, float], outs: dict[str, torch.Tensor], t_warm: float) -> None:
    """The times, then each teacher's GFLOP/s as a fraction of the matmul rate in its dtype and its error vs the
    naive one; the authors' loop reference is the faster of its runs."""
    a, prec, bb = st.args, st.prec, st.bb
    ref_name = min((k for k in best if k.startswith("authors_")), key=best.__getitem__)
    t_ref, t_proj = best[ref_name], best["project"]
    rows = [(f"authors' loop {k.removeprefix('authors_')} (batch {AUTHORS_WINDOW_BATCH}, Python fold)", best[k])
            for k in best if k.startswith("authors_")]  # fmt: skip
    if "naive" in best:
        rows.append(("naive reference (1 window/pass, fp32)", best["naive"]))
    rows += [
        (f"project teacher fp32 (batch {a.window_batch})", best["fp32"]),
        (
            f"project teacher default ({prec}{', pre-cast' if st.amp else ''}, batch {a.window_batch})",
            t_proj,
        ),
        ("single pass fp32", best["single"]),
    ]
    for name, t in rows:
        print(f"  {name:<58} {t:8.2f} s")
    print(f"  project vs authors' loop: {t_ref / t_proj:6.2f}x  (reference: {ref_name.removeprefix('authors_')}, "
          "the faster of its runs; target >= 2x)")  # fmt: skip
    print(f"  project first call (incl. any compilation): {t_warm:.2f} s vs steady {t_proj:.2f} s")
    if st.t_compile is not None:
        t_c = best["project_compiled"]
        print(f"  torch.compile: first call {st.t_compile:.1f} s (compile time, once per worker process; "
              f"{st.t_compile - t_c:.1f} s over a steady run), steady {t_c:.2f} s = {t_proj / t_c:.2f}x eager; "
              f"compiled vs authors' loop {t_ref / t_c:.2f}x")  # fmt: skip
    ours = [
        ("fp32", "fp32"),
        ("project", prec),
        *([("project_compiled", prec)] if st.t_compile is not None else []),
    ]
    flops = st.n_win * vit_window_flops(bb, st.crop)["flops"] if bb.readout == "maskclip" else float("nan")
    rates = {q: matmul_gflops(autocast_dtype(q) or torch.float32, seconds=1.0, device=st.dev.type)
             for q in {prec, "fp32", *st.ref_precs}}  # fmt: skip
    exact = outs["naive"] if "naive" in outs else outs["fp32"]
    print("  matmul: " + ", ".join(f"{q} {r:.0f} GFLOP/s" for q, r in sorted(rates.items())))
    for k, q in [(ref_name, ref_name.removeprefix("authors_")), *ours]:
        print(
            f"  {k:<14} {flops / best[k] / 1e9:7.1f} GFLOP/s = {flops / best[k] / 1e9 / rates[q]:.2f} of {q} matmul"
        )
    for k in [*(k for k in outs if k.startswith("authors_")), *(k for k, _ in ours)]:
        print(f"  {k:<14} vs naive fp32: rel. error {_rel_err(outs[k], exact):.2e}")
    print(f"  teacher / single pass: {best['project'] / best['single']:6.1f}x; single pass vs teacher rel. diff "
          f"{_rel_err(outs['single'], exact):.3f}")  # fmt: skip
