"""Reading a teacher cache: :func:`open_cache` and :class:`TeacherCache` (completion, manifests, one image's
features by key, a shard's images in order, and the check that a cache belongs to an image set).

The training stream and the evaluation read teacher targets through this module; every read is checked against the
manifest's checksum by default, so a damaged store is an error naming shard and key, never a wrong target.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from pipeline.cache.layout import ShardFiles, open_stored_array
from pipeline.cache.spec import (
    ARRAY_NAME,
    QUANTIZED_DTYPES,
    SCALES_NAME,
    SPEC_NAME,
    CacheError,
    CachePairingError,
    CacheSpec,
    ShardEntry,
    dequantize_int8,
    feature_checksum,
)
from pipeline.common import storage

if TYPE_CHECKING:  # an annotation only: importing the image-set reader pulls in pyarrow
    from pipeline.data.imageset import ImageSet


class TeacherCache:
    """Read access to one teacher cache (see :mod:`pipeline.cache.spec` for the layout)."""

    def __init__(self, path: str, doc: dict[str, Any]):
        self.path = path
        self.spec = CacheSpec.from_dict(doc["spec"])
        self.fingerprint: str = doc["fingerprint"]
        layout = doc.get("layout") or {}
        self.num_shards: int = int(layout.get("num_shards", 0))
        self.num_images: int = int(layout.get("num_images", 0))
        self.dim: int = int(layout.get("dim", 0))
        self.patch_size: int = int(layout.get("patch_size", 0))
        self.hints: dict[str, Any] = doc.get("hints") or {}
        self._manifests: dict[int, dict[str, Any]] = {}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}  # (shard, array name) -> the opened array
        self._index: dict[str, tuple[int, int]] | None = None  # key -> (shard, entry index)

    # ---- completion
    def _files(self, i: int) -> ShardFiles:
        if not 0 <= i < self.num_shards:
            raise CacheError(f"cache {self.path}: shard {i} out of range (0..{self.num_shards - 1})")
        return ShardFiles(self.path, i)

    def shard_complete(self, i: int) -> bool:
        """True when shard ``i``'s marker, manifest and store agree."""
        ok, _, manifest = self._files(i).state()
        if ok and manifest is not None:
            self._manifests[i] = manifest
        return ok

    def incomplete_shards(self) -> list[int]:
        """Indices of shards that are not complete."""
        return [i for i in range(self.num_shards) if not self.shard_complete(i)]

    def is_complete(self) -> bool:
        """True when every shard is complete."""
        return not self.incomplete_shards()

    # ---- manifests
    def manifest(self, i: int) -> dict[str, Any]:
        """Shard ``i``'s manifest; CacheError when the shard is not complete."""
        if i not in self._manifests:
            ok, reason, manifest = self._files(i).state()
            if not ok or manifest is None:
                raise CacheError(f"cache {self.path}: {storage.shard_stem(i)} is not complete ({reason})")
            self._manifests[i] = manifest
        return self._manifests[i]

    def shard_entries(self, i: int) -> list[ShardEntry]:
        """Shard ``i``'s images in manifest (= image-shard) order."""
        return [ShardEntry(**e) for e in self.manifest(i)["entries"]]

    def shard_keys(self, i: int) -> list[str]:
        """Keys of shard ``i`` in manifest order."""
        return [e["key"] for e in self.manifest(i)["entries"]]

    def _key_index(self) -> dict[str, tuple[int, int]]:
        if self._index is None:
            self._index = {
                e["key"]: (i, j)
                for i in range(self.num_shards)
                if self.shard_complete(i)
                for j, e in enumerate(self.manifest(i)["entries"])
            }
        return self._index

    def keys(self) -> list[str]:
        """All keys of complete shards."""
        return list(self._key_index())

    # ---- features
    def _array(self, i: int, name: str = ARRAY_NAME) -> zarr.Array:
        """Array ``name`` of shard ``i``'s store, opened once; the features must be the manifest's attempt."""
        if (i, name) not in self._arrays:
            files = self._files(i)
            arr = open_stored_array(files.store, name)
            if name == ARRAY_NAME and arr.attrs.get("attempt") != self.manifest(i)["attempt"]:
                raise CacheError(
                    f"cache {self.path}: {files.name} store was replaced; run `spar cache verify --repair`"
                )
            self._arrays[i, name] = arr
        return self._arrays[i, name]

    def _rows(self, i: int, e: dict[str, Any], verify: bool) -> np.ndarray:
        """Image ``e``'s rows (h*w, D): one contiguous row range; CacheError naming shard and key if damaged.
        int8 caches are dequantised to float32."""
        n = e["h"] * e["w"]
        scales = None
        try:
            rows = self._array(i)[e["offset"] : e["offset"] + n]  # (h*w, D)
            if self.spec.dtype in QUANTIZED_DTYPES:
                scales = self._array(i, SCALES_NAME)[e["offset"] : e["offset"] + n]  # (h*w,)
        except CacheError:
            raise
        except Exception as err:  # noqa: BLE001 - zarr/zstd/crc errors of a damaged or truncated chunk
            raise CacheError(
                f"cache {self.path}: {storage.shard_stem(i)} key {e['key']!r}: store truncated or corrupt "
                f"({type(err).__name__}: {err}); run `spar cache verify --repair`"
            ) from err
        if verify and feature_checksum(rows, scales) != e["checksum"]:
            raise CacheError(
                f"cache {self.path}: {storage.shard_stem(i)} key {e['key']!r}: features fail their checksum; "
                "run `spar cache verify --repair`"
            )
        return rows if scales is None else dequantize_int8(rows, scales)

    def features(self, key: str, verify: bool = True) -> np.ndarray:
        """One image's teacher features ``(h, w, D)`` in the stored dtype (float32 for int8 caches).

        ``verify`` (default) checks the rows against the manifest's sha256, so a damaged store is an error,
        never a wrong target; it costs one sha256 over the rows (~1 GB/s)."""
        loc = self._key_index().get(key)
        if loc is None:
            raise CacheError(f"cache {self.path}: no key {key!r} in any complete shard")
        i, j = loc
        e = self.manifest(i)["entries"][j]
        return self._rows(i, e, verify).reshape(e["h"], e["w"], -1)

    def iter_shard(self, i: int, verify: bool = True) -> Iterator[tuple[str, np.ndarray]]:
        """(key, features (h, w, D)) of shard ``i`` in manifest order (checksums verified by default)."""
        for e in self.manifest(i)["entries"]:
            yield e["key"], self._rows(i, e, verify).reshape(e["h"], e["w"], -1)

    # ---- pairing
    def check_pairing(self, imageset: ImageSet, require_complete: bool = True) -> None:
        """Refuse (CachePairingError) unless this cache was computed from exactly ``imageset``'s pixels.

        Checks the image-set fingerprint, the shard count, and per image (shard by shard, in order) the key,
        pixel size and pixel sha256. ``require_complete`` also refuses a cache with missing shards.
        """
        if imageset.fingerprint != self.spec.imageset_fingerprint:
            raise CachePairingError(
                f"cache {self.path} was computed for image set {self.spec.imageset_fingerprint[:16]}…, "
                f"but the paired image set has fingerprint {imageset.fingerprint[:16]}…"
            )
        if imageset.num_shards != self.num_shards:
            raise CachePairingError(
                f"cache {self.path} has {self.num_shards} shards, the image set {imageset.num_shards}"
            )
        for i in range(self.num_shards):
            if self.shard_complete(i):
                self._check_shard_pairing(imageset, i)
            elif require_complete:
                raise CachePairingError(
                    f"cache {self.path}: {storage.shard_stem(i)} is not complete; run `spar precompute` to finish it"
                )

    def _check_shard_pairing(self, imageset: ImageSet, i: int) -> None:
        """Complete shard ``i`` holds exactly image shard ``i``'s images (keys, sizes, pixels, in order)."""
        entries = self.manifest(i)["entries"]
        records = imageset.shard_records(i)
        for e, r in zip(entries, records, strict=False):
            if e["key"] != r.key:
                raise CachePairingError(
                    f"cache {self.path} {storage.shard_stem(i)}: key {e['key']!r}, image set {r.key!r}"
                )
            if (e["height"], e["width"]) != (r.height, r.width):
                raise CachePairingError(
                    f"cache {self.path}: image {r.key!r} is {e['height']}x{e['width']} in the cache, "
                    f"{r.height}x{r.width} in the image set"
                )
            if e["pixel_sha256"] != r.pixel_sha256:
                raise CachePairingError(
                    f"cache {self.path}: image {r.key!r} has different pixels in the image set"
                )
        if len(entries) != len(records):
            raise CachePairingError(
                f"cache {self.path} {storage.shard_stem(i)}: {len(entries)} images in the cache, {len(records)} in the image set"
            )


def open_cache(path: str) -> TeacherCache:
    """Open the teacher cache at ``path`` (``<cache_root>/<fingerprint>``, local or fsspec URL)."""
    path = path.rstrip("/") if not storage.is_local(path) else os.path.abspath(storage.local_path(path))
    p = storage.join(path, SPEC_NAME)
    doc = storage.read_json(p, "cache spec", CacheError)
    if doc is None:
        raise CacheError(f"{path} is not a teacher cache (no {SPEC_NAME})")
    for k in ("fingerprint", "spec", "layout"):
        if k not in doc:
            raise CacheError(f"{p} lacks {k!r}")
    return TeacherCache(path, doc)
