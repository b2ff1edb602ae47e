"""Looking after caches on disk: verify (every shard's commit state and every image's checksum), invalidate shards
for recomputation, list and summarize the caches under a root, collect garbage, remove a cache.

``spar cache ls|verify|rm|gc`` (:mod:`.commands`) print what these return; repairing is recomputation, which
belongs to :mod:`.precompute` and is called from the command layer, not from here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from pipeline.cache.layout import ShardFiles, open_stored_array
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import (
    ARRAY_NAME,
    QUANTIZED_DTYPES,
    SCALES_NAME,
    SHARDS_DIR,
    SPEC_NAME,
    STALE_TAG,
    CacheError,
    feature_checksum,
)
from pipeline.common import storage
from pipeline.data.imageset import open_imageset


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache: ``where`` is a shard name or "spec.json"."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def verify_cache(path: str) -> tuple[TeacherCache, list[Problem]]:
    """Check a cache: spec.json against its directory name, each shard's marker/manifest/store, and every image's
    rows against its checksum. Returns the cache and the problems found."""
    cache = open_cache(path)
    problems: list[Problem] = []
    fp = cache.spec.fingerprint()
    dirname = cache.path.rstrip("/").rsplit("/", 1)[-1]
    if fp != cache.fingerprint:
        problems.append(
            Problem(SPEC_NAME, f"spec hashes to {fp}, but records fingerprint {cache.fingerprint}")
        )
    if dirname != fp:
        problems.append(
            Problem(SPEC_NAME, f"spec fingerprint {fp} does not match its directory name {dirname}")
        )
    for i in range(cache.num_shards):
        p = _verify_shard(cache, i)
        if p:
            problems.append(Problem(storage.shard_stem(i), p))
    return cache, problems


def shards_with_problems(problems: Sequence[Problem]) -> list[int]:
    """The shard indices named by ``problems`` (spec.json problems are not shards)."""
    return [int(p.where.split("-")[1]) for p in problems if p.where != SPEC_NAME]


def _verify_shard(cache: TeacherCache, i: int) -> str:
    """What is wrong with shard ``i`` ("" when nothing)."""
    files = ShardFiles(cache.path, i)
    if not storage.exists(files.marker):
        if not storage.exists(files.store):
            return "missing (never computed or not finished)"
        return "incomplete (no completion marker)"
    ok, reason, manifest = files.state()
    if not ok or manifest is None:
        return reason
    try:
        arr = open_stored_array(files.store, ARRAY_NAME)
    except Exception as e:  # noqa: BLE001 - any failure to open is a finding, not a crash
        return f"store unreadable: {type(e).__name__}: {e}"
    if tuple(arr.shape) != (manifest["rows"], manifest["dim"]):
        return f"store shape {tuple(arr.shape)} != manifest ({manifest['rows']}, {manifest['dim']})"
    if str(arr.dtype) != manifest["dtype"]:
        return f"store dtype {arr.dtype} != manifest {manifest['dtype']}"
    sarr = None
    if manifest["dtype"] in QUANTIZED_DTYPES:
        try:
            sarr = open_stored_array(files.store, SCALES_NAME)
        except Exception as e:  # noqa: BLE001 - a missing or unreadable scales array is a finding
            return f"scales unreadable: {type(e).__name__}: {e}"
        if tuple(sarr.shape) != (manifest["rows"],):
            return f"scales shape {tuple(sarr.shape)} != ({manifest['rows']},)"
    return _manifest_rows_problem(manifest) or _data_problem(manifest, arr, sarr)


def _manifest_rows_problem(manifest: dict[str, Any]) -> str:
    """The manifest's images must cover the store's rows contiguously, in order."""
    expected = 0
    for e in manifest["entries"]:
        if e["offset"] != expected:
            return f"manifest rows not contiguous at key {e['key']!r}"
        expected += e["h"] * e["w"]
    if expected != manifest["rows"]:
        return f"manifest covers {expected} rows, store has {manifest['rows']}"
    return ""


def _data_problem(manifest: dict[str, Any], arr: zarr.Array, sarr: zarr.Array | None) -> str:
    """Every image's stored rows (and scales) must decode and match their checksum."""
    try:
        data: np.ndarray = arr[:]  # (rows, D)
        sdata: np.ndarray | None = sarr[:] if sarr is not None else None  # (rows,)
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt chunk fails to decode
        return f"store truncated or corrupt: {type(e).__name__}: {e}"
    for e in manifest["entries"]:
        sl = slice(e["offset"], e["offset"] + e["h"] * e["w"])
        if feature_checksum(data[sl], None if sdata is None else sdata[sl]) != e["checksum"]:
            return f"bad checksum for key {e['key']!r}"
    return ""


def invalidate_shards(path: str, shards: Sequence[int]) -> None:
    """Make shards incomplete (marker first, then the store with its manifest) so precompute recomputes them."""
    for i in shards:
        files = ShardFiles(path, i)
        storage.remove(files.marker)
        storage.remove(files.store)


def list_caches(cache_root: str) -> list[str]:
    """Paths of the caches (directories with a spec.json) directly under ``cache_root``."""
    paths = (storage.join(cache_root, name) for name in storage.listdir(cache_root))
    return [p for p in paths if storage.exists(storage.join(p, SPEC_NAME))]


def summarize(path: str) -> dict[str, Any]:
    """ls row: spec summary, shards done/total, size on disk, bytes per image."""
    c = open_cache(path)
    done = [i for i in range(c.num_shards) if c.shard_complete(i)]
    images = sum(len(c.manifest(i)["entries"]) for i in done)
    size = storage.size_on_disk(c.path)
    s = c.spec
    return {
        "path": c.path,
        "fingerprint": c.fingerprint,
        "backbone": s.backbone,
        "weights_id": s.weights_id,
        "crop": s.crop,
        "stride": s.stride,
        "dtype": s.dtype,
        "shards_done": len(done),
        "shards_total": c.num_shards,
        "images_done": images,
        "images_total": c.num_images,
        "bytes": size,
        "bytes_per_image": size / images if images else None,
    }


def gc_caches(cache_root: str, older_than_s: float = 3600.0, orphans: bool = False) -> list[str]:
    """Remove garbage under ``cache_root``; return what was removed.

    * temporary and stale shard stores/files (``*.tmp-*``, ``*.stale-*``) older than ``older_than_s``
      (younger ones may belong to a precompute still running);
    * directories without a ``spec.json`` older than ``older_than_s`` (a cache whose creation never got going);
    * with ``orphans``: caches whose recorded image set (``hints.images``) no longer exists or now has another
      fingerprint (their features can never be paired again).
    Complete and partially filled caches of existing image sets are kept: partial shards are resumable work.
    """
    now = time.time()

    def old(p: str) -> bool:
        m = storage.mtime(p)
        return m is None or now - m >= older_than_s

    garbage: list[str] = []
    for name in storage.listdir(cache_root):
        cpath = storage.join(cache_root, name)
        if not storage.exists(storage.join(cpath, SPEC_NAME)):
            if (storage.TMP_TAG in name or _looks_like_fingerprint(name)) and old(cpath):
                garbage.append(cpath)
        elif orphans and _is_orphan(cpath):
            garbage.append(cpath)
        else:
            sdir = storage.join(cpath, SHARDS_DIR)
            leftovers = [
                storage.join(sdir, e) for e in storage.listdir(sdir) if storage.TMP_TAG in e or STALE_TAG in e
            ]
            garbage.extend(p for p in leftovers if old(p))
    for p in garbage:
        storage.remove(p)
    return garbage


def _looks_like_fingerprint(name: str) -> bool:
    return len(name) == 64 and all(ch in "0123456789abcdef" for ch in name)


def _is_orphan(cpath: str) -> bool:
    c = open_cache(cpath)
    images = c.hints.get("images")
    if not images:
        return False
    try:
        ims = open_imageset(images)
    except Exception:  # noqa: BLE001 - an image set that cannot be opened is gone
        return True
    return ims.fingerprint != c.spec.imageset_fingerprint


def remove_cache(path: str) -> None:
    """Delete a cache directory (must contain a spec.json)."""
    if not storage.exists(storage.join(path, SPEC_NAME)):
        raise CacheError(f"{path} is not a teacher cache (no {SPEC_NAME}); refusing to delete it")
    storage.remove(path)
