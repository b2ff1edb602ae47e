"""Export: a finished run's last training checkpoint as a plain student checkpoint, local or on a URL."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pipeline.common.storage import (
    is_local,
    join,
    local_path,
    put_dir,
    remove,
    write_bytes_atomic,
)
from pipeline.common.tracking import write_run_lineage
from pipeline.student.format import (
    BACKBONE_FILE,
    CHECKSUMS_FILE,
    CONFIG_FILE,
    STUDENT_FILE,
    CheckpointError,
    verify_checkpoint,
    write_checksums,
)


def export_student(
    src: str | os.PathLike, out: str | os.PathLike, lineage: dict[str, str] | None = None
) -> str:
    """Copy the student files of the (local) training checkpoint ``src`` to ``out``, a plain student checkpoint,
    and return ``out``. ``lineage`` (run id, experiment id, tracking URI) is recorded beside them so evaluations
    nest under the run. Raises CheckpointError when ``src`` is incomplete or corrupt.

    A local ``out`` is replaced atomically (built beside it, then renamed). A URL ``out`` is built in a local
    temporary directory and uploaded: the old ``checksums.json`` is removed first and the new one written last,
    so a reader (:func:`local_student`) never takes a half-written student for a complete one."""
    verify_checkpoint(src, required=(STUDENT_FILE, BACKBONE_FILE, CONFIG_FILE))
    loc = str(out)
    if not is_local(loc):
        with tempfile.TemporaryDirectory(prefix="spar-export-") as tmp:
            build = Path(tmp) / "student"
            _build_student(src, build, lineage)
            _upload_student(build, loc.rstrip("/"))
        return loc.rstrip("/")
    dst = Path(local_path(loc))
    tmp_dir = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    _build_student(src, tmp_dir, lineage)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp_dir, dst)
    return loc


def _build_student(src: str | os.PathLike, d: Path, lineage: dict[str, str] | None) -> None:
    """The exported student's files in the new local directory ``d``, ``checksums.json`` last."""
    d.mkdir(parents=True)
    for f in (STUDENT_FILE, BACKBONE_FILE, CONFIG_FILE):
        shutil.copy2(Path(src) / f, d / f)
    if lineage:
        write_run_lineage(d, lineage["run_id"], lineage["experiment_id"], lineage["tracking_uri"])
    write_checksums(d)


def _upload_student(build: Path, url: str) -> None:
    """Replace the student at ``url`` by the local directory ``build``, its commit point (checksums) last."""
    sums = (build / CHECKSUMS_FILE).read_bytes()
    (build / CHECKSUMS_FILE).unlink()
    remove(join(url, CHECKSUMS_FILE))  # an older student there is incomplete from here on ...
    remove(url)  # ... and none of its files is left
    put_dir(str(build), url)
    write_bytes_atomic(join(url, CHECKSUMS_FILE), sums, error=CheckpointError)
