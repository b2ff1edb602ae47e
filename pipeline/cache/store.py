"""Teacher feature cache (DESIGN §4 "Teacher cache").

Layout of one cache (``<cache_root>/<fingerprint>/``)::

    spec.json                            {"fingerprint", "spec": CacheSpec, "layout": {...}, "hints": {...}}
    shards/shard-000000.zarr/            Zarr v3 store of image shard 0:
        features/                        array [tokens, D] (float16, sharding codec, zstd); each image's h*w
                                         rows contiguous, images in image-shard order
        scales/                          (int8 caches only) array [tokens] float32: row i of ``features`` holds
                                         round(x / scales[i]) with scales[i] = max|x_i| / 127 (symmetric absmax
                                         per token); readers return ``features * scales[:, None]`` as float32
        manifest.json                    written after the data: per image key, offset, h, w, height, width,
                                         pixel_sha256, checksum (sha256 of the rows as stored)
    shards/shard-000000.done             completion marker (written last)

The fingerprint is the sha256 of the canonical JSON of the :class:`CacheSpec` *without* the ``pretrained``
field: the weights are identified by ``weights_id`` (an open_clip tag or the sha256 of the weights file), so the
same weights loaded from any path give the same cache. ``pretrained`` is kept in ``spec.json`` as a hint only.

Commit protocol of one shard (one writer per attempt, attempt id ``U``): the features, then the manifest, are
written to ``shard-000000.zarr.tmp-U`` (array attributes and manifest carry ``attempt=U``); the store is renamed
into place (one atomic rename on a local disk, so store and manifest always travel together); finally the marker
(``attempt=U`` and the manifest's sha256) is written. A shard is complete only when marker, manifest and store
agree on the attempt and the manifest hash matches; anything else (a crash half-way, two writers racing) reads
as *incomplete* and is recomputed, never served as data. A writer that finds the shard already complete discards
its own copy; one that finds an unfinished store in its way (a crashed attempt) moves it aside.

Stored dtypes (the spec's ``dtype``, fingerprinted): ``float16`` (default), ``float32``, and ``int8`` (per-token
absmax scale, ~0.25x the bytes of float32 before zstd). The checksum of an int8 image covers its int8 rows and their
scales; readers dequantise transparently, so consumers always get floats.

Nothing here is a pickle: JSON and Zarr only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.common import storage
from pipeline.common.errors import UserError

FORMAT_VERSION = 1
SPEC_NAME = "spec.json"
SHARDS_DIR = "shards"
ARRAY_NAME = "features"
SCALES_NAME = "scales"  # int8 caches: one float32 scale per row
MANIFEST_NAME = "manifest.json"
STORED_DTYPES = ("float16", "float32", "int8")
QUANTIZED_DTYPES = ("int8",)
AUTOCAST_MODES = ("bf16", "fp16", "none")
CHUNK_BYTES = 1 << 20  # target uncompressed size of one inner Zarr chunk (the unit of reading)
CHUNKS_PER_SHARD = 64  # inner chunks per Zarr shard object (the unit of writing), ~64 MB uncompressed
ZSTD_LEVEL = 3
STALE_TAG = ".stale-"


class CacheError(UserError):
    """A teacher cache is missing, incomplete, inconsistent or cannot be written."""


class CachePairingError(CacheError):
    """A cache does not belong to the image set it is paired with."""


# --------------------------------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached teacher features depend on."""

    backbone: str
    pretrained: str | None  # hint only (not fingerprinted): where the weights came from
    weights_id: str  # "openclip:<model>:<tag>" | "sha256:<hex>" | "random:<name>:seed<k>"
    crop: int
    stride: int
    readout: str
    dtype: str
    imageset_fingerprint: str
    autocast: str = "bf16"  # precision of the teacher forward: "bf16" | "fp16" | "none" (float32)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise CacheError(f"cache dtype {self.dtype!r} not supported; use one of {STORED_DTYPES}")
        if self.autocast not in AUTOCAST_MODES:
            raise CacheError(f"cache autocast {self.autocast!r} not supported; use one of {AUTOCAST_MODES}")
        if self.crop <= 0 or self.stride <= 0:
            raise CacheError(
                f"cache crop and stride must be positive, got crop={self.crop} stride={self.stride}"
            )

    def identity(self) -> dict[str, Any]:
        """The fingerprinted fields (all but ``pretrained``)."""
        d = asdict(self)
        d.pop("pretrained")
        return d

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of :meth:`identity`."""
        return hashlib.sha256(storage.canonical_json(self.identity()).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        """Build from a ``spec.json`` "spec" object; unknown or missing fields are a CacheError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CacheError(f"cache spec has unknown fields {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise CacheError(f"cache spec is incomplete: {e}") from e


def cache_path_for(cache_root: str, fingerprint: str) -> str:
    """``<cache_root>/<fingerprint>`` (local path or URL)."""
    return storage.join(cache_root, fingerprint)


def feature_checksum(rows: np.ndarray, scales: np.ndarray | None = None) -> str:
    """sha256 hex of feature rows as stored (C order, little-endian), followed by their scales (int8 caches)."""
    h = hashlib.sha256()
    for a in (rows, scales):
        if a is None:
            continue
        arr = np.ascontiguousarray(a)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        h.update(arr.tobytes())
    return h.hexdigest()


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row absmax quantisation: (n, D) floats -> int8 (n, D) and float32 scales (n,).

    ``q = round(x / s)`` with ``s = max|x| / 127`` (an all-zero row gets s = 0 and q = 0), so
    ``|x - q * s| <= s / 2`` per element. Non-finite input is a CacheError (it has no int8 image).
    """
    x = np.asarray(rows, dtype=np.float32)  # (n, D)
    if not np.isfinite(x).all():
        raise CacheError("cannot store non-finite features (NaN/inf) in an int8 cache")
    scales = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)  # (n,)
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]  # (n, 1)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)  # (n, D)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(n, D) int8 and (n,) scales -> (n, D) float32."""
    return q.astype(np.float32) * scales.astype(np.float32)[:, None]


def chunk_rows_for(dim: int, dtype: str) -> int:
    """Rows per inner chunk so that one chunk is ~CHUNK_BYTES uncompressed."""
    return max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))


# --------------------------------------------------------------------------------------------- storage


def _zarr_store(path: str, read_only: bool) -> zarr.abc.store.Store:
    if storage.is_local(path):
        return zarr.storage.LocalStore(storage.local_path(path), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(path, read_only=read_only)


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class ShardEntry:
    """One image's place in a cache shard."""

    key: str
    offset: int  # first row in the shard's features array
    h: int  # patch-grid rows
    w: int  # patch-grid columns
    height: int  # image pixels
    width: int
    pixel_sha256: str
    checksum: str = ""  # sha256 of the rows as stored


def write_spec(cache_path: str, spec: CacheSpec, layout: dict[str, Any], hints: dict[str, Any]) -> None:
    """Write ``spec.json`` unless it exists; an existing one must describe the same spec (same fingerprint)."""
    fp = spec.fingerprint()
    p = storage.join(cache_path, SPEC_NAME)
    existing = storage.read_json(p, "cache spec", CacheError)
    if existing is not None:
        if existing.get("fingerprint") != fp or CacheSpec.from_dict(existing["spec"]).fingerprint() != fp:
            raise CacheError(
                f"{p} describes another cache (fingerprint {existing.get('fingerprint')}, not {fp})"
            )
        if existing.get("layout") != layout:
            raise CacheError(f"{p}: layout {existing.get('layout')} differs from the image set's {layout}")
        return
    doc = {"fingerprint": fp, "spec": asdict(spec), "layout": layout, "hints": hints}
    storage.write_bytes_atomic(p, json.dumps(doc, indent=2, sort_keys=True).encode())


class ShardWriter:
    """Writes one cache shard: rows in image order, then commits (store, manifest, marker).

    ``entries`` fixes the shard's images and their sizes up front, so the array is allocated once and written
    in whole Zarr shards (no read-modify-write).
    """

    def __init__(
        self,
        cache_path: str,
        shard: int,
        entries: Sequence[ShardEntry],
        dim: int,
        dtype: str,
        on_stage: Callable[[str], None] | None = None,
    ):
        self.cache_path = cache_path
        self.on_stage = on_stage or (lambda stage: None)  # test hook: called at "placed"
        self.shard = shard
        self.dim = dim
        self.dtype = dtype
        self.attempt = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.entries: list[ShardEntry] = []
        offset = 0
        for e in entries:
            self.entries.append(ShardEntry(e.key, offset, e.h, e.w, e.height, e.width, e.pixel_sha256))
            offset += e.h * e.w
        self.rows = offset
        stem = storage.join(cache_path, SHARDS_DIR, storage.shard_stem(shard))
        self.final_store = f"{stem}.zarr"
        self.tmp_store = f"{stem}.zarr{storage.TMP_TAG}{self.attempt}"
        self.chunk_rows = chunk_rows_for(dim, dtype)
        self.shard_rows = self.chunk_rows * CHUNKS_PER_SHARD
        store = _zarr_store(self.tmp_store, read_only=False)
        self._array = zarr.create_array(
            store,
            name=ARRAY_NAME,
            shape=(self.rows, dim),
            dtype=dtype,
            chunks=(self.chunk_rows, dim),
            shards=(self.shard_rows, dim),
            compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True),  # a damaged chunk fails to decode
            attributes={
                "attempt": self.attempt,
                "shard": shard,
                "rows": self.rows,
                "format_version": FORMAT_VERSION,
            },
            zarr_format=3,
            overwrite=True,
        )
        self._scales = None
        if dtype in QUANTIZED_DTYPES:
            self._scales = zarr.create_array(
                store,
                name=SCALES_NAME,
                shape=(self.rows,),
                dtype="float32",
                chunks=(self.chunk_rows,),
                shards=(self.shard_rows,),
                compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True),
                attributes={"attempt": self.attempt, "codec": "absmax-per-row"},
                zarr_format=3,
                overwrite=True,
            )
        self._next = 0  # index into entries of the next image
        self._buf: list[np.ndarray] = []
        self._sbuf: list[np.ndarray] = []  # int8: the scales of the rows in _buf
        self._buf_start = 0  # first row held in _buf
        self._buf_rows = 0

    def add(self, key: str, feats: np.ndarray) -> None:
        """Append one image's features ``(h, w, D)`` (any float dtype; stored as the cache dtype)."""
        if self._next >= len(self.entries):
            raise CacheError(f"shard {self.shard}: more images than announced (extra key {key!r})")
        e = self.entries[self._next]
        if key != e.key:
            raise CacheError(f"shard {self.shard}: expected key {e.key!r} next, got {key!r}")
        if feats.shape != (e.h, e.w, self.dim):
            raise CacheError(
                f"shard {self.shard} key {key!r}: features {feats.shape}, expected {(e.h, e.w, self.dim)}"
            )
        scales = None
        if self._scales is not None:
            rows, scales = quantize_int8(feats.reshape(e.h * e.w, self.dim))  # (h*w, D) int8, (h*w,)
            self._sbuf.append(scales)
        else:
            rows = np.ascontiguousarray(feats.reshape(e.h * e.w, self.dim).astype(self.dtype))  # (h*w, D)
        self.entries[self._next] = ShardEntry(**{**asdict(e), "checksum": feature_checksum(rows, scales)})
        self._next += 1
        self._buf.append(rows)
        self._buf_rows += rows.shape[0]
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every whole Zarr shard held in the buffer (everything when ``final``)."""
        end = self._buf_start + self._buf_rows
        cut = end if final else (end // self.shard_rows) * self.shard_rows
        if cut <= self._buf_start:
            return
        block = np.concatenate(self._buf, axis=0) if len(self._buf) > 1 else self._buf[0]  # (rows, D)
        n = cut - self._buf_start
        self._array[self._buf_start : cut] = block[:n]
        if self._scales is not None:
            sblock = np.concatenate(self._sbuf) if len(self._sbuf) > 1 else self._sbuf[0]  # (rows,)
            self._scales[self._buf_start : cut] = sblock[:n]
            self._sbuf = [sblock[n:]] if sblock.shape[0] > n else []
        rest = block[n:]
        self._buf = [rest] if rest.shape[0] else []
        self._buf_start = cut
        self._buf_rows = rest.shape[0]

    def abort(self) -> None:
        """Discard this attempt's temporary store."""
        storage.remove(self.tmp_store)

    def commit(self) -> str:
        """Make the shard complete. Returns "written", "already-complete" or "superseded"."""
        if self._next != len(self.entries):
            raise CacheError(f"shard {self.shard}: {len(self.entries) - self._next} images not written")
        self._flush(final=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "shard": self.shard,
            "attempt": self.attempt,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "entries": [asdict(e) for e in self.entries],
        }
        manifest_bytes = json.dumps(manifest, indent=1).encode()
        # the manifest travels inside the store, so store and manifest are placed together by one rename
        storage.write_bytes_atomic(storage.join(self.tmp_store, MANIFEST_NAME), manifest_bytes)
        reader = _ShardFiles(self.cache_path, self.shard)
        if reader.state()[0]:
            self.abort()
            return "already-complete"
        if not self._place_store(reader):
            self.abort()
            return "already-complete"
        self.on_stage("placed")
        if reader.store_attempt() != self.attempt:  # another writer replaced the store meanwhile
            return "superseded"
        marker = {
            "attempt": self.attempt,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "rows": self.rows,
            "images": len(self.entries),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_bytes_atomic(reader.marker, json.dumps(marker).encode())
        return "written"

    def _place_store(self, reader: _ShardFiles) -> bool:
        """Rename the temporary store into place; False when the shard became complete meanwhile."""
        for _ in range(5):
            if storage.rename_dir(self.tmp_store, self.final_store):
                return True
            if reader.state()[0]:
                return False
            # a store from a crashed or concurrent unfinished attempt: move it aside and retry
            stale = f"{self.final_store}{STALE_TAG}{self.attempt}"
            try:
                if storage.rename_dir(self.final_store, stale):
                    storage.remove(stale)
            except FileNotFoundError:
                pass
        raise CacheError(f"could not place {self.final_store}: other writers keep replacing it")


# --------------------------------------------------------------------------------------------- reading


class _ShardFiles:
    """Paths and completion state of one cache shard."""

    def __init__(self, cache_path: str, shard: int):
        stem = storage.join(cache_path, SHARDS_DIR, storage.shard_stem(shard))
        self.name = storage.shard_stem(shard)
        self.store = f"{stem}.zarr"
        self.manifest = storage.join(self.store, MANIFEST_NAME)
        self.marker = f"{stem}.done"

    def store_attempt(self) -> str | None:
        meta = storage.read_json(
            storage.join(self.store, ARRAY_NAME, "zarr.json"), "zarr metadata", CacheError
        )
        if meta is None:
            return None
        return (meta.get("attributes") or {}).get("attempt")

    def state(self) -> tuple[bool, str, dict[str, Any] | None]:
        """(complete, reason when not, manifest when complete)."""
        try:
            marker = storage.read_json(self.marker, "completion marker", CacheError)
            if marker is None:
                return False, "no completion marker", None
            raw = storage.read_bytes(self.manifest)
            if raw is None:
                return False, "manifest missing", None
            if hashlib.sha256(raw).hexdigest() != marker.get("manifest_sha256"):
                return False, "manifest does not match its completion marker", None
            manifest = json.loads(raw)
            if manifest.get("attempt") != marker.get("attempt"):
                return False, "manifest and marker from different attempts", None
            attempt = self.store_attempt()
            if attempt is None:
                return False, "store missing", None
            if attempt != marker.get("attempt"):
                return False, "store and marker from different attempts", None
            return True, "", manifest
        except (CacheError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return False, f"unreadable: {e}", None


class TeacherCache:
    """Read access to one teacher cache (see the module docstring for the layout)."""

    def __init__(self, path: str, doc: dict[str, Any]):
        self.path = path
        self.doc = doc
        self.spec = CacheSpec.from_dict(doc["spec"])
        self.fingerprint: str = doc["fingerprint"]
        layout = doc.get("layout") or {}
        self.num_shards: int = int(layout.get("num_shards", 0))
        self.num_images: int = int(layout.get("num_images", 0))
        self.dim: int = int(layout.get("dim", 0))
        self.patch_size: int = int(layout.get("patch_size", 0))
        self.hints: dict[str, Any] = doc.get("hints") or {}
        self._manifests: dict[int, dict[str, Any]] = {}
        self._arrays: dict[int, zarr.Array] = {}
        self._scale_arrays: dict[int, zarr.Array] = {}
        self._index: dict[str, tuple[int, int]] | None = None  # key -> (shard, entry index)

    # ---- completion
    def _files(self, i: int) -> _ShardFiles:
        if not 0 <= i < self.num_shards:
            raise CacheError(f"cache {self.path}: shard {i} out of range (0..{self.num_shards - 1})")
        return _ShardFiles(self.path, i)

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
            index: dict[str, tuple[int, int]] = {}
            for i in range(self.num_shards):
                if not self.shard_complete(i):
                    continue
                for j, e in enumerate(self.manifest(i)["entries"]):
                    index[e["key"]] = (i, j)
            self._index = index
        return self._index

    def keys(self) -> list[str]:
        """All keys of complete shards."""
        return list(self._key_index())

    # ---- features
    def _array(self, i: int) -> zarr.Array:
        if i not in self._arrays:
            files = self._files(i)
            arr = zarr.open_array(_zarr_store(files.store, read_only=True), path=ARRAY_NAME, mode="r")
            if arr.attrs.get("attempt") != self.manifest(i)["attempt"]:
                raise CacheError(
                    f"cache {self.path}: {files.name} store was replaced; run `spar cache verify --repair`"
                )
            self._arrays[i] = arr
        return self._arrays[i]

    def _scale_array(self, i: int) -> zarr.Array:
        if i not in self._scale_arrays:
            files = self._files(i)
            self._scale_arrays[i] = zarr.open_array(
                _zarr_store(files.store, read_only=True), path=SCALES_NAME, mode="r"
            )
        return self._scale_arrays[i]

    def _rows(self, i: int, e: dict[str, Any], verify: bool) -> np.ndarray:
        """Image ``e``'s rows (h*w, D): one contiguous row range; CacheError naming shard and key if damaged.
        int8 caches are dequantised to float32."""
        n = e["h"] * e["w"]
        scales = None
        try:
            rows = self._array(i)[e["offset"] : e["offset"] + n]  # (h*w, D)
            if self.spec.dtype in QUANTIZED_DTYPES:
                scales = self._scale_array(i)[e["offset"] : e["offset"] + n]  # (h*w,)
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
    def check_pairing(self, imageset: Any, require_complete: bool = True) -> None:
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
            if not self.shard_complete(i):
                if require_complete:
                    raise CachePairingError(
                        f"cache {self.path}: {storage.shard_stem(i)} is not complete; run `spar precompute` to finish it"
                    )
                continue
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


# --------------------------------------------------------------------------------------------- verify / ls / gc


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache: ``where`` is a shard name or "spec.json"."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def verify_cache(path: str, check_data: bool = True) -> tuple[TeacherCache, list[Problem]]:
    """Check a cache: spec.json against its directory name, each shard's marker/manifest/store, and (with
    ``check_data``) every image's rows against its checksum. Returns the cache and the problems found."""
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
        p = _verify_shard(cache, i, check_data)
        if p:
            problems.append(Problem(storage.shard_stem(i), p))
    return cache, problems


def _verify_shard(cache: TeacherCache, i: int, check_data: bool) -> str:
    files = _ShardFiles(cache.path, i)
    if not storage.exists(files.marker):
        if not storage.exists(files.store):
            return "missing (never computed or not finished)"
        return "incomplete (no completion marker)"
    ok, reason, manifest = files.state()
    if not ok or manifest is None:
        return reason
    try:
        arr = zarr.open_array(_zarr_store(files.store, read_only=True), path=ARRAY_NAME, mode="r")
    except Exception as e:  # noqa: BLE001 - any failure to open is a finding, not a crash
        return f"store unreadable: {type(e).__name__}: {e}"
    if tuple(arr.shape) != (manifest["rows"], manifest["dim"]):
        return f"store shape {tuple(arr.shape)} != manifest ({manifest['rows']}, {manifest['dim']})"
    if str(arr.dtype) != manifest["dtype"]:
        return f"store dtype {arr.dtype} != manifest {manifest['dtype']}"
    sarr = None
    if manifest["dtype"] in QUANTIZED_DTYPES:
        try:
            sarr = zarr.open_array(_zarr_store(files.store, read_only=True), path=SCALES_NAME, mode="r")
        except Exception as e:  # noqa: BLE001 - a missing or unreadable scales array is a finding
            return f"scales unreadable: {type(e).__name__}: {e}"
        if tuple(sarr.shape) != (manifest["rows"],):
            return f"scales shape {tuple(sarr.shape)} != ({manifest['rows']},)"
    expected = 0
    for e in manifest["entries"]:
        if e["offset"] != expected:
            return f"manifest rows not contiguous at key {e['key']!r}"
        expected += e["h"] * e["w"]
    if expected != manifest["rows"]:
        return f"manifest covers {expected} rows, store has {manifest['rows']}"
    if not check_data:
        return ""
    try:
        data = arr[:]  # (rows, D)
        sdata = sarr[:] if sarr is not None else None  # (rows,)
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
        files = _ShardFiles(path, i)
        storage.remove(files.marker)
        storage.remove(files.store)


def list_caches(cache_root: str) -> list[str]:
    """Paths of the caches (directories with a spec.json) directly under ``cache_root``."""
    out = []
    for name in storage.listdir(cache_root):
        p = storage.join(cache_root, name)
        if storage.exists(storage.join(p, SPEC_NAME)):
            out.append(p)
    return out


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
    removed: list[str] = []
    now = time.time()

    def old(p: str) -> bool:
        m = storage.mtime(p)
        return m is None or now - m >= older_than_s

    for name in storage.listdir(cache_root):
        cpath = storage.join(cache_root, name)
        if not storage.exists(storage.join(cpath, SPEC_NAME)):
            if (storage.TMP_TAG in name or _looks_like_fingerprint(name)) and old(cpath):
                storage.remove(cpath)
                removed.append(cpath)
            continue
        if orphans and _is_orphan(cpath):
            storage.remove(cpath)
            removed.append(cpath)
            continue
        sdir = storage.join(cpath, SHARDS_DIR)
        for entry in storage.listdir(sdir):
            if (storage.TMP_TAG in entry or STALE_TAG in entry) and old(storage.join(sdir, entry)):
                storage.remove(storage.join(sdir, entry))
                removed.append(storage.join(sdir, entry))
    return removed


def _looks_like_fingerprint(name: str) -> bool:
    return len(name) == 64 and all(ch in "0123456789abcdef" for ch in name)


def _is_orphan(cpath: str) -> bool:
    c = open_cache(cpath)
    images = c.hints.get("images")
    if not images:
        return False
    try:
        from pipeline.data.imageset import open_imageset

        ims = open_imageset(images)
    except Exception:  # noqa: BLE001 - an image set that cannot be opened is gone
        return True
    return ims.fingerprint != c.spec.imageset_fingerprint


def remove_cache(path: str) -> None:
    """Delete a cache directory (must contain a spec.json)."""
    if not storage.exists(storage.join(path, SPEC_NAME)):
        raise CacheError(f"{path} is not a teacher cache (no {SPEC_NAME}); refusing to delete it")
    storage.remove(path)


# --------------------------------------------------------------------------------------------- CLI


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _cmd_ls(args: argparse.Namespace) -> int:
    paths = list_caches(args.cache_root)
    if not paths:
        print(f"no caches under {args.cache_root}")
        return 0
    for p in paths:
        s = summarize(p)
        print(
            f"{s['fingerprint'][:16]}  {s['backbone']} ({s['weights_id']}) crop {s['crop']} stride {s['stride']} "
            f"{s['dtype']}  shards {s['shards_done']}/{s['shards_total']}  images {s['images_done']}/{s['images_total']}"
            f"  {_human(s['bytes'])}  {_human(s['bytes_per_image'])}/image  {s['path']}"
        )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    cache, problems = verify_cache(args.path)
    for p in problems:
        print(f"BAD {p}")
    if not problems:
        print(f"ok: {cache.path}: {cache.num_shards} shards verified")
        return 0
    if not args.repair:
        print(f"{len(problems)} problem(s); rerun with --repair to recompute the bad shards", file=sys.stderr)
        return 1
    if any(p.where == SPEC_NAME for p in problems):
        raise CacheError(
            f"{cache.path}: spec.json does not match the cache; cannot repair (remove it with `spar cache rm`)"
        )
    from pipeline.cache.precompute import repair_cache  # late import: precompute depends on this module

    bad = [int(p.where.split("-")[1]) for p in problems]
    repair_cache(cache.path, bad, images=args.images, workers=args.workers)
    _, problems = verify_cache(args.path)
    for p in problems:
        print(f"STILL BAD {p}")
    if problems:
        return 1
    print(f"repaired: {cache.path}: {len(bad)} shard(s) recomputed, all {cache.num_shards} verify")
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    remove_cache(args.path)
    print(f"removed {args.path}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    removed = gc_caches(args.cache_root, older_than_s=args.older_than, orphans=args.orphans)
    for r in removed:
        print(f"removed {r}")
    print(f"gc: {len(removed)} item(s) removed under {args.cache_root}")
    return 0


def default_cache_root() -> str:
    """``$SPAR_CACHE_ROOT`` or ``./work/cache``."""
    return os.environ.get("SPAR_CACHE_ROOT", os.path.join("work", "cache"))


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``spar cache ls|verify|rm|gc``."""
    p = subparsers.add_parser("cache", help="inspect and maintain teacher caches")
    sub = p.add_subparsers(dest="cache_cmd", required=True)
    ls = sub.add_parser("ls", help="list caches: spec, shards done/total, size, bytes per image")
    ls.add_argument("--cache-root", default=default_cache_root())
    ls.set_defaults(func=_cmd_ls)
    v = sub.add_parser("verify", help="recompute checksums and report bad shards")
    v.add_argument("path", help="cache directory <cache_root>/<fingerprint> (local or s3://)")
    v.add_argument("--repair", action="store_true", help="recompute bad shards")
    v.add_argument("--images", default=None, help="image set root (default: the one recorded in spec.json)")
    v.add_argument("--workers", type=int, default=None)
    v.set_defaults(func=_cmd_verify)
    rm = sub.add_parser("rm", help="delete a cache")
    rm.add_argument("path")
    rm.set_defaults(func=_cmd_rm)
    gc = sub.add_parser(
        "gc", help="remove leftovers of interrupted runs (and, with --orphans, orphaned caches)"
    )
    gc.add_argument("--cache-root", default=default_cache_root())
    gc.add_argument(
        "--older-than", type=float, default=3600.0, help="only remove temp items older than this (s)"
    )
    gc.add_argument(
        "--orphans", action="store_true", help="also remove caches whose image set is gone or changed"
    )
    gc.set_defaults(func=_cmd_gc)
