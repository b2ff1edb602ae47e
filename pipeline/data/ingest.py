"""Ingest raw images into frozen, augmented webdataset shards (augmentation: IngestConfig).

The path of one image, file to training sample, and the module doing each step:

1. :mod:`~pipeline.data.sources`: ``SRC`` is listed on the driver (sorted) and every source gets a sanitised
   unique key; the keys are split into shards of ``cfg.shard_size`` up front (shard contents never depend on timing);
2. :mod:`~pipeline.data.augment`: inside the shard's Ray task the bytes are decoded, validated, oriented, converted
   to RGB and augmented with randomness drawn from ``(seed, key)`` only;
3. :mod:`~pipeline.data.png`: the pixels become a deterministic PNG;
4. :mod:`~pipeline.data.shards`: the task writes ``shard-XXXXXX.tar`` and its sidecar ``shard-XXXXXX.json``;
   a re-run skips every shard consistent with the current plan, so an interrupted run completes only what is missing;
5. here: the manifest, ``rejected.parquet`` and, last, ``imageset.json`` (the set is complete only then), read back
   by :mod:`~pipeline.data.imageset`.

Bad inputs are never fatal: they are listed with a reason in ``rejected.parquet`` and counted in the summary.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.common.config import config_from_cli, to_dict
from pipeline.common.storage import is_url, join, write_bytes_atomic
from pipeline.common.tasks import bars_disabled, cluster_cpus, init_ray, run_pool, task_runtime_env
from pipeline.data.archives import MemberLocation, archive_sources, is_archive
from pipeline.data.config import IngestConfig, IngestError
from pipeline.data.imageset import (
    FORMAT_VERSION,
    IMAGES_DIR,
    IMAGESET_NAME,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    REJECTED_NAME,
    REJECTED_SCHEMA,
    ImageRecord,
    manifest_fingerprint,
)
from pipeline.data.shards import ShardProgress, load_complete_shard, plan_digest, remove_stale, write_shard
from pipeline.data.sources import assign_keys, list_sources

__all__ = ["IngestConfig", "IngestError", "IngestSummary", "ingest", "run_cli"]

Shard = list[tuple[str, str]]  # (key, source) of a shard's images, in shard order
Sidecar = dict[str, Any]  # a shard's sidecar (see pipeline.data.shards.write_shard)


@dataclass
class IngestSummary:
    """What an ingest run did."""

    root: str
    images_dir: str
    fingerprint: str
    num_inputs: int
    accepted: int
    rejected: int
    num_shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    rejected_reasons: dict[str, int] = field(default_factory=dict)
    processed: int = 0  # inputs of the shards this run wrote

    @property
    def images_per_s(self) -> float:
        """Inputs per second over the shards this run wrote (Ray start excluded, worker start-up included)."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        """One-line human summary."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_reasons.items()))
        return (
            f"ingest: {self.num_inputs} inputs -> {self.accepted} accepted, {self.rejected} rejected"
            f"{' (' + reasons + ')' if reasons else ''}; {self.num_shards} shards "
            f"({self.shards_written} written, {self.shards_skipped} already complete); "
            f"{self.images_per_s:.1f} images/s; fingerprint {self.fingerprint[:16]}; {self.images_dir}"
        )


def ingest(src: str | Sequence[str], out: str, cfg: IngestConfig | None = None, workers: int | None = None,
           progress: bool = True) -> IngestSummary:  # fmt: skip
    """Ingest images from ``src`` into the image set ``<out>/images`` (see module docstring).

    ``src``: one source or several (folders, list files, globs, images, tar archives such as SA-1B's
    ``sa_000000.tar``; local or URLs). ``workers``: how many shard tasks run at once (default: the Ray cluster's
    CPUs). Returns the summary; raises IngestError for an unusable source or output. Bad images never raise: they go
    to rejected.parquet.
    """
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    srcs = [src] if isinstance(src, str) else list(src)
    shards, locations = _plan_shards(srcs, cfg)
    plans = [plan_digest(cfg, i, sh) for i, sh in enumerate(shards)]
    num_inputs = sum(len(sh) for sh in shards)

    fs, images, images_url = _open_output(out)
    done = {i: sc for i, p in enumerate(plans) if (sc := load_complete_shard(fs, images, i, p, shards[i]))}
    todo = [i for i in range(len(shards)) if i not in done]
    work_s = 0.0
    if todo:
        init_ray(num_cpus=workers)
        t_work = time.perf_counter()  # throughput excludes Ray start-up
        _run_shard_tasks(out, images_url, shards, todo, cfg, plans, done, workers, progress, locations)
        work_s = time.perf_counter() - t_work

    records, rejected = _results(done, len(shards), num_inputs, out)
    remove_stale(fs, images, len(shards))
    fingerprint = manifest_fingerprint(records)
    reasons = Counter(r.split(":", 1)[0] for _, r in rejected)
    _write_tables(fs, images, records, rejected)
    meta = _imageset_meta(
        fingerprint, cfg, " ".join(srcs), num_inputs, len(shards), len(records), len(rejected), reasons
    )
    write_bytes_atomic(join(images_url, IMAGESET_NAME), meta, error=IngestError)  # last: the set is complete
    return IngestSummary(
        root=out,
        images_dir=images_url,
        fingerprint=fingerprint,
        num_inputs=num_inputs,
        accepted=len(records),
        rejected=len(rejected),
        num_shards=len(shards),
        shards_written=len(todo),
        shards_skipped=len(shards) - len(todo),
        seconds=work_s if todo else time.perf_counter() - t0,
        rejected_reasons=dict(reasons),
        processed=sum(len(shards[i]) for i in todo),
    )


def _plan_shards(srcs: list[str], cfg: IngestConfig) -> tuple[list[Shard], dict[str, MemberLocation]]:
    """The inputs of ``srcs`` (each source's sorted, or archive order), keyed, split into shards of
    ``cfg.shard_size``; and where the archive members among them are."""
    if not srcs:
        raise IngestError("no source given")
    archives = [s for s in srcs if is_archive(s)]
    if cfg.select and len(archives) != len(srcs):
        raise IngestError(f"select={cfg.select!r} applies to tar archives only; not archives: "
                          f"{', '.join(s for s in srcs if not is_archive(s))}")  # fmt: skip
    sources: list[tuple[str, str]] = []
    locations: dict[str, MemberLocation] = {}
    if archives:
        sources, locations = archive_sources(archives, cfg.select)
    sources += [x for s in srcs if not is_archive(s) for x in list_sources(s)]
    keys = assign_keys(rel for _, rel in sources)
    items = [(k, s) for k, (s, _) in zip(keys, sources, strict=True)]
    shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    return shards, locations


def _open_output(out: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """(filesystem, images folder inside it, images folder as the user spells it) of ``<out>/images``, created;
    a previous run's ``imageset.json`` is removed, since the set is incomplete until this run finishes."""
    fs, root = fsspec.core.url_to_fs(out)
    images = f"{root.rstrip('/')}/{IMAGES_DIR}"
    images_url = fs.unstrip_protocol(images) if is_url(out) else images
    try:
        fs.makedirs(images, exist_ok=True)
    except OSError as e:
        raise IngestError(f"{out}: cannot create the output folder ({e})") from e
    if fs.exists(f"{images}/{IMAGESET_NAME}"):
        fs.rm(f"{images}/{IMAGESET_NAME}")
    return fs, images, images_url


def _run_shard_tasks(out: str, images_url: str, shards: list[Shard], todo: list[int], cfg: IngestConfig,
                     plans: list[str], done: dict[int, Sidecar], workers: int | None, progress: bool,
                     locations: dict[str, MemberLocation]) -> None:  # fmt: skip
    """Run one Ray task per shard in ``todo``, at most ``workers`` at once; fill ``done`` with their sidecars.

    After a failure no new shard starts, but those in flight finish (and are kept); then an IngestError names the
    failed shards and the first one's cause.
    """
    task = ray.remote(num_cpus=1, max_retries=2, runtime_env=task_runtime_env())(write_shard)
    show = progress and not bars_disabled()  # a per-image feed costs an actor process: only for a bar
    tracker = ray.remote(num_cpus=0)(ShardProgress).remote() if show else None
    try:
        result = run_pool(
            lambda i: task.remote(
                images_url, i, shards[i], cfg, plans[i], tracker, _where(shards[i], locations)
            ),
            todo,
            workers or cluster_cpus(),
            desc="ingest",
            weight=lambda i: len(shards[i]),
            unit="img",
            progress=show,
            stop_on_failure=True,
            partial=(lambda: ray.get(tracker.snapshot.remote())) if tracker is not None else None,
        )
    finally:
        if tracker is not None:
            ray.kill(tracker)
    done.update(result.done)
    if result.failed:
        first = min(result.failed)
        cause = getattr(result.failed[first], "cause", None) or result.failed[first]
        raise IngestError(
            f"ingest into {out}: shard(s) {sorted(result.failed)} failed ({type(cause).__name__}: {cause}); "
            f"{len(done)} of {len(shards)} shards are complete and kept; fix the cause and re-run to resume"
        ) from result.failed[first]


def _where(shard: Shard, locations: dict[str, MemberLocation]) -> dict[str, MemberLocation] | None:
    """The archive locations of a shard's inputs (None when it has none)."""
    return {s: locations[s] for _, s in shard if s in locations} or None


def _results(
    done: dict[int, Sidecar], num_shards: int, num_inputs: int, out: str
) -> tuple[list[ImageRecord], list[tuple[str, ...]]]:
    """The accepted records and the (source, reason) rejections of all shards, in shard order."""
    records = [ImageRecord(**{**r, "augmentation": json.loads(r["augmentation"])})
               for i in range(num_shards) for r in done[i]["records"]]  # fmt: skip
    rejected = [tuple(x) for i in range(num_shards) for x in done[i]["rejected"]]
    if len(records) + len(rejected) != num_inputs:
        raise RuntimeError(
            f"ingest into {out}: {num_inputs} inputs but {len(records)} + {len(rejected)} results"
        )
    return records, rejected


def _write_tables(
    fs: fsspec.AbstractFileSystem, images: str, records: list[ImageRecord], rejected: list[tuple[str, ...]]
) -> None:
    """``rejected.parquet`` (source, reason) and ``manifest.parquet`` (one row per accepted image)."""
    manifest = pa.Table.from_pylist([r.manifest_row() for r in records], schema=MANIFEST_SCHEMA)
    rej = pa.Table.from_pylist([{"source": s, "reason": r} for s, r in rejected], schema=REJECTED_SCHEMA)
    for table, name in ((rej, REJECTED_NAME), (manifest, MANIFEST_NAME)):
        with fs.open(f"{images}/{name}", "wb") as f:
            pq.write_table(table, f)


def _imageset_meta(fingerprint: str, cfg: IngestConfig, src: str, num_inputs: int, num_shards: int,
                   accepted: int, rejected: int, reasons: Counter) -> bytes:  # fmt: skip
    """The bytes of ``imageset.json``: fingerprint, counts, rejection reasons, config and source."""
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "num_shards": num_shards,
        "counts": {"inputs": num_inputs, "accepted": accepted, "rejected": rejected, "shards": num_shards},
        "rejected_reasons": dict(sorted(reasons.items())),
        "config": to_dict(cfg),
        "src": src,
    }
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def run_cli(args: argparse.Namespace) -> int:
    """``spar ingest``: the config from recipe, ``--set`` and flags; prints the one-line summary."""
    cfg = config_from_cli(IngestConfig, args, "ingest")
    summary = ingest(args.src, args.out, cfg, workers=args.workers, progress=not args.quiet)
    print(summary.line())
    return 0
