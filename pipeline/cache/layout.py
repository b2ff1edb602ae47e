"""Where one cache shard's files live and whether they form a complete shard (the read side of the commit
protocol described in :mod:`.spec`), and the Zarr store of a local path or fsspec URL. Used by the writer (is the
shard already complete?), the reader and verify."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import zarr

from pipeline.cache.spec import ARRAY_NAME, MANIFEST_NAME, SHARDS_DIR, CacheError
from pipeline.common import storage


def zarr_store(path: str, read_only: bool) -> zarr.abc.store.Store:
    """The Zarr store at ``path`` (a local directory or an fsspec URL)."""
    if storage.is_local(path):
        return zarr.storage.LocalStore(storage.local_path(path), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(path, read_only=read_only)


def open_stored_array(store_path: str, name: str) -> zarr.Array:
    """Array ``name`` of the shard store at ``store_path``, read-only."""
    return zarr.open_array(zarr_store(store_path, read_only=True), path=name, mode="r")


class ShardFiles:
    """Paths and completion state of one cache shard."""

    def __init__(self, cache_path: str, shard: int):
        stem = storage.join(cache_path, SHARDS_DIR, storage.shard_stem(shard))
        self.name = storage.shard_stem(shard)
        self.store = f"{stem}.zarr"
        self.manifest = storage.join(self.store, MANIFEST_NAME)
        self.marker = f"{stem}.done"

    def store_attempt(self) -> str | None:
        """The attempt id recorded in the placed store's features array (None when there is no store)."""
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
        except (CacheError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return False, f"unreadable: {e}", None
        if attempt is None:
            return False, "store missing", None
        if attempt != marker.get("attempt"):
            return False, "store and marker from different attempts", None
        return True, "", manifest
