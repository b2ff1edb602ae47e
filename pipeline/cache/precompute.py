"""Fill a teacher cache with Ray tasks: one task per incomplete image shard.

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
import posixpath
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import ray
import torch
from ray.remote_function import RemoteFunction
from tqdm import tqdm

from pipeline.cache.config import PrecomputeConfig, default_cache_root, precomputes_in_process
from pipeline.cache.maintenance import invalidate_shards
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.shard_task import compute_shard
from pipeline.cache.spec import CacheError, CacheSpec, cache_path_for
from pipeline.cache.writer import write_spec
from pipeline.common import precision, tracking
from pipeline.common.config import ConfigError
from pipeline.common.local import machine_resources
from pipeline.common.storage import absolute, shard_stem, size_on_disk
from pipeline.common.tasks import (
    PoolResult,
    bars_disabled,
    cluster_cpus,
    cluster_gpus,
    init_ray,
    run_pool,
    task_runtime_env,
)
from pipeline.common.trace import mark
from pipeline.data.imageset import ImageSet, open_imageset
from spar_core.backbones import build_backbone
from spar_core.sliding import validate_window_params

if TYPE_CHECKING:  # an annotation only: mlflow is imported when a run is recorded
    from mlflow import ActiveRun

__all__ = ["PrecomputeConfig", "precompute", "repair_cache", "resolve_spec"]


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
    seconds, compute_s/decode_wait_s/write_wait_s, device, worker pid, teacher builds in that worker process).
    Raises :class:`CacheError` naming the shards that failed after their retries; finished shards are kept.
    """
    if not cfg.images:
        raise ConfigError("precompute.images is required (the image-set root)")
    ims = open_imageset(cfg.images)
    spec, layout = resolve_spec(cfg, ims)
    path = cache_path_for(cfg.cache_root or default_cache_root(), spec.fingerprint())
    hints = {"images": absolute(cfg.images), "pretrained": cfg.pretrained, "seed": cfg.seed}
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
        # in this process, or one Ray task per shard (cfg.runner); each shard's stats or failure
        compute = _compute_here if precomputes_in_process(cfg) else _run_shard_tasks
        result = compute(cfg, cache.path, ims, todo)
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
        cache_root=posixpath.dirname(cache.path),  # a local path or a URL (no trailing '/': open_cache)
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


def _one_line(e: BaseException) -> str:
    """A task's failure as one line: its type and the last line of its message (Ray wraps the traceback)."""
    return f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}"


def _say(cfg: PrecomputeConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _mlflow_run(
    cfg: PrecomputeConfig, spec: CacheSpec, cache: TeacherCache, todo: list[int]
) -> Iterator[ActiveRun | None]:
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
        resolved = {**asdict(cfg), "crop": spec.crop, "images": absolute(cfg.images)}
        resolved.update(cache_path=cache.path, pretrained=cfg.pretrained or "none")
        tracking.log_params_flat(
            {k: v for k, v in resolved.items() if k not in ("progress", "workdir", "experiment")}
        )
        mlflow.log_params({"shards_todo": len(todo), "shards_total": cache.num_shards})
        with tracking.system_metrics(run.info.run_id, tracking.tracking_uri(workdir)):
            yield run


SHARD_TIMES = ("compute_s", "decode_wait_s", "write_wait_s")  # a computed shard's timings (see compute_shard)


def _log_cost(
    cache: TeacherCache, stats: dict[int, dict[str, Any]], failures: dict[int, str], wall: float
) -> None:
    """What the cache cost (into the active MLflow run): images, windows, bytes, wall time, and per shard (step =
    shard index) the task's seconds, its teacher seconds and its waits for decoded images and for the writer."""
    import mlflow

    written = {i: size_on_disk(f"{cache.path.rstrip('/')}/shards/{shard_stem(i)}.zarr") for i in stats}
    for i, st in sorted(stats.items()):
        per_shard = {"shard_seconds": float(st.get("seconds", 0.0)), "shard_bytes": float(written[i])}
        per_shard.update({f"shard_{k}": float(st[k]) for k in SHARD_TIMES if k in st})
        mlflow.log_metrics(per_shard, step=i)
    mlflow.log_metrics(
        {
            "images": sum(int(st.get("images", 0)) for st in stats.values()),
            "windows": sum(int(st.get("windows", 0)) for st in stats.values()),
            "shards_computed": len(stats),
            "shards_failed": len(failures),
            "compute_seconds": sum(float(st.get("seconds", 0.0)) for st in stats.values()),
            "teacher_seconds": sum(float(st.get("compute_s", 0.0)) for st in stats.values()),
            "wall_seconds": wall,
            "bytes_written": sum(written.values()),
        }
    )


def _shard_task(cfg: PrecomputeConfig) -> tuple[RemoteFunction, float]:
    """The Ray remote of :func:`compute_shard` with this run's resources, and the CPUs each task gets."""
    cpus, have = float(cfg.cpus_per_task), float(cluster_cpus())
    if cpus > have:  # capped: a larger request would never be scheduled
        _say(
            cfg,
            f"precompute: cpus_per_task={cfg.cpus_per_task} > the cluster's {have:g} CPUs; using {have:g}",
        )
        cpus = max(1.0, have)
    opts: dict[str, Any] = {"num_cpus": cpus, "max_retries": cfg.max_retries, "retry_exceptions": True,
                            "runtime_env": task_runtime_env()}  # fmt: skip
    if cluster_gpus() > 0 and cfg.device != "cpu":
        opts["num_gpus"] = cfg.gpus_per_task
        opts["max_calls"] = 0  # keep the worker (and its loaded teacher) across tasks
    return ray.remote(**opts)(compute_shard), cpus  # max_calls is only accepted here, not in .options()


def _compute_here(cfg: PrecomputeConfig, cache_path: str, ims: ImageSet, todo: list[int]) -> PoolResult[int]:
    """The shards of ``todo`` one after another in this process: the Ray task's body, with its retries (a shard that
    raises is computed again from the start, up to ``max_retries`` times), a shard that still fails recorded and the
    others computed. The teacher is built once for them all and uses ``cpus_per_task`` threads (at most the CPUs
    this process may use) on a CPU."""
    cpus = min(cfg.cpus_per_task, machine_resources()[0])
    task_cfg = {**asdict(cfg), "cpus_per_task": cpus}
    images = absolute(cfg.images)
    sizes = {i: len(ims.shard_records(i)) for i in todo}
    result: PoolResult[int] = PoolResult()
    threads = torch.get_num_threads()
    show = cfg.progress and not bars_disabled()
    bar = tqdm(total=sum(sizes.values()), unit="img", desc="precompute", disable=not show, file=sys.stderr)
    mark("pool_start")
    try:
        for i in todo:
            for attempt in range(cfg.max_retries + 1):
                try:
                    result.done[i] = compute_shard(cache_path, images, i, task_cfg)
                    break
                except Exception as e:  # noqa: BLE001 - retried as Ray retries a task, then recorded
                    if attempt == cfg.max_retries:
                        result.failed[i] = e
                    else:
                        _say(cfg, f"precompute: {shard_stem(i)} failed ({_one_line(e)}); computing it again "
                                  f"({attempt + 1} of {cfg.max_retries} retries)")  # fmt: skip
            bar.update(sizes[i])
    finally:
        mark("pool_done")
        bar.close()
        torch.set_num_threads(threads)  # the task set its own; the command (or a test process) goes on
    return result


def _run_shard_tasks(
    cfg: PrecomputeConfig, cache_path: str, ims: ImageSet, todo: list[int]
) -> PoolResult[int]:
    """One Ray task per shard in ``todo``, at most ``cfg.workers`` in flight; each shard's stats or failure.

    A failed shard is reported and the others keep going; on exit the tasks still in flight are force-cancelled.
    """
    init_ray(cfg.ray_address)
    task, cpus = _shard_task(cfg)
    task_cfg = {**asdict(cfg), "cpus_per_task": int(cpus)}
    images = absolute(cfg.images)
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
