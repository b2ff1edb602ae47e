"""Transitional re-export of the old ``pipeline.cache.store`` names for modules outside ``pipeline/cache`` that still
import them (train, data.stream, eval, workflow, bench). The cache now lives in :mod:`.spec`, :mod:`.layout`,
:mod:`.writer`, :mod:`.reader` and :mod:`.maintenance`; delete this module once those imports are rewritten."""

from pipeline.cache.maintenance import (
    Problem,
    gc_caches,
    invalidate_shards,
    list_caches,
    remove_cache,
    summarize,
    verify_cache,
)
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import CacheError, CachePairingError, CacheSpec, ShardEntry, cache_path_for
from pipeline.cache.writer import ShardWriter, write_spec

__all__ = [
    "CacheError",
    "CachePairingError",
    "CacheSpec",
    "Problem",
    "ShardEntry",
    "ShardWriter",
    "TeacherCache",
    "cache_path_for",
    "gc_caches",
    "invalidate_shards",
    "list_caches",
    "open_cache",
    "remove_cache",
    "summarize",
    "verify_cache",
    "write_spec",
]
