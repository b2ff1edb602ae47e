"""Fill a teacher cache with Ray tasks: one task per incomplete image shard (DESIGN §1, §4).

``precompute(cfg)`` resolves the cache's identity (image-set fingerprint + the teacher's weights identity + window
parameters), writes ``spec.json`` and runs one Ray task per shard that is not complete yet. Each task builds the
teacher once per worker process, runs the sliding-window teacher on every image of its shard and commits one cache
shard (store, manifest, marker; see :mod:`pipeline.cache.store`). Re-running with the same spec computes nothing; a
partially filled cache computes only the missing shards; two precomputes racing on one cache never corrupt it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from pipeline.cache.store import (
    CacheError,
    CacheSpec,
    ShardEntry,
    ShardWriter,
    cache_path_for,
    default_cache_root,
    invalidate_shards,
    open_cache,
    write_spec,
)
from pipeline.common.config import ConfigError
from pipeline.common.storage import shard_stem, size_on_disk

CRASH_ENV = "SPAR_TEST_PRECOMPUTE_CRASH_ONCE"  # test hook: "<marker file>[:<stage>]", see _crash_hook
FORWARD_ENV_PREFIXES = ("SPAR_", "AWS_", "FSSPEC_")  # driver env forwarded to tasks (S3 endpoint, test hooks)


def _autocast_dtypes() -> dict[str, Any]:
    from pipeline.common.precision import autocast_dtype

    return {m: autocast_dtype(m) for m in ("bf16", "fp16", "none")}  # the cache spec's names


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
    autocast: Literal["auto", "bf16", "fp16", "none"] = (
        "auto"  # teacher forward precision; auto = fastest here (pipeline.common.precision); resolved one fingerprinted
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cpus_per_task: int = 1  # Ray num_cpus per task = torch threads per task on CPU
    gpus_per_task: float = 1.0  # Ray num_gpus per task when the cluster has GPUs
    max_retries: int = 3  # Ray task retries (worker death and exceptions)
    ray_address: str | None = None  # None = local in-process cluster (or RAY_ADDRESS)
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


# ----------------------------------------------------------------------------------------------- driver


def resolve_spec(cfg: PrecomputeConfig, ims: Any) -> tuple[CacheSpec, dict[str, Any]]:
    """The cache spec and layout for ``cfg`` over image set ``ims`` (builds the teacher once, on CPU)."""
    import torch

    from spar_core.backbones import build_backbone
    from spar_core.sliding import validate_window_params

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
    import torch

    from pipeline.common.precision import cache_mode, resolve

    gpu = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return cache_mode(resolve(cfg.autocast, "cuda" if gpu else "cpu"))


def precompute(
    cfg: PrecomputeConfig, only_shards: list[int] | None = None, stats: list[dict[str, Any]] | None = None
) -> str:
    """Fill the cache for ``cfg``; return its path ``<cache_root>/<fingerprint>``.

    Only shards without a valid completion marker are computed (``only_shards`` narrows them further).
    ``stats``: when given, each finished task's statistics are appended to it (shard, status, images, windows,
    seconds, device, worker pid, teacher builds in that worker process).
    Raises :class:`CacheError` naming the shards that failed after their retries; finished shards are kept.
    """
    from pipeline.data.imageset import open_imageset

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
    shard_stats: dict[int, dict[str, Any]] = {}
    with _mlflow_run(cfg, spec, cache, todo) as run:
        t0 = time.time()
        failures = _run_tasks(cfg, cache.path, ims, todo, shard_stats)
        if run is not None:
            _log_cost(run, cache, shard_stats, failures, time.time() - t0)
    if stats is not None:
        stats.extend(shard_stats[i] for i in sorted(shard_stats))
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
    from pipeline.data.imageset import open_imageset

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


@contextlib.contextmanager
def _mlflow_run(cfg: PrecomputeConfig, spec: CacheSpec, cache: Any, todo: list[int]) -> Iterator[Any]:
    """An MLflow run (params = the resolved config, tags = lineage, system metrics) around the computation, when
    a workdir or ``$SPAR_WORKDIR`` names a store; else nothing (yields None)."""
    workdir = cfg.workdir or os.environ.get("SPAR_WORKDIR", "")
    if not workdir:
        yield None
        return
    import mlflow

    from pipeline.common.tracking import (
        git_commit,
        log_params_flat,
        setup_experiment,
        system_metrics,
        tracking_uri,
    )

    exp_id = setup_experiment(cfg.experiment, workdir)
    tags = {
        "spar.stage": "precompute",
        "cache_fingerprint": cache.fingerprint,
        "imageset_fingerprint": spec.imageset_fingerprint,
        "weights_id": spec.weights_id,
        "backbone": spec.backbone,
        "git_commit": git_commit(),
    }
    name = f"precompute-{cache.fingerprint[:8]}"
    with mlflow.start_run(experiment_id=exp_id, run_name=name, tags=tags) as run:
        resolved = {**asdict(cfg), "crop": spec.crop, "images": _abs(cfg.images), "cache_path": cache.path}
        resolved["pretrained"] = cfg.pretrained or "none"
        log_params_flat({k: v for k, v in resolved.items() if k not in ("progress", "workdir", "experiment")})
        mlflow.log_params({"shards_todo": len(todo), "shards_total": cache.num_shards})
        with system_metrics(run.info.run_id, tracking_uri(workdir)):
            yield run


def _log_cost(
    run: Any, cache: Any, stats: dict[int, dict[str, Any]], failures: dict[int, str], wall: float
) -> None:
    """What the cache cost: images, windows, seconds per shard, bytes written, wall time."""
    import mlflow

    store = lambda i: f"{cache.path.rstrip('/')}/shards/{shard_stem(i)}.zarr"  # noqa: E731
    written = {i: size_on_disk(store(i)) for i in stats}
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


def _say(cfg: PrecomputeConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV_PREFIXES)}


def _task_cpus(cfg: PrecomputeConfig, cluster_cpus: float) -> float:
    """CPUs per task, capped at the cluster's CPUs (a larger request would never be scheduled)."""
    if cfg.cpus_per_task > cluster_cpus:
        _say(
            cfg,
            f"precompute: cpus_per_task={cfg.cpus_per_task} > the cluster's {cluster_cpus:g} CPUs; using {cluster_cpus:g}",
        )
        return max(1.0, cluster_cpus)
    return float(cfg.cpus_per_task)


def _run_tasks(
    cfg: PrecomputeConfig,
    cache_path: str,
    ims: Any,
    todo: list[int],
    stats_out: dict[int, dict[str, Any]] | None = None,
) -> dict[int, str]:
    """Run one Ray task per shard in ``todo`` with at most ``cfg.workers`` in flight; return failures.

    ``stats_out`` receives each finished shard's task statistics (images, windows, seconds)."""
    import ray
    from tqdm import tqdm

    from pipeline.common.tasks import cluster_gpus, init_ray

    init_ray(cfg.ray_address)
    gpus = cluster_gpus()
    cpus = _task_cpus(cfg, float(ray.cluster_resources().get("CPU", 1.0)))
    opts: dict[str, Any] = {
        "num_cpus": cpus,
        "max_retries": cfg.max_retries,
        "retry_exceptions": True,
    }
    if gpus > 0 and cfg.device != "cpu":
        opts["num_gpus"] = cfg.gpus_per_task
        opts["max_calls"] = 0  # keep the worker (and its loaded teacher) across tasks
    task = ray.remote(**opts)(compute_shard)  # max_calls is only accepted here, not in .options()
    # forwarded as an argument, not a task runtime_env: a runtime_env would start a separate worker pool
    task_cfg = {**asdict(cfg), "cpus_per_task": int(cpus), "_env": _forwarded_env()}
    sizes = {i: len(ims.shard_records(i)) for i in todo}
    limit = cfg.workers or len(todo)
    pending = list(todo)
    running: dict[Any, int] = {}
    failures: dict[int, str] = {}
    bar = tqdm(
        total=sum(sizes.values()), unit="img", desc="precompute", disable=not cfg.progress, file=sys.stderr
    )
    done_shards = 0
    t0 = time.time()
    windows = 0
    try:
        while pending or running:
            while pending and len(running) < limit:
                i = pending.pop(0)
                running[task.remote(cache_path, _abs(cfg.images), i, task_cfg)] = i
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                i = running.pop(ref)
                try:
                    stats = ray.get(ref)
                    windows += int(stats.get("windows", 0))
                    if stats_out is not None:
                        stats_out[i] = stats
                except Exception as e:  # noqa: BLE001 - report per shard, keep the others going
                    failures[i] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"
                done_shards += 1
                bar.update(sizes[i])
                dt = max(time.time() - t0, 1e-9)
                bar.set_postfix_str(f"shards {done_shards}/{len(todo)}, {windows / dt:.1f} win/s")
    finally:
        bar.close()
        for ref in running:
            ray.cancel(ref, force=True)
    return failures


# ----------------------------------------------------------------------------------------------- task

_TEACHERS: dict[tuple[Any, ...], Any] = {}  # per worker process: the loaded teacher, reused across tasks
_TEACHER_BUILDS = [0]  # how many times this process built a teacher (reported in the task statistics)


def _teacher(name: str, pretrained: str | None, seed: int, device: str, amp: Any) -> Any:
    key = (name, pretrained, seed, device, amp)
    if key not in _TEACHERS:
        import torch

        from spar_core.backbones import build_backbone

        _TEACHERS.clear()
        _TEACHER_BUILDS[0] += 1
        bb = build_backbone(name, pretrained, device=device, dtype=torch.float32, seed=seed)
        _TEACHERS[key] = precast_for_autocast(bb, amp) if amp is not None else bb
    return _TEACHERS[key]


def precast_for_autocast(model: Any, dtype: Any) -> Any:
    """Cast a frozen teacher's autocast weights once (see ``Backbone.precast_for_autocast``). In place."""
    return model.precast_for_autocast(dtype)


def _crash_hook(stage: str) -> None:
    """Test-only fault injection: with ``SPAR_TEST_PRECOMPUTE_CRASH_ONCE=<marker>[:<stage>]`` set, the first
    task reaching ``stage`` (default "first-image") creates ``<marker>`` and SIGKILLs its own worker process.
    The marker makes it happen once across retries and re-runs."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    marker, _, want = spec.partition(":")
    if (want or "first-image") != stage:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def compute_shard(cache_path: str, images: str, shard: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Ray task body: compute and commit cache shard ``shard``. Returns stats (status, images, windows, seconds)."""
    cfg_dict = dict(cfg_dict)
    with _driver_env(cfg_dict.pop("_env", {})):  # S3 endpoint/credentials and test hooks from the driver
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
    import torch

    from pipeline.common.precision import compile_requested
    from pipeline.data.imageset import open_imageset
    from spar_core.sliding import num_windows, sliding_window_features

    t0 = time.time()
    cache = open_cache(cache_path)
    if cache.shard_complete(shard):
        return {
            "shard": shard,
            "status": "already-complete",
            "images": 0,
            "windows": 0,
            "seconds": 0.0,
            "pid": os.getpid(),
            "teacher_builds": _TEACHER_BUILDS[0],
        }
    s = cache.spec
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(cfg.cpus_per_task)
    amp = _autocast_dtypes()[s.autocast]
    bb = _teacher(s.backbone, cfg.pretrained, cfg.seed, device, amp)
    if bb.weights_id != s.weights_id:
        raise CacheError(
            f"teacher on this worker has weights {bb.weights_id}, the cache expects {s.weights_id}"
        )
    ims = open_imageset(images)
    records = ims.shard_records(shard)
    p = bb.patch_size
    entries = [
        ShardEntry(r.key, 0, r.height // p, r.width // p, r.height, r.width, r.pixel_sha256) for r in records
    ]
    writer = ShardWriter(cache_path, shard, entries, dim=bb.dim, dtype=s.dtype, on_stage=_crash_hook)
    windows = 0
    try:
        for rec, img in ims.iter_shard(shard):  # (H, W, 3) uint8, verified against pixel_sha256
            img = np.require(img, np.uint8, ["C", "W"])  # torch wants a writable array
            x = bb.normalize(torch.from_numpy(img)[None].to(device)).float()  # (1, 3, H, W)
            feats = sliding_window_features(
                bb, x, s.crop, s.stride, cfg.window_batch, autocast_dtype=amp, compile=compile_requested()
            )
            writer.add(rec.key, feats[0].cpu().numpy())  # (H/p, W/p, D)
            windows += num_windows(rec.height, rec.width, s.crop, s.stride)
            _crash_hook("first-image")
        status = writer.commit()
    except BaseException:
        writer.abort()
        raise
    return {
        "shard": shard,
        "status": status,
        "images": len(records),
        "windows": windows,
        "seconds": time.time() - t0,
        "device": str(next(bb.parameters()).device),
        "pid": os.getpid(),
        "teacher_builds": _TEACHER_BUILDS[0],
    }


# ----------------------------------------------------------------------------------------------- CLI


def _cmd_precompute(args: argparse.Namespace) -> int:
    from pipeline.common.config import load_config

    cfg = load_config(PrecomputeConfig, args.config, overrides=args.set or [], section="precompute")
    flags = {
        "images": args.images,
        "teacher": args.teacher,
        "pretrained": args.pretrained,
        "crop": args.crop,
        "stride": args.stride,
        "cache_root": args.cache_root,
        "dtype": args.dtype,
        "workers": args.workers,
        "window_batch": args.window_batch,
        "workdir": args.workdir,
    }
    cfg = dataclasses.replace(cfg, **{k: v for k, v in flags.items() if v is not None})
    path = precompute(cfg)
    print(path)
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``spar precompute``."""
    p = subparsers.add_parser("precompute", help="compute the sliding-window teacher's features into a cache")
    p.add_argument("--images", help="image-set root (local or s3://)")
    p.add_argument("--teacher", help="backbone name, e.g. maskclip-vit-b16, tiny-clip-64")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local weights file")
    p.add_argument("--crop", type=int, help="window size in pixels (default: the teacher's native size)")
    p.add_argument("--stride", type=int, help="window stride in pixels")
    p.add_argument("--cache-root", help="directory or s3:// prefix holding caches")
    p.add_argument("--dtype", choices=["float16", "float32", "int8"])
    p.add_argument("--workers", type=int, help="max shards computed at once")
    p.add_argument("--window-batch", type=int, help="windows per teacher forward")
    p.add_argument(
        "--workdir", help="record the run (cost of the cache) in this MLflow store (default $SPAR_WORKDIR)"
    )
    p.add_argument("--config", help="TOML recipe ([precompute] section)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.set_defaults(func=_cmd_precompute)
