"""Precision: the one place that names, resolves and applies the teacher's and student's numeric precision.

Every stage accepts the same names (``auto``, ``fp32``, ``bf16``, ``fp16``; ``none``/``float32``/``bfloat16``/
``float16`` are accepted aliases) and calls :func:`resolve` to turn ``auto`` into what is fastest on the device:

* CUDA: ``bf16`` where the GPU supports it, else ``fp16``;
* CPU: ``bf16`` only where it beats fp32. With AMX tiles (Intel Sapphire Rapids and later) bf16 matmuls run on the
  tile unit: ``bf16``. With AVX512-BF16 but no AMX (e.g. AMD Zen 4) it depends on the machine: one 2-core Zen 4 VM
  measured bf16 slower than fp32 (111 vs 178 GFLOP/s), another faster (418 vs 182 GFLOP/s, where the bf16 teacher
  ran 2x the fp32 one), so there a short measured probe decides (:func:`cpu_bf16_speedup`, bf16 when > 1.25x,
  ~0.3 s, once per process). Without either: ``fp32``.

The resolved precision is recorded in the teacher cache's spec and fingerprint; where a probe decides, a run on a
machine under heavy load could record the other precision, which costs a recomputation, never a wrong cache (the
spec says what was used). ``SPAR_CPU_BF16=1``/``0`` forces the CPU rule; ``SPAR_PRECISION_PROBE=1`` uses the probe on
every CPU. A precision given explicitly (config, CLI) is used as is.

The teacher cache keeps its historical vocabulary (``bf16``/``fp16``/``none``; see :func:`cache_mode`) so the
fingerprints of existing caches do not change.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch

from pipeline.common.errors import UserError

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_NAMES = ("auto", "fp32", "bf16", "fp16")
_ALIASES = {n: n for n in PRECISION_NAMES} | dict(
    none="fp32", float32="fp32", bfloat16="bf16", float16="fp16"
)
_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_CACHE_MODES = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
CPU_BF16_ENV = "SPAR_CPU_BF16"
PROBE_ENV = "SPAR_PRECISION_PROBE"


class PrecisionError(UserError, ValueError):
    """An unknown precision name, or one the device cannot run."""


def canonical(name: str) -> str:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` for any accepted spelling; PrecisionError otherwise."""
    key = str(name).strip().lower()
    if key not in _ALIASES:
        raise PrecisionError(
            f"unknown precision {name!r}; use one of {', '.join(PRECISION_NAMES)} (or none = fp32)"
        )
    return _ALIASES[key]


def _cpu_flags() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return []


def cpu_has_avx512_bf16() -> bool:
    """True when the CPU advertises AVX512-BF16 (``/proc/cpuinfo``)."""
    return "avx512_bf16" in _cpu_flags()


def cpu_has_amx_bf16() -> bool:
    """True when the CPU has AMX tiles with bf16 (torch's runtime check, else ``/proc/cpuinfo``'s flags)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if check is not None:
        with contextlib.suppress(RuntimeError, AttributeError):
            return bool(check())
    return "amx_bf16" in _cpu_flags()


PROBE_MIN_SPEEDUP = 1.25  # bf16 must beat fp32 clearly: a probe near 1 under load must not pick bf16


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 512, seconds: float = 0.3) -> float:
    """Measured bf16 / fp32 matmul rate on this CPU (> 1: bf16 faster), interleaved, best of each; cached."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    best = {"fp32": float("inf"), "bf16": float("inf")}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for name, (x, y) in (("fp32", (a, b)), ("bf16", (a16, b16))):
            t = time.perf_counter()
            x @ y
            best[name] = min(best[name], time.perf_counter() - t)
    return best["fp32"] / best["bf16"]


@functools.lru_cache(maxsize=1)
def cpu_prefers_bf16() -> bool:
    """Whether ``auto`` means bf16 on this CPU (see the module docstring for the rule and its overrides)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if os.environ.get(PROBE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return cpu_bf16_speedup() > PROBE_MIN_SPEEDUP
    if cpu_has_amx_bf16():
        return True
    return cpu_has_avx512_bf16() and cpu_bf16_speedup() > PROBE_MIN_SPEEDUP


def resolve(name: str, device: torch.device | str) -> Precision:
    """The concrete precision (``fp32``/``bf16``/``fp16``) for ``name`` on ``device``; ``auto`` picks the fastest."""
    p = canonical(name)
    dev = torch.device(device).type
    if p != "auto":
        return p  # type: ignore[return-value]
    # planned from a driver without CUDA (GPU tasks on a cluster): bf16, as on every current GPU
    if dev == "cuda":
        return "fp16" if torch.cuda.is_available() and not torch.cuda.is_bf16_supported() else "bf16"
    if dev == "cpu":
        return "bf16" if cpu_prefers_bf16() else "fp32"
    return "fp32"


def _concrete(name: str, when: str) -> str:
    p = canonical(name)
    if p == "auto":
        raise PrecisionError(f"precision 'auto' must be resolved {when}")
    return p


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a concrete precision (``None`` for fp32). ``auto`` must be resolved first."""
    return _DTYPES[_concrete(name, "for a device first (pipeline.common.precision.resolve)")]


def cache_mode(name: str) -> str:
    """The teacher cache's spelling of a concrete precision: ``none`` (fp32), ``bf16``, ``fp16``."""
    return _CACHE_MODES[_concrete(name, "before it is recorded in a cache spec")]


@contextlib.contextmanager
def autocast(device: torch.device | str, name: str) -> Iterator[None]:
    """torch.autocast in the precision's dtype on the device; a no-op for fp32 (``auto`` resolved here)."""
    dt = autocast_dtype(resolve(name, device))
    if dt is None:
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=dt):
        yield


COMPILE_ENV = "SPAR_COMPILE"  # "1": compile the teacher's window forward with torch.compile (inductor)


def compile_requested() -> bool:
    """Whether ``$SPAR_COMPILE`` asks for the compiled teacher window forward (spar_core.sliding ``compile``)."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes")
