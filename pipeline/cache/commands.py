"""What ``spar precompute`` and ``spar cache ls|verify|rm|gc`` do and print (their arguments: :mod:`.cli`).

This is the one layer that knows both maintenance and precompute: ``spar cache verify --repair`` finds bad shards
with :func:`~pipeline.cache.maintenance.verify_cache` and recomputes them with
:func:`~pipeline.cache.precompute.repair_cache`.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.cache.config import PrecomputeConfig
from pipeline.cache.maintenance import (
    gc_caches,
    list_caches,
    remove_cache,
    shards_with_problems,
    summarize,
    verify_cache,
)
from pipeline.cache.precompute import precompute, repair_cache
from pipeline.cache.spec import SPEC_NAME, CacheError
from pipeline.common.config import config_from_cli


def cmd_precompute(args: argparse.Namespace) -> int:
    """``spar precompute``: fill the cache; print its path."""
    print(precompute(config_from_cli(PrecomputeConfig, args, "precompute")))
    return 0


def _human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def cmd_ls(args: argparse.Namespace) -> int:
    """``spar cache ls``: one line per cache under the root."""
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


def cmd_verify(args: argparse.Namespace) -> int:
    """``spar cache verify [--repair]``: report bad shards; with ``--repair`` recompute them and verify again."""
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
    bad = shards_with_problems(problems)
    repair_cache(cache.path, bad, images=args.images, workers=args.workers)
    _, problems = verify_cache(args.path)
    for p in problems:
        print(f"STILL BAD {p}")
    if problems:
        return 1
    print(f"repaired: {cache.path}: {len(bad)} shard(s) recomputed, all {cache.num_shards} verify")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """``spar cache rm``."""
    remove_cache(args.path)
    print(f"removed {args.path}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """``spar cache gc``."""
    removed = gc_caches(args.cache_root, older_than_s=args.older_than, orphans=args.orphans)
    for r in removed:
        print(f"removed {r}")
    print(f"gc: {len(removed)} item(s) removed under {args.cache_root}")
    return 0
