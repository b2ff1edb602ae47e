"""The precompute Ray task: compute one cache shard in a worker process (DESIGN §1, §4).

:func:`compute_shard` runs the sliding-window teacher over every image of one image shard and commits the cache
shard with a :class:`~pipeline.cache.writer.ShardWriter`. The teacher is built once per worker process and reused
by the tasks that process runs. The driver (:mod:`.precompute`) submits one such task per incomplete shard.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.cache.config import PrecomputeConfig
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import CacheError, ShardEntry
from pipeline.cache.writer import ShardWriter
from pipeline.common import precision
from pipeline.data.imageset import ImageSet, open_imageset
from spar_core.backbones import Backbone, build_backbone
from spar_core.sliding import num_windows, sliding_window_features

# The driver's variables a task runs with: a task may run in a worker process started before the driver set them
# (e.g. an S3 endpoint and credentials, AWS_*/FSSPEC_*), and SPAR_* settings are read inside the task
# (SPAR_COMPILE). Forwarded as an argument, not a task runtime_env: a runtime_env would start a separate worker pool.
FORWARD_ENV_PREFIXES = ("SPAR_", "AWS_", "FSSPEC_")


def forwarded_env() -> dict[str, str]:
    """The driver's variables to hand to :func:`compute_shard` (``cfg_dict["_env"]``)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


_TEACHERS: dict[tuple[Any, ...], Backbone] = {}  # per worker process: the loaded teacher, reused across tasks
_TEACHER_BUILDS = [0]  # how many times this process built a teacher (reported in the task statistics)


def _teacher(name: str, pretrained: str | None, seed: int, device: str, amp: torch.dtype | None) -> Backbone:
    key = (name, pretrained, seed, device, amp)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHER_BUILDS[0] += 1
        bb = build_backbone(name, pretrained, device=device, dtype=torch.float32, seed=seed)
        _TEACHERS[key] = precast_for_autocast(bb, amp) if amp is not None else bb
    return _TEACHERS[key]


def precast_for_autocast(model: Backbone, dtype: torch.dtype) -> Backbone:
    """Cast a frozen teacher's autocast weights once (see ``Backbone.precast_for_autocast``). In place."""
    return model.precast_for_autocast(dtype)


def compute_shard(cache_path: str, images: str, shard: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Ray task body: compute and commit cache shard ``shard``. Returns stats (status, images, windows, seconds).

    ``cfg_dict`` is the run's :class:`PrecomputeConfig` as a dict, plus ``_env``: the driver's forwarded
    variables (:data:`FORWARD_ENV_PREFIXES`)."""
    cfg_dict = dict(cfg_dict)
    with _driver_env(cfg_dict.pop("_env", {})):
        return _compute_shard(cache_path, images, shard, PrecomputeConfig(**{**cfg_dict, "progress": False}))


@contextlib.contextmanager
def _driver_env(env: dict[str, str]) -> Iterator[None]:
    """Run with the driver's forwarded variables (and without stale ones a previous task left), then restore."""
    saved = dict(os.environ)
    for k in [k for k in os.environ if k.startswith(FORWARD_ENV_PREFIXES) and k not in env]:
        del os.environ[k]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _compute_shard(cache_path: str, images: str, shard: int, cfg: PrecomputeConfig) -> dict[str, Any]:
    t0 = time.time()
    cache = open_cache(cache_path)
    stats: dict[str, Any] = {"shard": shard, "status": "already-complete", "images": 0, "windows": 0}
    if cache.shard_complete(shard):
        return {**stats, "seconds": 0.0, "pid": os.getpid(), "teacher_builds": _TEACHER_BUILDS[0]}
    s = cache.spec
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(cfg.cpus_per_task)
    amp = precision.autocast_dtype(s.autocast)  # the spec's bf16 | fp16 | none
    bb = _teacher(s.backbone, cfg.pretrained, cfg.seed, device, amp)
    if bb.weights_id != s.weights_id:
        raise CacheError(
            f"teacher on this worker has weights {bb.weights_id}, the cache expects {s.weights_id}"
        )
    ims = open_imageset(images)
    status, windows = _write_shard(cache, ims, shard, bb, cfg.window_batch, amp)
    return {
        **stats,
        "status": status,
        "images": len(ims.shard_records(shard)),
        "windows": windows,
        "seconds": time.time() - t0,
        "device": str(next(bb.parameters()).device),
        "pid": os.getpid(),
        "teacher_builds": _TEACHER_BUILDS[0],
    }


def _write_shard(
    cache: TeacherCache, ims: ImageSet, shard: int, bb: Backbone, window_batch: int, amp: torch.dtype | None
) -> tuple[str, int]:
    """Run the sliding-window teacher over image shard ``shard`` into cache shard ``shard``; (commit status,
    windows run). A failure discards the attempt's temporary store."""
    s = cache.spec
    p = bb.patch_size
    entries = [
        ShardEntry(r.key, 0, r.height // p, r.width // p, r.height, r.width, r.pixel_sha256)
        for r in ims.shard_records(shard)
    ]
    device = next(bb.parameters()).device
    writer = ShardWriter(cache.path, shard, entries, dim=bb.dim, dtype=s.dtype)
    windows = 0
    try:
        for rec, img in ims.iter_shard(shard):  # (H, W, 3) uint8, verified against pixel_sha256
            img = np.require(img, np.uint8, ["C", "W"])  # torch wants a writable array
            x = bb.normalize(torch.from_numpy(img)[None].to(device)).float()  # (1, 3, H, W)
            feats = sliding_window_features(
                bb,
                x,
                s.crop,
                s.stride,
                window_batch,
                autocast_dtype=amp,
                compile=precision.compile_requested(),
            )  # (1, H/p, W/p, D)
            writer.add(rec.key, feats[0].cpu().numpy())  # (H/p, W/p, D)
            windows += num_windows(rec.height, rec.width, s.crop, s.stride)
        return writer.commit(), windows
    except BaseException:
        writer.abort()
        raise
