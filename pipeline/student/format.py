"""The student checkpoint format (no pickle anywhere): what training writes and every evaluation reads.

A *student checkpoint* is a directory (see docs/INTERFACES.md):

* ``student.safetensors`` -- the trainable parameters, names as in ``bb.state_dict()`` (``trainable_blocks="all"``,
  SPAR-ALL: the whole image tower; an imported checkpoint: every parameter that differs from the base weights);
* ``backbone.json`` -- ``{"name", "pretrained", "weights_id", "trainable_blocks", "cache_fingerprint", "seed"}``;
* ``config.json`` -- the resolved distill config;
* ``checksums.json`` -- sha256 of every other file, written last. A directory without it, or whose files do not
  match it, is *corrupt* (:func:`verify_checkpoint`).

A training checkpoint adds its own files to these (:mod:`pipeline.train.state`). Every location may be a local
path or an fsspec URL (``s3://…``; files through :mod:`pipeline.common.storage`): :func:`load_student` downloads
a remote student (:func:`local_student`) and verifies it before loading.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.common.storage import (
    StorageError,
    exists,
    get_dir,
    is_local,
    join,
    local_path,
    read_json,
    sha256_of,
)
from spar_core.backbones import Backbone, build_backbone, check_state_dict

STUDENT_FILE = "student.safetensors"
BACKBONE_FILE = "backbone.json"
CONFIG_FILE = "config.json"
CHECKSUMS_FILE = "checksums.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or belongs to another backbone."""


# ----------------------------------------------------------------------------------------------- helpers


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, tuple | set):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def read_local_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path.parent}: missing {path.name}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path.parent}: {path.name} is not valid JSON ({e})") from None


def write_checksums(ckpt_dir: str | os.PathLike) -> None:
    """Write ``checksums.json`` (sha256 of every other file in the directory); call it last."""
    d = Path(ckpt_dir)
    sums = {
        p.name: sha256_of(str(p)) for p in sorted(d.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE
    }
    write_json(d / CHECKSUMS_FILE, {"format_version": FORMAT_VERSION, "sha256": sums})


def verify_checkpoint(ckpt_dir: str | os.PathLike, required: Iterable[str] = ()) -> None:
    """Raise CheckpointError unless ``ckpt_dir`` is complete and every file matches ``checksums.json``."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d}: not a directory")
    sums = read_local_json(d / CHECKSUMS_FILE).get("sha256", {})
    for name in required:
        if name not in sums:
            raise CheckpointError(f"checkpoint {d}: {name} is not listed in {CHECKSUMS_FILE} (incomplete)")
    for name, digest in sums.items():
        p = d / name
        if not p.is_file():
            raise CheckpointError(f"checkpoint {d}: missing {name}")
        if sha256_of(str(p)) != digest:
            raise CheckpointError(f"checkpoint {d}: {name} does not match its checksum (corrupt)")


# ---------------------------------------------------------------------------------------------- student


@dataclass(frozen=True)
class StudentMeta:
    """What a student checkpoint records beside the weights: ``backbone.json``'s training fields and ``config.json``."""

    trainable_blocks: int | str  # the last k blocks were trained, or "all"
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config (config.json)
    cache_fingerprint: str | None = None  # the teacher cache it was distilled from
    seed: int = 0  # seed of the base backbone's random weights


def write_student_files(bb: Backbone, out_dir: str | os.PathLike, meta: StudentMeta) -> None:
    """Write the three student files into an existing directory (no checksums, not atomic)."""
    d = Path(out_dir)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in bb.trainable_state_dict().items()}
    save_file(sd, str(d / STUDENT_FILE), metadata={"format": "spar-student", "version": str(FORMAT_VERSION)})
    write_json(
        d / BACKBONE_FILE,
        {
            "name": bb.name,
            "pretrained": bb.pretrained,
            "weights_id": bb.weights_id,
            "trainable_blocks": meta.trainable_blocks,
            "cache_fingerprint": meta.cache_fingerprint,
            "seed": int(meta.seed),
            "format_version": FORMAT_VERSION,
        },
    )
    write_json(d / CONFIG_FILE, meta.config)


def save_student(bb: Backbone, out_dir: str | os.PathLike, meta: StudentMeta) -> Path:
    """Save the student's trainable weights + backbone identity + config to ``out_dir`` atomically.

    Returns the directory. An existing directory is replaced only once the new one is complete.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_student_files(bb, tmp, meta)
        write_checksums(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_backbone_info(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``backbone.json`` of a student checkpoint (a local folder or a URL)."""
    if not is_local(str(ckpt_dir)):
        info = read_json(join(str(ckpt_dir), BACKBONE_FILE), "checkpoint file", CheckpointError)
        if info is None:
            raise CheckpointError(f"checkpoint {ckpt_dir}: missing {BACKBONE_FILE}")
    else:
        info = read_local_json(Path(local_path(str(ckpt_dir))) / BACKBONE_FILE)
    for k in ("name", "weights_id"):
        if k not in info:
            raise CheckpointError(f"checkpoint {ckpt_dir}: {BACKBONE_FILE} lacks {k!r}")
    return info


def load_student(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    expect_backbone: str | None = None,
) -> Backbone:
    """Rebuild the base backbone named in ``backbone.json`` and load the trained weights into it.

    ``ckpt_dir``: a local directory or a URL (downloaded and verified first, :func:`local_student`). Refuses
    (CheckpointError) a checkpoint whose files are corrupt, whose base weights identity differs from the backbone
    that can be built here, or (``expect_backbone``) that is for another backbone.
    """
    where = str(ckpt_dir)
    if is_local(where):
        d = Path(local_path(where))
        if not d.is_dir():
            raise CheckpointError(f"student checkpoint {where}: no such directory")
        if (d / CHECKSUMS_FILE).exists():
            verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE))
    with local_student(where) as d:  # a URL: downloaded and verified
        info = read_backbone_info(d)
        if expect_backbone is not None and info["name"] != expect_backbone:
            raise CheckpointError(
                f"student checkpoint {where} is for backbone {info['name']!r}, not {expect_backbone!r}"
            )
        bb = build_backbone(
            info["name"], pretrained=info.get("pretrained") or None, device=device, dtype=dtype,
            seed=int(info.get("seed", 0)),
        )  # fmt: skip
        if bb.weights_id != info["weights_id"]:
            raise CheckpointError(
                f"student checkpoint {where} was trained from base weights {info['weights_id']!r}, but the "
                f"backbone built here has {bb.weights_id!r}; pass the same --pretrained weights"
            )
        try:
            sd = load_file(str(d / STUDENT_FILE), device="cpu")
        except FileNotFoundError:
            raise CheckpointError(f"student checkpoint {where}: missing {STUDENT_FILE}") from None
        except Exception as e:  # safetensors raises its own error types on bad headers
            raise CheckpointError(f"student checkpoint {where}: cannot read {STUDENT_FILE} ({e})") from None
        own = bb.state_dict()
        what = f"student checkpoint {where} does not fit {info['name']}"
        check_state_dict(what, sd, own, partial=True, error=CheckpointError)
        bb.load_trainable_state_dict({k: v.to(device=device, dtype=own[k].dtype) for k, v in sd.items()})
    return bb


@contextlib.contextmanager
def local_student(location: str) -> Iterator[Path]:
    """A local directory holding the student checkpoint at ``location``: the directory itself for a local path;
    for a URL, a verified download into a temporary directory of the same name (removed afterwards).

    A remote student is complete only once its ``checksums.json`` exists (:func:`export_student` writes it
    last): without it, or with a file that does not match it, a CheckpointError names the URL."""
    if is_local(location):
        yield Path(local_path(location))
        return
    url = location.rstrip("/")
    if not exists(join(url, CHECKSUMS_FILE)):
        missing = not exists(url)
        what = "no such directory" if missing else f"no {CHECKSUMS_FILE} (incomplete: still being written?)"
        raise CheckpointError(f"student checkpoint {url}: {what}")
    with tempfile.TemporaryDirectory(prefix="spar-student-") as tmp:
        d = Path(tmp) / posixpath.basename(url)
        try:
            get_dir(url, str(d))
            verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE))
        except (CheckpointError, StorageError) as e:
            raise CheckpointError(str(e).replace(str(d), url)) from None
        yield d
