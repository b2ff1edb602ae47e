"""Fill a teacher cache with Ray tasks: one task per incomplete image shard (DESIGN §1, §4).

``precompute(cfg)`` resolves the cache's identity (image-set fingerprint + the teacher's weights identity + window
parameters), writes ``spec.json`` and runs one Ray task per shard that is not complete yet
(:func:`pipeline.common.tasks.run_pool`). Each task (:func:`compute_shard`) builds the teacher once per worker
process, runs the sliding-window teacher on every image of its shard and commits one cache shard
(:class:`~pipeline.cache.writer.ShardWriter`). Re-running with the same spec computes nothing; a partially filled
cache computes only the missing shards; two precomputes racing on one cache never corrupt it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import ray
import torch
from ray.remote_function import RemoteFunction

from pipeline.cache.config import PrecomputeConfig, default_cache_root
from pipeline.cache.maintenance import invalidate_shards
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import CacheError, CacheSpec, ShardEntry, cache_path_for
from pipeline.cache.writer import ShardWriter, write_spec
from pipeline.common import precision, tracking
from pipeline.common.config import ConfigError
from pipeline.common.storage import shard_stem, size_on_disk
from pipeline.common.tasks import PoolResult, cluster_cpus, cluster_gpus, init_ray, run_pool
from pipeline.data.imageset import ImageSet, open_imageset
from spar_core.backbones import Backbone, build_backbone
from spar_core.sliding import num_windows, sliding_window_features, validate_window_params

__all__ = [
    "PrecomputeConfig",
    "precompute",
    "repair_cache",
    "resolve_spec",
    "compute_shard",
    "precast_for_autocast",
]

# The driver's variables a task runs with: a task may run in a worker process started before the driver set them
# (e.g. an S3 endpoint and credentials, AWS_*/FSSPEC_*), and SPAR_* settings are read inside the task
# (SPAR_COMPILE). Forwarded as an argument, not a task runtime_env: a runtime_env would start a separate worker pool.
FORWARD_ENV_PREFIXES = ("SPAR_", "AWS_", "FSSPEC_")

# ----------------------------------------------------------------------------------------------- driver


def resolve_spec(cfg: PrecomputeConfig, ims: ImageSet) -> tuple[CacheSpec, dict[str, Any]]:
    """The cache spec and layout for ``cfg`` over image set ``ims`` (builds the teacher once, on CPU)."""
    bb = build_backbone(cfg.teacher, cfg.pretrained, device="cpu", dtype=torch.float32, seed=cfg.seed)
    crop = cfg.crop or bb.native_size
    for r in ims.records:
        try:
            validate_window_params(r.height, r.width, bb.patch_size, crop, cfg.stride)
        except ValueError as e:
            raise CacheError(f"image {r.key!r} ({r.height}x{r.width}) of {cfg.images}: {e}") from e
    spec = CacheSpec(
        backbone=bb.name,
        pretrained=cfg.pretrained,
        weights_id=bb.weights_id,
        crop=crop,
        stride=cfg.stride,
        readout=bb.readout,
        dtype=cfg.dtype,
        imageset_fingerprint=ims.fingerprint,
        autocast=_resolved_autocast(cfg),
    )
    layout = {
        "num_shards": ims.num_shards,
        "num_images": len(ims.records),
        "dim": bb.dim,
        "patch_size": bb.patch_size,
    }
    return spec, layout


def _resolved_autocast(cfg: PrecomputeConfig) -> str:
    """The cache spec's autocast mode for ``cfg`` (``auto`` resolved for the device the tasks will use)."""
    gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return precision.cache_mode(precision.resolve(cfg.autocast, "cuda" if gpu else "cpu"))


def precompute(
    cfg: PrecomputeConfig, only_shards: list[int] | None = None, stats: list[dict[str, Any]] | None = None
) -> str:
    """Fill the cache for ``cfg``; return its path ``<cache_root>/<fingerprint>``.

    Only shards without a valid completion marker are computed (``only_shards`` narrows them further).
    ``stats``: when given, each finished task's statistics are appended to it (shard, status, images, windows,
    seconds, device, worker pid, teacher builds in that worker process).
    Raises :class:`CacheError` naming the shards that failed after their retries; finished shards are kept.
    """
    if not cfg.images:
        raise ConfigError("precompute.images is required (the image-set root)")
    ims = open_imageset(cfg.images)
    spec, layout = resolve_spec(cfg, ims)
    path = cache_path_for(cfg.cache_root or default_cache_root(), spec.fingerprint())
    hints = {"images": _abs(cfg.images), "pretrained": cfg.pretrained, "seed": cfg.seed}
    write_spec(path, spec, layout, hints)
    cache = open_cache(path)
    todo = cache.incomplete_shards()
    if only_shards is not None:
        todo = [i for i in todo if i in set(only_shards)]
    if not todo:
        _say(cfg, f"cache complete, nothing to compute: {cache.path}")
        return cache.path
    _say(cfg, f"precompute {len(todo)}/{cache.num_shards} shard(s) into {cache.path}")
    with _mlflow_run(cfg, spec, cache, todo) as run:
        t0 = time.time()
        result = _run_shard_tasks(cfg, cache.path, ims, todo)
        failures = {i: _one_line(e) for i, e in result.failed.items()}
        if run is not None:
            _log_cost(cache, result.done, failures, time.time() - t0)
    if stats is not None:
        stats.extend(result.done[i] for i in sorted(result.done))
    left = [i for i in todo if not cache.shard_complete(i)]
    if failures or left:
        detail = "; ".join(f"{shard_stem(i)}: {msg}" for i, msg in sorted(failures.items()))
        raise CacheError(
            f"precompute left {len(left)} shard(s) incomplete in {cache.path} ({detail or 'superseded'}); "
            "completed shards are kept, re-run to finish"
        )
    _say(cfg, f"cache complete: {cache.path}")
    return cache.path


def repair_cache(path: str, shards: list[int], images: str | None = None, workers: int | None = None) -> str:
    """Recompute ``shards`` of the cache at ``path`` (invalidated first) with the spec's teacher and images."""
    cache = open_cache(path)
    images = images or cache.hints.get("images")
    if not images:
        raise CacheError(f"{path}: no image set recorded in spec.json; pass --images")
    s = cache.spec
    cfg = PrecomputeConfig(
        images=images,
        teacher=s.backbone,
        pretrained=cache.hints.get("pretrained", s.pretrained),
        seed=int(cache.hints.get("seed", 0)),
        crop=s.crop,
        stride=s.stride,
        dtype=s.dtype,  # type: ignore[arg-type]
        autocast=s.autocast,  # type: ignore[arg-type]
        cache_root=cache.path.rstrip("/").rsplit("/", 1)[0]
        if "://" in cache.path
        else os.path.dirname(cache.path),
        workers=workers or 0,
    )
    spec, _ = resolve_spec(cfg, open_imageset(images))
    if spec.fingerprint() != cache.fingerprint:
        raise CacheError(
            f"{path}: the recorded teacher/images now give fingerprint {spec.fingerprint()[:16]}… "
            f"(weights {spec.weights_id}), not this cache's; cannot repair"
        )
    invalidate_shards(cache.path, shards)
    return precompute(cfg, only_shards=shards)


def _abs(p: str) -> str:
    return p if "://" in p else os.path.abspath(p)


def _one_line(e: BaseException) -> str:
    """A task's failure as one line: its type and the last line of its message (Ray wraps the traceback)."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


def _say(cfg: PrecomputeConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _mlflow_run(
    cfg: PrecomputeConfig, spec: CacheSpec, cache: TeacherCache, todo: list[int]
) -> Iterator[Any]:
    """An MLflow run (params = the resolved config, tags = lineage, system metrics) around the computation, when
    a workdir or ``$SPAR_WORKDIR`` names a store; else nothing (yields None)."""
    workdir = cfg.workdir or os.environ.get("SPAR_WORKDIR", "")
    if not workdir:
        yield None
        return
    import mlflow  # heavy, and only needed when a run is recorded

    exp_id = tracking.setup_experiment(cfg.experiment, workdir)
    tags = {
        "spar.stage": "precompute",
        "cache_fingerprint": cache.fingerprint,
        "imageset_fingerprint": spec.imageset_fingerprint,
        "weights_id": spec.weights_id,
        "backbone": spec.backbone,
        "git_commit": tracking.git_commit(),
    }
    name = f"precompute-{cache.fingerprint[:8]}"
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
        resolved = {**asdict(cfg), "crop": spec.crop, "images": _abs(cfg.images), "cache_path": cache.path}
        resolved["pretrained"] = cfg.pretrained or "none"
        tracking.log_params_flat(
            {k: v for k, v in resolved.items() if k not in ("progress", "workdir", "experiment")}
        )
        mlflow.log_params({"shards_todo": len(todo), "shards_total": cache.num_shards})
        with tracking.system_metrics(run.info.run_id, tracking.tracking_uri(workdir)):
            yield run


def _log_cost(
    cache: TeacherCache, stats: dict[int, dict[str, Any]], failures: dict[int, str], wall: float
) -> None:
    """What the cache cost (into the active MLflow run): images, windows, seconds per shard, bytes, wall time."""
    import mlflow

    written = {i: size_on_disk(f"{cache.path.rstrip('/')}/shards/{shard_stem(i)}.zarr") for i in stats}
    for i, st in sorted(stats.items()):
        mlflow.log_metrics(
            {"shard_seconds": float(st.get("seconds", 0.0)), "shard_bytes": float(written[i])}, step=i
        )
    mlflow.log_metrics(
        {
            "images": sum(int(st.get("images", 0)) for st in stats.values()),
            "windows": sum(int(st.get("windows", 0)) for st in stats.values()),
            "shards_computed": len(stats),
            "shards_failed": len(failures),
            "compute_seconds": sum(float(st.get("seconds", 0.0)) for st in stats.values()),
            "wall_seconds": wall,
            "bytes_written": sum(written.values()),
        }
    )


def _task_cpus(cfg: PrecomputeConfig, cluster_cpus: float) -> float:
    """CPUs per task, capped at the cluster's CPUs (a larger request would never be scheduled)."""
    if cfg.cpus_per_task > cluster_cpus:
        _say(
            cfg,
            f"precompute: cpus_per_task={cfg.cpus_per_task} > the cluster's {cluster_cpus:g} CPUs; using {cluster_cpus:g}",
        )
        return max(1.0, cluster_cpus)
    return float(cfg.cpus_per_task)


def _shard_task(cfg: PrecomputeConfig) -> tuple[RemoteFunction, float]:
    """The Ray remote of :func:`compute_shard` with this run's resources, and the CPUs each task gets."""
    cpus = _task_cpus(cfg, float(cluster_cpus()))
    opts: dict[str, Any] = {"num_cpus": cpus, "max_retries": cfg.max_retries, "retry_exceptions": True}
    if cluster_gpus() > 0 and cfg.device != "cpu":
        opts["num_gpus"] = cfg.gpus_per_task
        opts["max_calls"] = 0  # keep the worker (and its loaded teacher) across tasks
    return ray.remote(**opts)(compute_shard), cpus  # max_calls is only accepted here, not in .options()


def _run_shard_tasks(
    cfg: PrecomputeConfig, cache_path: str, ims: ImageSet, todo: list[int]
) -> PoolResult[int]:
    """One Ray task per shard in ``todo``, at most ``cfg.workers`` in flight; each shard's stats or failure.

    A failed shard is reported and the others keep going; on exit the tasks still in flight are force-cancelled.
    """
    init_ray(cfg.ray_address)
    task, cpus = _shard_task(cfg)
    task_cfg = {**asdict(cfg), "cpus_per_task": int(cpus), "_env": _forwarded_env()}
    images = _abs(cfg.images)
    sizes = {i: len(ims.shard_records(i)) for i in todo}

    def postfix(result: PoolResult[int], elapsed: float) -> str:
        windows = sum(int(st.get("windows", 0)) for st in result.done.values())
        done = len(result.done) + len(result.failed)
        return f"shards {done}/{len(todo)}, {windows / max(elapsed, 1e-9):.1f} win/s"

    return run_pool(
        lambda i: task.remote(cache_path, images, i, task_cfg),
        todo,
        cfg.workers or len(todo),
        desc="precompute",
        weight=sizes.__getitem__,
        unit="img",
        progress=cfg.progress,
        postfix=postfix,
        force_cancel=True,
    )


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


# ----------------------------------------------------------------------------------------------- task

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
