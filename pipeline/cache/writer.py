"""Writing a teacher cache: ``spec.json`` (:func:`write_spec`) and one shard at a time (:class:`ShardWriter`),
following the commit protocol of :mod:`.spec` (temporary store, manifest, one rename, completion marker last).

The precompute task (:mod:`.precompute`) feeds a writer one image's features at a time, in image-shard order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.cache.layout import ShardFiles, zarr_store
from pipeline.cache.spec import (
    ARRAY_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    QUANTIZED_DTYPES,
    SCALES_NAME,
    SHARDS_DIR,
    SPEC_NAME,
    STALE_TAG,
    CacheError,
    CacheSpec,
    ShardEntry,
    feature_checksum,
    quantize_int8,
)
from pipeline.common import storage

CHUNK_BYTES = 1 << 20  # target uncompressed size of one inner Zarr chunk (the unit of reading)
CHUNKS_PER_SHARD = 64  # inner chunks per Zarr shard object (the unit of writing), ~64 MB uncompressed
ZSTD_LEVEL = 3
WINNER_SEAL_WAIT_S = 30.0  # a superseded writer waits this long for its replacer to seal


def chunk_rows_for(dim: int, dtype: str) -> int:
    """Rows per inner chunk so that one chunk is ~CHUNK_BYTES uncompressed."""
    return max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))


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

    def __init__(self, cache_path: str, shard: int, entries: Sequence[ShardEntry], dim: int, dtype: str):
        self.cache_path = cache_path
        self.shard = shard
        self.dim = dim
        self.dtype = dtype
        self.attempt = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        offsets = [0, *itertools.accumulate(e.h * e.w for e in entries)]  # each image's h*w rows, in order
        self.entries = [replace(e, offset=o, checksum="") for e, o in zip(entries, offsets, strict=False)]
        self.rows = offsets[-1]
        stem = storage.join(cache_path, SHARDS_DIR, storage.shard_stem(shard))
        self.final_store = f"{stem}.zarr"
        self.tmp_store = f"{stem}.zarr{storage.TMP_TAG}{self.attempt}"
        self.chunk_rows = chunk_rows_for(dim, dtype)
        self.shard_rows = self.chunk_rows * CHUNKS_PER_SHARD
        self._array, self._scales = self._create_arrays()
        self._next = 0  # index into entries of the next image
        # per array (features, then int8 scales): what is not written yet, (n_i, D) and (n_i,) each
        self._bufs: list[list[np.ndarray]] = [[], []] if self._scales is not None else [[]]
        self._buf_start = 0  # first row held in _bufs
        self._buf_rows = 0

    def _create_arrays(self) -> tuple[zarr.Array, zarr.Array | None]:
        """The temporary store's ``features`` array [rows, D] (and ``scales`` [rows] for int8 caches)."""
        store = zarr_store(self.tmp_store, read_only=False)

        def create(name: str, cols: tuple[int, ...], dtype: str, attributes: dict[str, Any]) -> zarr.Array:
            return zarr.create_array(
                store,
                name=name,
                shape=(self.rows, *cols),
                dtype=dtype,
                chunks=(self.chunk_rows, *cols),
                shards=(self.shard_rows, *cols),
                compressors=ZstdCodec(level=ZSTD_LEVEL, checksum=True),  # a damaged chunk fails to decode
                attributes=attributes,
                zarr_format=3,
                overwrite=True,
            )

        attrs = {
            "attempt": self.attempt,
            "shard": self.shard,
            "rows": self.rows,
            "format_version": FORMAT_VERSION,
        }
        array = create(ARRAY_NAME, (self.dim,), self.dtype, attrs)
        if self.dtype not in QUANTIZED_DTYPES:
            return array, None
        return array, create(SCALES_NAME, (), "float32", {"attempt": self.attempt, "codec": "absmax-per-row"})

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
        else:
            rows = np.ascontiguousarray(feats.reshape(e.h * e.w, self.dim).astype(self.dtype))  # (h*w, D)
        self.entries[self._next] = replace(e, checksum=feature_checksum(rows, scales))
        self._next += 1
        for buf, a in zip(self._bufs, (rows, scales), strict=False):
            buf.append(a)
        self._buf_rows += rows.shape[0]
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write every whole Zarr shard held in the buffer (everything when ``final``)."""
        end = self._buf_start + self._buf_rows
        cut = end if final else (end // self.shard_rows) * self.shard_rows
        if cut <= self._buf_start:
            return
        n = cut - self._buf_start
        for arr, buf in zip((self._array, self._scales), self._bufs, strict=False):
            block = np.concatenate(buf) if len(buf) > 1 else buf[0]  # (rows, D) features, (rows,) scales
            arr[self._buf_start : cut] = block[:n]
            buf[:] = [block[n:]] if block.shape[0] > n else []
        self._buf_start = cut
        self._buf_rows -= n

    def abort(self) -> None:
        """Discard this attempt's temporary store."""
        storage.remove(self.tmp_store)

    def commit(self) -> str:
        """Make the shard complete. Returns "written", "already-complete" or "superseded" (a concurrent writer's
        store replaced ours; this returns once that writer has sealed the shard, or after WINNER_SEAL_WAIT_S)."""
        if self._next != len(self.entries):
            raise CacheError(f"shard {self.shard}: {len(self.entries) - self._next} images not written")
        self._flush(final=True)
        manifest_bytes = self._write_manifest()
        files = ShardFiles(self.cache_path, self.shard)
        if files.state()[0] or not self._place_store(files):
            self.abort()
            return "already-complete"
        return self._seal(files, manifest_bytes)

    def _write_manifest(self) -> bytes:
        """Write the manifest into the temporary store (so one rename places store and manifest together)."""
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
        storage.write_bytes_atomic(storage.join(self.tmp_store, MANIFEST_NAME), manifest_bytes)
        return manifest_bytes

    def _place_store(self, files: ShardFiles) -> bool:
        """Rename the temporary store into place; False when the shard became complete meanwhile."""
        for _ in range(5):
            if storage.rename_dir(self.tmp_store, self.final_store):
                return True
            if files.state()[0]:
                return False
            # a store from a crashed or concurrent unfinished attempt: move it aside and retry
            stale = f"{self.final_store}{STALE_TAG}{self.attempt}"
            try:
                if storage.rename_dir(self.final_store, stale):
                    storage.remove(stale)
            except FileNotFoundError:
                pass
        raise CacheError(f"could not place {self.final_store}: other writers keep replacing it")

    def _seal(self, files: ShardFiles, manifest_bytes: bytes) -> str:
        """The store is placed: write the completion marker, unless another writer replaced the store meanwhile."""
        if files.store_attempt() != self.attempt:
            self._await_winner(files)
            return "superseded"
        marker = {
            "attempt": self.attempt,
            "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
            "rows": self.rows,
            "images": len(self.entries),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        storage.write_bytes_atomic(files.marker, json.dumps(marker).encode())
        return "written"

    def _await_winner(self, files: ShardFiles) -> None:
        """Another writer replaced our placed store and is between placing its own and writing its marker: wait
        (bounded) until the shard is complete, so a caller that checks the shard right after this commit finds it
        complete. A winner that died before its marker leaves the shard incomplete; the next run rewrites it."""
        deadline = time.monotonic() + WINNER_SEAL_WAIT_S
        while not files.state()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
