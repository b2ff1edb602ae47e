"""The GPU check's ``environment`` section: library versions, the host and the accelerator, and the measured
matmul rates (bf16, fp16, fp32 and, on CUDA, tf32) that the throughput and projection sections compare against."""

from __future__ import annotations

import math
import os
import platform
from importlib.metadata import version
from typing import Any

import torch

from pipeline.bench.gpu.context import Context, tf32
from pipeline.bench.gpu.report import check, say
from pipeline.bench.gpu.runner import Deadline
from pipeline.bench.measure import cpu_name, matmul_gflops
from pipeline.common.tracking import git_commit

LIBRARIES = ("numpy", "open_clip", "timm", "ray", "mlflow", "zarr", "webdataset", "pyarrow", "fsspec")
MATMUL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}


def section_environment(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """Versions, the accelerator and the measured matmul rates."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions["cuda"] = torch.version.cuda
    versions["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    for mod in LIBRARIES:
        versions[mod] = _version(mod)
    res["versions"] = versions
    res["git_commit"] = git_commit()
    res["host"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    res["device"] = ctx.device
    if ctx.cuda:
        res["gpu"] = _gpu_info()
    ctx.save()
    _matmul_rates(ctx, res, dl)


def _gpu_info() -> dict[str, Any]:
    """The first CUDA device and the attention/TF32 settings in force."""
    props = torch.cuda.get_device_properties(0)
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 2),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "count": torch.cuda.device_count(),
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
        "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "sdpa_cudnn": getattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: None)(),
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def _matmul_rates(ctx: Context, res: dict[str, Any], dl: Deadline) -> None:
    """TFLOP/s of an n^3 matmul per dtype (fp32 and tf32 skipped once the budget is spent)."""
    p = ctx.plan
    rates: dict[str, float] = {}
    res["matmul_tflops"] = rates
    res["matmul_n"] = p.matmul_n
    for name, dt in MATMUL_DTYPES.items():
        if name == "tf32" and not ctx.cuda:
            continue
        if dl.left() < 0 and name in ("fp32", "tf32"):
            res.setdefault("skipped", []).append(f"matmul {name}: out of time")
            continue
        with tf32(name == "tf32"):
            g = matmul_gflops(
                dt, n=p.matmul_n, seconds=p.matmul_seconds, device=ctx.device, inner=p.matmul_inner
            )
        rates[name] = g / 1e3
        say(f"environment: matmul {name} {g / 1e3:.2f} TFLOP/s (n={p.matmul_n})")
        ctx.save()
    ctx.matmul_tflops.update(rates)
    check(
        res, "matmul rates measured", all(v > 0 and math.isfinite(v) for v in rates.values()) and bool(rates)
    )


def _version(mod: str) -> str | None:
    try:
        return version({"open_clip": "open_clip_torch"}.get(mod, mod))
    except Exception:  # noqa: BLE001 - absent or unreadable: reported as such
        return None
