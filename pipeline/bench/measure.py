"""What every benchmark measures with: the machine's matmul rate, a ViT's analytic FLOPs per forward, timing that
waits for the device, the CPU's name, and a scratch folder that goes away after the run.

The benchmarks (:mod:`pipeline.bench.teacher`, ``cache``, ``train``, ``ingest`` and the GPU check in
:mod:`pipeline.bench.gpu`) report rates as a fraction of what this machine's matmuls reach, so the FLOP count of a
teacher window and the matmul rate come from here, one definition each.
"""

from __future__ import annotations

import contextlib
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.flop_counter import FlopCounterMode

from spar_core.backbones import Backbone

T = TypeVar("T")

# ------------------------------------------------------------------------------------------ machine


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def scratch_dir(workdir: str | None, prefix: str) -> Iterator[Path]:
    """``workdir`` when given (kept), else a fresh temporary folder removed when the block ends."""
    if workdir:
        yield Path(workdir)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ timing


def sync(device: str) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def fastest(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Fastest of ``repeats`` synchronised calls after one warm-up call, in seconds."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(
    dtype: torch.dtype, n: int = 2048, seconds: float = 2.0, device: str = "cpu", inner: int = 1
) -> float:
    """Sustained GFLOP/s of an n x n @ n x n matmul in ``dtype`` (best of repeated timings).

    Each timing covers ``inner`` back-to-back matmuls between two synchronisations (on a GPU a single 8192^3
    GEMM takes about a millisecond, so timing several hides the launch and synchronisation cost)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=c)
    sync(device)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=c)
        sync(device)
        best = max(best, inner * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


# ------------------------------------------------------------------------------------------ FLOPs


@dataclass(frozen=True)
class ViTArch:
    """What the FLOP count of a dense forward depends on."""

    depth: int  # transformer blocks
    width: int  # token width d
    mlp: int  # MLP hidden width m
    patch: int  # patch size p
    dim: int  # output feature dim D
    prefix: int  # class/prefix tokens
    readout: str  # "maskclip" or "siglip2-pool-bypass"
    pool_mlp: int = 0  # hidden width of the attention pool's MLP (pool-bypass readout), 0 = none


# open_clip ViT-B-16-SigLIP2-512 (timm vit_base_patch16_siglip_512): checked against the built model in the tests
SIGLIP2_B16_512 = ViTArch(12, 768, 3072, 16, 768, 0, "siglip2-pool-bypass", 3072)


def vit_arch(bb: Backbone) -> ViTArch:
    """The :class:`ViTArch` of a built backbone (open_clip CLIP tower or timm SigLIP tower)."""
    if bb.readout == "maskclip":
        vis = bb.model.visual
        blocks = list(vis.transformer.resblocks)
        return ViTArch(
            depth=len(blocks),
            width=int(vis.conv1.out_channels),
            mlp=int(blocks[0].mlp.c_fc.out_features),
            patch=bb.patch_size,
            dim=bb.dim,
            prefix=1,
            readout="maskclip",
        )
    tr = bb.trunk
    pool = tr.attn_pool
    return ViTArch(
        depth=len(tr.blocks),
        width=int(tr.embed_dim),
        mlp=int(tr.blocks[0].mlp.fc1.out_features),
        patch=bb.patch_size,
        dim=bb.dim,
        prefix=int(tr.num_prefix_tokens),
        readout=bb.readout,
        pool_mlp=int(pool.mlp.fc1.out_features) if pool.mlp is not None else 0,
    )


def vit_dense_flops(arch: ViTArch, height: int, width: int) -> dict[str, float]:
    """Analytic FLOPs (2 per multiply-add) of one dense forward over an ``height x width`` image.

    With N tokens, width d, MLP hidden m, per full block: qkv 3Nd^2 + scores N^2 d + weighted sum N^2 d +
    out-proj Nd^2 + MLP 2Ndm multiply-adds (= 24 N d^2 + 4 N^2 d FLOPs at m = 4d). The MaskCLIP last block keeps
    only the value path (v + out-proj 2Nd^2 + MLP) and projects all N tokens (N d D); the SigLIP pool bypass
    runs every block in full, then the pool's value (N d^2) and output projections (N d D) and its MLP (2 N D m').
    Plus the patch embedding N_p (3 p^2) d. Norms, activations, position-embedding interpolation are not counted
    (they are O(N d), under 1%).
    """
    p, d, m = arch.patch, arch.width, arch.mlp
    n_p = (height // p) * (width // p)
    n = n_p + arch.prefix
    full = 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    macs = n_p * 3 * p * p * d
    if arch.readout == "maskclip":
        macs += (arch.depth - 1) * full + 2 * n * d * d + 2 * n * d * m + n * d * arch.dim
        attn = (arch.depth - 1) * 2 * n * n * d
    else:
        macs += arch.depth * full + n * d * d + n * d * arch.dim + 2 * n * arch.dim * arch.pool_mlp
        attn = arch.depth * 2 * n * n * d
    return {"flops": 2.0 * macs, "attention_flops": 2.0 * attn}


def vit_window_flops(bb: Backbone, crop: int) -> dict[str, float]:
    """Analytic FLOPs of one ``crop x crop`` teacher window (see :func:`vit_dense_flops`)."""
    return vit_dense_flops(vit_arch(bb), crop, crop)


def counted_window_flops(bb: Backbone, crop: int) -> float:
    """FLOPs of one window as counted by torch's FlopCounterMode (cross-check of the analytic count)."""
    x = torch.randn(1, 3, crop, crop)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.dense(x)
    return float(fc.get_total_flops())
