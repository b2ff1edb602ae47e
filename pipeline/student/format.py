"""Student and training-state checkpoints (no pickle anywhere).

A *student checkpoint* is a directory (see docs/INTERFACES.md):

* ``student.safetensors`` -- the trainable parameters, names as in ``bb.state_dict()`` (``trainable_blocks="all"``,
  SPAR-ALL: the whole image tower; an imported checkpoint: every parameter that differs from the base weights);
* ``backbone.json`` -- ``{"name", "pretrained", "weights_id", "trainable_blocks", "cache_fingerprint", "seed"}``;
* ``config.json`` -- the resolved distill config.

A *training checkpoint* (what Ray Train stores every N steps) is a student checkpoint plus

* ``train_state.safetensors`` -- optimizer tensors (``opt.<param index>.<name>``) and torch RNG states;
* ``train_state.json`` -- step, epoch, data position, optimizer param groups, scaler and python/numpy RNG
  states, anything else JSON-able;
* ``checksums.json`` -- sha256 of every file above, written last. A directory without it, or whose files do
  not match it, is *corrupt* and is skipped in favour of the previous good one
  (:func:`restore_latest_good`, what a Ray Train worker resumes from).

Ray Train keeps a run's training checkpoints in its run directory (``<storage>/<run name>/checkpoint_step…``) with
its own record of them (``checkpoint_manager_snapshot.json``); :func:`snapshot_missing` tells when that record names
a deleted checkpoint (Ray then refuses the directory); :func:`checkpoints_newest_first` and :func:`newest_good`
find the newest good one left.

A finished run's last training checkpoint is exported as a plain student checkpoint (:func:`export_student`).

Every location may be a local path or an fsspec URL (``s3://…``; files through :mod:`pipeline.common.storage`):
Ray checkpoints of a URL are read through the same filesystem (:func:`ray_checkpoint`, :func:`checkpoint_location`);
a student exported to a URL is built locally and uploaded with ``checksums.json`` last (its commit point), and
:func:`load_student` downloads one (:func:`local_student`) and verifies it before loading.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load_file, save_file

from pipeline.common.storage import (
    StorageError,
    arrow_filesystem,
    exists,
    get_dir,
    is_local,
    join,
    listdir,
    local_path,
    put_dir,
    read_json,
    remove,
    sha256_of,
    write_bytes_atomic,
)
from pipeline.common.tracking import write_run_lineage
from spar_core.backbones import Backbone, build_backbone

if TYPE_CHECKING:
    from ray.train import Checkpoint

STUDENT_FILE = "student.safetensors"
BACKBONE_FILE = "backbone.json"
CONFIG_FILE = "config.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_JSON_FILE = "train_state.json"
CHECKSUMS_FILE = "checksums.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete, corrupt or belongs to another backbone."""


# ----------------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: Any) -> None:
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


def _read_json(path: Path) -> Any:
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
    _write_json(d / CHECKSUMS_FILE, {"format_version": FORMAT_VERSION, "sha256": sums})


def verify_checkpoint(ckpt_dir: str | os.PathLike, required: Iterable[str] = ()) -> None:
    """Raise CheckpointError unless ``ckpt_dir`` is complete and every file matches ``checksums.json``."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint {d}: not a directory")
    sums = _read_json(d / CHECKSUMS_FILE).get("sha256", {})
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


def write_student_files(
    bb: Backbone,
    out_dir: str | os.PathLike,
    *,
    trainable_blocks: int | str,
    config: dict[str, Any],
    cache_fingerprint: str | None = None,
    seed: int = 0,
) -> None:
    """Write the three student files into an existing directory (no checksums, not atomic)."""
    d = Path(out_dir)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in bb.trainable_state_dict().items()}
    save_file(sd, str(d / STUDENT_FILE), metadata={"format": "spar-student", "version": str(FORMAT_VERSION)})
    _write_json(
        d / BACKBONE_FILE,
        {
            "name": bb.name,
            "pretrained": bb.pretrained,
            "weights_id": bb.weights_id,
            "trainable_blocks": trainable_blocks,
            "cache_fingerprint": cache_fingerprint,
            "seed": int(seed),
            "format_version": FORMAT_VERSION,
        },
    )
    _write_json(d / CONFIG_FILE, config)


def _atomic_dir(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def save_student(
    bb: Backbone,
    out_dir: str | os.PathLike,
    *,
    trainable_blocks: int | str,
    config: dict[str, Any],
    cache_fingerprint: str | None = None,
    seed: int = 0,
) -> Path:
    """Save the student's trainable weights + backbone identity + config to ``out_dir`` atomically.

    Returns the directory. An existing directory is replaced only once the new one is complete.
    """
    out = Path(out_dir)
    tmp = _atomic_dir(out)
    try:
        write_student_files(
            bb,
            tmp,
            trainable_blocks=trainable_blocks,
            config=config,
            cache_fingerprint=cache_fingerprint,
            seed=seed,
        )
        write_checksums(tmp)
        _publish(tmp, out)
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
        info = _read_json(Path(local_path(str(ckpt_dir))) / BACKBONE_FILE)
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
    if is_local(str(ckpt_dir)):
        d = Path(local_path(str(ckpt_dir)))
        if not d.is_dir():
            raise CheckpointError(f"student checkpoint {ckpt_dir}: no such directory")
        if (d / CHECKSUMS_FILE).exists():
            verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE))
        return _load_student_files(d, str(ckpt_dir), device, dtype, expect_backbone)
    with local_student(str(ckpt_dir)) as d:
        return _load_student_files(d, str(ckpt_dir), device, dtype, expect_backbone)


def _load_student_files(
    d: Path, where: str, device: str | torch.device, dtype: torch.dtype, expect_backbone: str | None
) -> Backbone:
    """:func:`load_student` of the (verified) local directory ``d``; errors name ``where``."""
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
            f"student checkpoint {where} was trained from base weights {info['weights_id']!r}, but the backbone "
            f"built here has {bb.weights_id!r}; pass the same --pretrained weights"
        )
    try:
        sd = load_file(str(d / STUDENT_FILE), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"student checkpoint {where}: missing {STUDENT_FILE}") from None
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise CheckpointError(f"student checkpoint {where}: cannot read {STUDENT_FILE} ({e})") from None
    own = bb.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise CheckpointError(
                f"student checkpoint {where}: tensor {k!r} is not a parameter of {info['name']}"
            )
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"student checkpoint {where}: tensor {k!r} has shape {tuple(v.shape)}, backbone expects "
                f"{tuple(own[k].shape)}"
            )
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


# ----------------------------------------------------------------------------------------- train state


@dataclass
class TrainState:
    """Everything needed to continue training exactly where a checkpoint left off."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    optimizer: dict[str, Any] | None = None  # torch optimizer state_dict
    scaler: dict[str, Any] | None = None  # GradScaler state_dict (fp16 only)
    rng: dict[str, Any] = field(default_factory=dict)  # see capture_rng / restore_rng
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able (run ids, metrics, world size ...)


def capture_rng() -> dict[str, Any]:
    """Snapshot torch (CPU, CUDA), numpy and python RNG states."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    np_state = np.random.get_state()
    rng["numpy"] = [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]
    py = random.getstate()
    rng["python"] = [py[0], list(py[1]), py[2]]
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Inverse of capture_rng (missing entries are left alone)."""
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        n = rng["numpy"]
        np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    if "python" in rng:
        p = rng["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))


def _split_optimizer(opt_sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt_sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = v.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    return tensors, {"param_groups": opt_sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if not key.startswith("opt."):
            continue
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(
    bb: Backbone,
    out_dir: str | os.PathLike,
    state: TrainState,
    *,
    trainable_blocks: int | str,
    config: dict[str, Any],
    cache_fingerprint: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a full training checkpoint into ``out_dir`` (created; must not hold another checkpoint)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    write_student_files(
        bb,
        d,
        trainable_blocks=trainable_blocks,
        config=config,
        cache_fingerprint=cache_fingerprint,
        seed=seed,
    )
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION}
    if state.optimizer is not None:
        t, m = _split_optimizer(state.optimizer)
        tensors.update(t)
        meta["optimizer"] = m
    rng_json = {}
    for k, v in state.rng.items():
        if k == "torch":
            tensors["rng.torch"] = v.contiguous()
        elif k == "cuda":
            for i, s in enumerate(v):
                tensors[f"rng.cuda.{i}"] = s.contiguous()
            rng_json["cuda_count"] = len(v)
        else:
            rng_json[k] = v
    save_file(tensors, str(d / STATE_TENSORS_FILE), metadata={"format": "spar-train-state"})
    meta.update(
        step=state.step,
        epoch=state.epoch,
        batch_in_epoch=state.batch_in_epoch,
        scaler=state.scaler,
        rng=rng_json,
        extra=state.extra,
    )
    _write_json(d / STATE_JSON_FILE, meta)
    write_checksums(d)
    return d


def load_training_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """Verify and read a training checkpoint: (TrainState, trainable weights). Raises CheckpointError."""
    d = Path(ckpt_dir)
    verify_checkpoint(d, required=(STUDENT_FILE, BACKBONE_FILE, STATE_TENSORS_FILE, STATE_JSON_FILE))
    meta = _read_json(d / STATE_JSON_FILE)
    try:
        tensors = load_file(str(d / STATE_TENSORS_FILE), device="cpu")
        weights = load_file(str(d / STUDENT_FILE), device="cpu")
    except Exception as e:
        raise CheckpointError(f"checkpoint {d}: cannot read tensors ({e})") from None
    rng: dict[str, Any] = {k: v for k, v in meta.get("rng", {}).items() if k != "cuda_count"}
    if "rng.torch" in tensors:
        rng["torch"] = tensors["rng.torch"]
    n_cuda = int(meta.get("rng", {}).get("cuda_count", 0))
    if n_cuda:
        rng["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(n_cuda)]
    opt = _join_optimizer(tensors, meta["optimizer"]) if "optimizer" in meta else None
    state = TrainState(
        step=int(meta["step"]),
        epoch=int(meta["epoch"]),
        batch_in_epoch=int(meta["batch_in_epoch"]),
        optimizer=opt,
        scaler=meta.get("scaler"),
        rng=rng,
        extra=meta.get("extra", {}),
    )
    return state, weights


def checkpoint_dir_name(step: int) -> str:
    """Name of the Ray Train checkpoint directory for ``step`` (sortable)."""
    return f"checkpoint_step{step:09d}"


def step_of(name: str) -> int | None:
    """Inverse of checkpoint_dir_name; None for other names."""
    prefix = "checkpoint_step"
    if name.startswith(prefix) and name[len(prefix) :].isdigit():
        return int(name[len(prefix) :])
    return None


def _log(msg: str) -> None:
    print(f"[spar distill] {msg}", file=sys.stderr, flush=True)


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
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    fs, path = ckpt.filesystem, ckpt.path.rstrip("/")
    parent = posixpath.dirname(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(parent))
    except OSError:
        infos = []
    steps = {
        i.path.rstrip("/"): step_of(posixpath.basename(i.path.rstrip("/")))
        for i in infos
        if i.type == pafs.FileType.Directory
    }
    latest = steps.get(path)
    others = sorted(
        (p for p, s in steps.items() if s is not None and p != path and (latest is None or s <= latest)),
        key=lambda p: steps[p] or 0,
        reverse=True,
    )
    return [ckpt] + [Checkpoint(path=p, filesystem=fs) for p in others]


def restore_latest_good(
    ckpt: Checkpoint | None, log: Callable[[str], None] = _log, *, then: Checkpoint | None = None
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


def newest_good(paths: Sequence[str], log: Callable[[str], None] = _log) -> str | None:
    """The first of the checkpoint ``paths`` (newest first) that loads as a training checkpoint, as a worker's
    restore would load it; the unusable ones before it are reported through ``log``. None when none loads.
    Paths may be URLs (returned as given)."""
    found = _first_good((ray_checkpoint(p) for p in paths), log)
    return found[2] if found is not None else None


# ------------------------------------------------------------------------------------ Ray Train run dirs


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


# ------------------------------------------------------------------------------------------------ export


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
