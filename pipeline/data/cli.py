"""``spar ingest``: its flags, defined from :class:`pipeline.data.config.IngestConfig`'s fields (``dest`` = the field,
``default=None`` so an absent flag never overrides the recipe). The work runs in :func:`pipeline.data.ingest.run_cli`,
imported only when the command runs."""

from __future__ import annotations

import argparse

from pipeline.data.config import IngestConfig

__all__ = ["add_cli"]


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar ingest``."""
    p = sub.add_parser(
        "ingest",
        help="raw images -> frozen augmented webdataset shards + manifest",
        description="Ingest folders / list files / globs / tar archives (local or fsspec URLs) into <ROOT>/images.",
    )
    p.add_argument("src", metavar="SRC", nargs="+",
                   help="folder (recursive), text file of paths, glob, image, or tar archives (SA-1B's "
                        "sa_000000.tar ...: read in place, json members skipped); local or s3://... URLs")  # fmt: skip
    p.add_argument("--select", dest="select", choices=("paper",), default=None,
                   help="paper: the authors' SA-1B selection (archives sa_000000-sa_000002, images sa_N with "
                        "N <= 25,000)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="ROOT", help="image-set root; shards go to ROOT/images")
    p.add_argument(
        "--seed", dest="seed", type=int, default=None, help=f"augmentation seed (default {IngestConfig.seed})"
    )
    p.add_argument("--shard-size", dest="shard_size", type=int, default=None, help="images per shard")
    p.add_argument(
        "--max-side", dest="max_side", type=int, default=None, help="cap on the output's long side (0 = none)"
    )
    p.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                   help="no resize/crop/flip: plain snap to 16 (eval sets)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, help="shard tasks at once (default: cluster CPUs)")
    p.add_argument("--config", default=None, help="TOML recipe (section [ingest])")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(
        handler="pipeline.data.ingest:run_cli", stage_config=("pipeline.data.config:IngestConfig", "ingest")
    )
