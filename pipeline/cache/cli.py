"""``spar precompute`` and ``spar cache ls|verify|rm|gc``: argument definitions only. Each parser names its handler
in :mod:`.commands`, which the ``spar`` hub imports only when the command runs (so ``--help`` imports no Zarr, Ray
or torch). Flags of ``spar precompute`` are named after :class:`~pipeline.cache.config.PrecomputeConfig` fields
(``dest=<field>``, default None) and merged by ``pipeline.common.config.config_from_cli``."""

from __future__ import annotations

import argparse

from pipeline.cache.config import default_cache_root

COMMANDS = "pipeline.cache.commands"


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar precompute`` and ``spar cache``."""
    add_precompute_cli(sub)
    add_cache_cli(sub)


def add_precompute_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar precompute``."""
    p = sub.add_parser("precompute", help="compute the sliding-window teacher's features into a cache")
    p.add_argument("--images", dest="images", help="image-set root (local or s3://)")
    p.add_argument("--teacher", dest="teacher", help="backbone name, e.g. maskclip-vit-b16, tiny-clip-64")
    p.add_argument("--pretrained", dest="pretrained", help="open_clip pretrained tag or local weights file")
    p.add_argument(
        "--crop", dest="crop", type=int, help="window size in pixels (default: the teacher's native size)"
    )
    p.add_argument("--stride", dest="stride", type=int, help="window stride in pixels")
    p.add_argument("--cache-root", dest="cache_root", help="directory or s3:// prefix holding caches")
    p.add_argument("--dtype", dest="dtype", choices=["float16", "float32", "int8"])
    p.add_argument("--workers", dest="workers", type=int, help="max shards computed at once")
    p.add_argument(
        "--runner", dest="runner", choices=("auto", "ray", "in-process"),
        help="where the shards are computed (auto: in this process for one worker without a cluster address, "
             "else one Ray task per shard)",
    )  # fmt: skip
    p.add_argument("--window-batch", dest="window_batch", type=int, help="windows per teacher forward")
    p.add_argument(
        "--workdir",
        dest="workdir",
        help="record the run (cost of the cache) in this MLflow store (default $SPAR_WORKDIR)",
    )
    p.add_argument("--config", help="TOML recipe ([precompute] section)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.set_defaults(
        handler=f"{COMMANDS}:cmd_precompute",
        stage_config=("pipeline.cache.config:PrecomputeConfig", "precompute"),
    )


def add_cache_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar cache ls|verify|rm|gc``."""
    p = sub.add_parser("cache", help="inspect and maintain teacher caches")
    cache_sub = p.add_subparsers(dest="cache_cmd", required=True)
    ls = cache_sub.add_parser("ls", help="list caches: spec, shards done/total, size, bytes per image")
    ls.add_argument("--cache-root", default=default_cache_root())
    ls.set_defaults(handler=f"{COMMANDS}:cmd_ls")
    v = cache_sub.add_parser("verify", help="recompute checksums and report bad shards")
    v.add_argument("path", help="cache directory <cache_root>/<fingerprint> (local or s3://)")
    v.add_argument("--repair", action="store_true", help="recompute bad shards")
    v.add_argument("--images", default=None, help="image set root (default: the one recorded in spec.json)")
    v.add_argument("--workers", type=int, default=None)
    v.set_defaults(handler=f"{COMMANDS}:cmd_verify")
    rm = cache_sub.add_parser("rm", help="delete a cache")
    rm.add_argument("path")
    rm.set_defaults(handler=f"{COMMANDS}:cmd_rm")
    gc = cache_sub.add_parser(
        "gc", help="remove leftovers of interrupted runs (and, with --orphans, orphaned caches)"
    )
    gc.add_argument("--cache-root", default=default_cache_root())
    gc.add_argument(
        "--older-than", type=float, default=3600.0, help="only remove temp items older than this (s)"
    )
    gc.add_argument(
        "--orphans", action="store_true", help="also remove caches whose image set is gone or changed"
    )
    gc.set_defaults(handler=f"{COMMANDS}:cmd_gc")
