"""Ray Train run directories: which training checkpoint to resume from.

Ray Train keeps a run's training checkpoints in its run directory (``<storage>/<run name>/checkpoint_step…``) with
its own record of them (``checkpoint_manager_snapshot.json``); :func:`snapshot_missing` tells when that record names
a deleted checkpoint (Ray then refuses the directory); :func:`checkpoints_newest_first` and :func:`newest_good`
find the newest good one left; :func:`restore_latest_good` is what a worker resumes from (corrupt or incomplete
checkpoints are skipped in favour of the previous good one). Ray checkpoints of a URL are read through the
project's filesystem layer (:func:`ray_checkpoint`, :func:`checkpoint_location`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from fsspec.implementations.local import LocalFileSystem

from pipeline.common.storage import (
    StorageError,
    arrow_filesystem,
    exists,
    join,
    listdir,
    read_json,
)
from pipeline.student.format import CheckpointError
from pipeline.train.progress import log
from pipeline.train.state import TrainState, load_training_checkpoint, step_of

if TYPE_CHECKING:
    from ray.train import Checkpoint

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints


def ray_checkpoint(location: str) -> Checkpoint:
    """The Ray Train checkpoint at ``location`` (a local path or URL), read through the project's filesystem layer
    (:func:`pipeline.common.storage.arrow_filesystem`: credentials from the environment, as everywhere else)."""
    from ray.train import Checkpoint

    fs, path = arrow_filesystem(location)
    return Checkpoint(path=path, filesystem=fs)


def checkpoint_location(ckpt: Checkpoint) -> str:
    """Where ``ckpt`` is, as the project names locations: its path when local, else a URL (``s3://…``)."""
    inner = getattr(getattr(ckpt.filesystem, "handler", None), "fs", None)  # an fsspec fs wrapped for pyarrow
    if inner is None or isinstance(inner, LocalFileSystem):
        return ckpt.path
    return inner.unstrip_protocol(ckpt.path)


def _ray_candidates(ckpt: Checkpoint) -> list[Checkpoint]:
    """Ray's latest checkpoint first, then its older siblings in the run directory (newest first)."""
    here = checkpoint_location(ckpt).rstrip("/")  # a path or URL, as the project's storage layer lists it
    found = checkpoints_newest_first([posixpath.dirname(here)])
    latest = step_of(posixpath.basename(here)) if here in found else None
    older = [
        p for p in found if p != here and (latest is None or (step_of(posixpath.basename(p)) or 0) <= latest)
    ]
    return [ckpt] + [ray_checkpoint(p) for p in older]


def restore_latest_good(
    ckpt: Checkpoint | None, log: Callable[[str], None] = log, *, then: Checkpoint | None = None
) -> tuple[TrainState, dict[str, torch.Tensor], str] | None:
    """(state, trainable weights, location) of the newest good checkpoint from Ray's ``ckpt`` back, then from
    ``then`` back (the checkpoint a continued run started from, in its earlier run directory); corrupt or
    incomplete ones are reported through ``log`` and skipped. None when none is usable."""
    return _first_good(
        (c for start in (ckpt, then) if start is not None for c in _ray_candidates(start)), log
    )


def _first_good(
    cands: Iterable[Checkpoint], log: Callable[[str], None]
) -> tuple[TrainState, dict[str, torch.Tensor], str] | None:
    """(state, weights, path) of the first of ``cands`` that loads; the unusable ones before it are logged."""
    seen: set[str] = set()
    for cand in cands:
        if cand.path in seen:
            continue
        seen.add(cand.path)
        try:
            with cand.as_directory() as d:
                state, weights = load_training_checkpoint(d)
            return state, weights, checkpoint_location(cand)
        except (CheckpointError, OSError) as e:
            log(f"checkpoint {checkpoint_location(cand)} is unusable, trying the previous one: {e}")
    log("no usable checkpoint found; starting from the base weights")
    return None


def newest_good(paths: Sequence[str], log: Callable[[str], None] = log) -> str | None:
    """The first of the checkpoint ``paths`` (newest first) that loads as a training checkpoint, as a worker's
    restore would load it; the unusable ones before it are reported through ``log``. None when none loads.
    Paths may be URLs (returned as given)."""
    found = _first_good((ray_checkpoint(p) for p in paths), log)
    return found[2] if found is not None else None


def _dir_names(obj: Any) -> Iterator[str]:
    """Every ``checkpoint_dir_name`` string value in a JSON document, wherever it sits."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "checkpoint_dir_name" and isinstance(v, str):
                yield v
            else:
                yield from _dir_names(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _dir_names(v)


def snapshot_missing(run_dir: str) -> list[str]:
    """Names of the checkpoint directories that Ray Train's snapshot of ``run_dir`` lists but that no longer
    exist: Ray Train V2 refuses to restore such a run directory (``CheckpointManagerInitializationError``).

    The snapshot is Ray's internal format, so only its ``checkpoint_dir_name`` values are read, wherever they
    sit; nothing is written. A missing or unreadable snapshot gives [] (Ray starts afresh or reports it)."""
    try:
        doc = read_json(join(run_dir, RAY_SNAPSHOT_FILE), "Ray Train snapshot")
    except StorageError:
        return []
    return sorted({n for n in _dir_names(doc or {}) if not exists(join(run_dir, n))})


def checkpoints_newest_first(run_dirs: Sequence[str]) -> list[str]:
    """Paths of the ``checkpoint_step…`` directories in ``run_dirs`` (oldest directory first), newest step
    first; at the same step a later directory's comes first."""
    found = [
        (step, i, join(run_dir, name))
        for i, run_dir in enumerate(run_dirs)
        for name in listdir(run_dir)
        if (step := step_of(name)) is not None
    ]
    return [path for _, _, path in sorted(found, reverse=True)]
