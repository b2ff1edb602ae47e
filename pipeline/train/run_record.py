"""The run record of ``spar distill``: run names, their MLflow run ids and Ray Train directories.

``<workdir>/distill/last_run.json`` names the last run (what ``--resume`` continues), each run's MLflow run id, and
the continuations a resumed run moved to: Ray Train V2 refuses a run directory whose snapshot names a deleted
checkpoint (and would train over older ones after a corrupt latest one), so ``--resume`` then continues the run in
a new Ray Train directory from the newest good checkpoint (:func:`resume_ray_run`), same MLflow run, nothing
deleted.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass
from typing import Any

from pipeline.common.storage import (
    StorageError,
    exists,
    join,
    listdir,
    read_json,
    write_bytes_atomic,
)
from pipeline.student.format import BACKBONE_FILE
from pipeline.train.config import DistillConfig, DistillError
from pipeline.train.progress import log
from pipeline.train.run_dir import RAY_SNAPSHOT_FILE, checkpoints_newest_first, newest_good, snapshot_missing
from pipeline.train.state import step_of
from spar_core.backbones import Backbone


@dataclass(frozen=True)
class RayRun:
    """The Ray Train directory a run trains in: its own (``<storage>/<run name>``) or, once Ray refused that
    one on --resume, a continuation started from a checkpoint of an earlier one."""

    name: str  # RunConfig name
    start: str  # checkpoint a continuation starts from ("" = Ray's own checkpoints only)
    dirs: list[str]  # every Ray Train directory of the run, oldest first (this one last)


def _last_run_file(workdir: str) -> str:
    return join(workdir, "distill", "last_run.json")


def _read_last_run(workdir: str) -> dict[str, Any]:
    """``last_run.json``: {"run_name": last run, "runs": {run name: MLflow run id},
    "continuations": {run name: [{"ray_run": Ray Train run name, "from": checkpoint it started from}]}}."""
    return read_json(_last_run_file(workdir), "the distill run record", DistillError) or {}


def _write_last_run(workdir: str, doc: dict[str, Any]) -> None:
    write_bytes_atomic(_last_run_file(workdir), json.dumps(doc, indent=2).encode(), error=DistillError)


def resolve_run_name(
    cfg: DistillConfig, workdir: str, resume: bool, fingerprint: str
) -> tuple[str, str | None]:
    """(run name: the MLflow run's, the student's and its first Ray Train directory's; MLflow run id to continue
    or None)."""
    last = _last_run_file(workdir)
    if resume:
        prev = _read_last_run(workdir)
        name = cfg.run_name or prev.get("run_name", "")
        if not name:
            raise DistillError(
                f"--resume: no previous distill run recorded in {last}; pass --set run_name=NAME"
            )
        return name, prev.get("runs", {}).get(name)
    if cfg.run_name:
        return cfg.run_name, None
    return f"distill-{fingerprint[:8]}-{time.strftime('%Y%m%d-%H%M%S')}", None


def remember_run(workdir: str, run_name: str, run_id: str) -> None:
    doc = _read_last_run(workdir)
    doc.setdefault("runs", {})[run_name] = run_id
    doc["run_name"] = run_name
    _write_last_run(workdir, doc)


def ray_run_of(workdir: str, storage: str, run_name: str) -> RayRun:
    """The Ray Train directory the run trains in: the newest of its recorded directories (``last_run.json``)."""
    conts = _read_last_run(workdir).get("continuations", {}).get(run_name, [])
    names = [run_name] + [c["ray_run"] for c in conts]
    return RayRun(names[-1], conts[-1]["from"] if conts else "", [join(storage, n) for n in names])


def resume_ray_run(workdir: str, storage: str, run_name: str, here: RayRun) -> RayRun:
    """``here``, or a new Ray Train directory when Ray would not resume ``here`` from the newest good checkpoint.

    Ray Train V2 refuses a directory whose snapshot names a deleted checkpoint, and resumes from its latest
    registered one even when that one is corrupt; falling back from there inside the same directory would let
    Ray's ``num_to_keep`` delete the older checkpoints it trains over. In both cases the run continues in a new
    directory ``<run name>.resumed-step<N>`` whose workers start from the newest good checkpoint of the run (the
    V2 way: the checkpoint goes in ``train_loop_config``; Ray's internal snapshot is never rewritten). Nothing is
    deleted; the continuation is recorded in ``last_run.json`` so later resumes use it."""
    ckpts = checkpoints_newest_first(here.dirs)
    missing = [join(here.dirs[-1], m) for m in snapshot_missing(here.dirs[-1])]
    if not ckpts and not missing:
        return here  # nothing saved yet: Ray starts afresh
    start = newest_good(ckpts) or ""
    if not missing and ckpts and start == ckpts[0]:
        if exists(join(here.dirs[-1], RAY_SNAPSHOT_FILE)):
            return here
        # no record of Ray Train's (an in-process run wrote them): its workers start from the newest
        return RayRun(here.name, start, here.dirs)
    name = continuation_name(storage, run_name, start)
    using = (
        f"resuming from {start}, the newest good checkpoint left" if start else "none is left: starting anew"
    )
    skipped = f"checkpoint {', '.join(missing)} no longer exists: skipped; " if missing else ""
    log(
        f"{skipped}{using}. Ray Train would not resume {here.dirs[-1]} from it, so the run continues in "
        f"{join(storage, name)} (the earlier directories are kept as they are)"
    )
    doc = _read_last_run(workdir)
    conts = doc.setdefault("continuations", {}).setdefault(run_name, [])
    conts.append({"ray_run": name, "from": start})
    _write_last_run(workdir, doc)
    return RayRun(name, start, [*here.dirs, join(storage, name)])


def continuation_name(storage: str, run_name: str, start: str) -> str:
    """A Ray Train run name not used yet in ``storage`` for continuing ``run_name`` from checkpoint ``start``."""
    base = f"{run_name}.resumed-step{step_of(start.rstrip('/').rsplit('/', 1)[-1]) or 0:09d}"
    name, n = base, 1
    while exists(join(storage, name)):
        n += 1
        name = f"{base}-{n}"
    return name


def check_resume_backbone(run_dirs: list[str], student: Backbone) -> None:
    """Refuse to resume a run whose checkpoints hold another backbone's (or other base weights') student."""
    for run_dir in reversed(run_dirs):  # nothing saved yet: nothing to check
        for name in sorted((n for n in listdir(run_dir) if step_of(n) is not None), reverse=True):
            try:
                meta = read_json(join(run_dir, name, BACKBONE_FILE), "checkpoint backbone record")
            except StorageError:
                meta = None
            if meta is None:
                continue  # unusable checkpoints are reported and skipped by the restore
            if meta.get("name") != student.name or meta.get("weights_id") != student.weights_id:
                raise DistillError(
                    f"distill --resume: run {posixpath.basename(run_dirs[0].rstrip('/'))} trains a "
                    f"{meta.get('name')} student from {meta.get('weights_id')} (checkpoint {name}), not "
                    f"{student.name} from {student.weights_id}; resume with the same student or start a new run"
                )
            return
