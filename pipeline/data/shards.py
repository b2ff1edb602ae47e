"""Step 4 of an image's path: into a shard. :func:`write_shard` (one Ray task per shard) reads, processes and encodes
its images and writes ``shard-XXXXXX.tar`` (fixed tar metadata, ``<key>.png`` + ``<key>.json`` per sample) and its
sidecar ``shard-XXXXXX.json`` (manifest rows, rejections, tar hash and size).

Resume: every shard has a *plan* digest (format, resampling, config, index and its (key, source) items).
:func:`load_complete_shard` accepts an existing shard only when its tar and sidecar agree with each other and with the
current plan, so a re-run writes only what is missing; :func:`remove_stale` clears what an interrupted or larger
earlier run left.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import fsspec

from pipeline.common.config import to_dict
from pipeline.common.storage import canonical_json, replace_file, sha256_of, shard_stem
from pipeline.common.trace import mark
from pipeline.data.archives import ArchiveReader, MemberLocation
from pipeline.data.augment import process_image
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import FORMAT_VERSION, ImageRecord
from pipeline.data.png import encode_png
from pipeline.data.sources import Rejected

if TYPE_CHECKING:  # Ray is only needed by the driver that hands the progress actor in
    from ray.actor import ActorHandle

__all__ = ["RESAMPLE", "ShardProgress", "plan_digest", "write_shard", "load_complete_shard", "remove_stale"]

Items = Sequence[tuple[str, str]]  # (key, source) of a shard's images, in shard order

RESAMPLE = "cv2-inter-linear"  # part of every shard's plan: shards resized otherwise (bicubic) are rewritten
# a shard's tar or plan, with an attempt's temp suffix
_SHARD_FILE = re.compile(r"shard-(\d{6})\.(tar|json)((?:\.[0-9a-f]+)?\.tmp)?")


def plan_digest(cfg: IngestConfig, shard: int, items: Items) -> str:
    """sha256 of what shard ``shard`` must hold: format, resampling, config and its (key, source) items."""
    # ``select`` only decides which inputs exist, and the items say that already: left out, so it never rewrites
    # the shards of a folder ingest
    config = {k: v for k, v in to_dict(cfg).items() if k != "select"}
    plan = [FORMAT_VERSION, RESAMPLE, config, shard, list(items)]
    return hashlib.sha256(canonical_json(plan).encode()).hexdigest()


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A tar member header with fixed metadata (no time, owner or permissions that vary between runs)."""
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


class ShardProgress:
    """Ray actor: images done per in-flight shard (set, not added, so a retried task does not double-count)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def set(self, shard: int, n: int) -> None:
        self.done[shard] = n

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


def _add_samples(
    tf: tarfile.TarFile,
    shard: int,
    items: Items,
    cfg: IngestConfig,
    progress: ActorHandle | None,
    reader: ArchiveReader,
) -> tuple[list[dict[str, Any]], list[list[str]]]:
    """Process the shard's images into ``tf``; returns (manifest rows, [source, reason] of the rejected)."""
    records: list[dict[str, Any]] = []
    rejected: list[list[str]] = []
    for n, (key, source) in enumerate(items):
        if progress is not None and n:
            progress.set.remote(shard, n)
        try:
            arr, meta = process_image(key, source, reader.read(source), cfg)  # (h, w, 3) uint8
        except Rejected as r:
            rejected.append([source, r.reason])
            continue
        png = encode_png(arr, cfg.png_compress_level)
        js = canonical_json(meta).encode()
        tf.addfile(_tarinfo(f"{key}.json", len(js)), io.BytesIO(js))
        tf.addfile(_tarinfo(f"{key}.png", len(png)), io.BytesIO(png))
        h, w = meta["size"]
        rec = ImageRecord(key, shard, h, w, source, meta["pixel_sha256"], meta["augmentation"])
        records.append(rec.manifest_row())
    return records, rejected


def write_shard(
    images_url: str,
    shard: int,
    items: Items,
    cfg: IngestConfig,
    plan: str,
    progress: ActorHandle | None = None,
    locations: dict[str, MemberLocation] | None = None,
) -> dict[str, Any]:
    """Write one shard (runs inside a Ray task). ``items``: (key, source) in shard order.

    Returns the sidecar dict: records (manifest rows), rejected [(source, reason)], tar sha256 and size.
    ``progress``: optional ShardProgress actor handle, told after every image. ``locations``: where the shard's
    archive members are (:mod:`pipeline.data.archives`); other sources are read as files.
    """
    mark("task_start", once=True)
    fs, images = fsspec.core.url_to_fs(images_url)
    stem = f"{images}/{shard_stem(shard)}"
    # a unique temporary name per attempt: a retried task, or a straggler worker of a killed run, writing the same
    # shard never interleaves with this one within a file. The pixels and records are deterministic, so whichever
    # rename lands last is right; the PNG bytes once differed between two worker processes (test_ingest.py
    # _tree_content), so a sidecar and tar of two such writers fail load_complete_shard and the next run rewrites
    # the shard, while readers go by the manifest's pixel_sha256, which both agree with
    token = uuid.uuid4().hex[:12]
    tmp = f"{stem}.tar.{token}.tmp"
    with (
        ArchiveReader(locations) as reader,
        fs.open(tmp, "wb") as raw,
        tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf,
    ):
        records, rejected = _add_samples(tf, shard, items, cfg, progress, reader)
    sidecar = {
        "format_version": FORMAT_VERSION,
        "shard": shard,
        "plan_sha256": plan,
        "tar_sha256": sha256_of(tmp, fs),
        "tar_bytes": int(fs.size(tmp)),
        "records": records,
        "rejected": rejected,
    }
    with fs.open(f"{stem}.json.{token}.tmp", "wb") as f:
        f.write(canonical_json(sidecar).encode())
    replace_file(fs, f"{stem}.json.{token}.tmp", f"{stem}.json")
    replace_file(fs, tmp, f"{stem}.tar")  # the shard becomes visible only now, complete
    return sidecar


def load_complete_shard(
    fs: fsspec.AbstractFileSystem, images: str, shard: int, plan: str, items: Items
) -> dict[str, Any] | None:
    """The sidecar of shard ``shard`` if its tar exists and matches it and the plan, and it accounts for every
    planned input (``items``: (key, source) of the shard's plan) exactly once, in order: accepted records and
    rejections together. Else None.
    """
    tar, side = f"{images}/{shard_stem(shard)}.tar", f"{images}/{shard_stem(shard)}.json"
    if not (fs.exists(tar) and fs.exists(side)):
        return None
    try:
        with fs.open(side, "rb") as f:
            sc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if sc.get("plan_sha256") != plan or sc.get("format_version") != FORMAT_VERSION:
        return None
    if fs.size(tar) != sc.get("tar_bytes") or sha256_of(tar, fs) != sc.get("tar_sha256"):
        return None
    return sc if _accounts_for(sc, items) else None


def _accounts_for(sc: dict[str, Any], items: Items) -> bool:
    """Whether sidecar ``sc`` holds every planned (key, source) exactly once, accepted in order or rejected."""
    accepted = {r.get("key"): r.get("source") for r in sc.get("records", [])}
    rejected = {x[0] for x in sc.get("rejected", [])}
    keys = [r.get("key") for r in sc.get("records", [])]
    if keys != [k for k, _ in items if k in accepted] or len(accepted) + len(rejected) != len(items):
        return False
    return not any(
        accepted.get(k, src) != src or (k not in accepted and src not in rejected) for k, src in items
    )


def remove_stale(fs: fsspec.AbstractFileSystem, images: str, num_shards: int) -> None:
    """Delete leftovers: temporary shard files and shards beyond the current plan (from an earlier, larger run)."""
    for p in fs.ls(images, detail=False):
        m = _SHARD_FILE.fullmatch(p.rsplit("/", 1)[-1])
        if m and (m.group(3) or int(m.group(1)) >= num_shards):
            fs.rm(p)
