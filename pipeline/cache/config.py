"""The precompute stage's typed config (TOML section ``[precompute]``) and the default cache root. Light on purpose:
``spar precompute --help`` and ``spar cache --help`` build their arguments from here without importing the cache's
storage stack (Zarr, Ray, torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from pipeline.common.config import ConfigError
from pipeline.common.local import EXECUTORS, runs_in_process


def default_cache_root() -> str:
    """``$SPAR_CACHE_ROOT`` or ``./work/cache``."""
    return os.environ.get("SPAR_CACHE_ROOT", os.path.join("work", "cache"))


@dataclass
class PrecomputeConfig:
    """Configuration of ``spar precompute`` (TOML section ``[precompute]``)."""

    images: str = ""  # image-set root (local or s3://)
    teacher: str = "maskclip-vit-b16"  # backbone name (spar_core.backbones registry)
    pretrained: str | None = None  # open_clip tag or weights file; None = random seeded weights
    seed: int = 0  # seed of random weights (only when pretrained is None)
    crop: int = 0  # window size in pixels; 0 = the teacher's native resolution
    stride: int = 24  # window step in pixels
    cache_root: str = ""  # caches live in <cache_root>/<fingerprint>; "" = $SPAR_CACHE_ROOT or work/cache
    dtype: Literal["float16", "float32", "int8"] = "float16"  # stored dtype (int8: per-token absmax scale)
    workers: int = 0  # max tasks in flight; 0 = as many as the cluster schedules
    window_batch: int = 32  # windows per teacher forward
    # teacher forward precision; auto = fastest here (pipeline.common.precision); the resolved one is fingerprinted
    autocast: Literal["auto", "bf16", "fp16", "none"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_task: int = 1  # Ray num_cpus per task = torch threads per task on CPU
    gpus_per_task: float = 1.0  # Ray num_gpus per task when the cluster has GPUs
    max_retries: int = 3  # Ray task retries (worker death and exceptions)
    ray_address: str | None = None  # None = local in-process cluster (or RAY_ADDRESS)
    # where the shards are computed: "ray" = one Ray task per shard; "in-process" = one after another in the
    # command's own process (no Ray at all; the teacher uses cpus_per_task threads); "auto" = in-process for one
    # worker on this machine (workers = 1, no ray_address, no RAY_ADDRESS: not a job on a cluster), else Ray
    runner: Literal["auto", "ray", "in-process"] = "auto"
    progress: bool = True
    # MLflow: a run recording what the cache cost; "" = $SPAR_WORKDIR, else no run (the CLI defaults to ./work)
    workdir: str = ""
    experiment: str = "spar-precompute"

    def __post_init__(self) -> None:
        for name in ("crop", "workers", "max_retries", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"precompute.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("stride", "window_batch", "cpus_per_task"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"precompute.{name} must be > 0, got {getattr(self, name)}")
        if self.gpus_per_task < 0:
            raise ConfigError(f"precompute.gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if self.runner not in EXECUTORS:
            raise ConfigError(f"precompute.runner must be auto, ray or in-process, got {self.runner!r}")


def precomputes_in_process(cfg: PrecomputeConfig) -> bool:
    """Whether the shards are computed in the command's own process (``cfg.runner``, "auto" resolved)."""
    return runs_in_process(cfg.runner, cfg.workers, cfg.ray_address)
