"""``spar bench <name>``: benchmarks that print ratios measured side by side in one run.

Each benchmark lives in a module of ``pipeline.bench`` (see :data:`MODULES`) and exposes ``add_args(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib

MODULES = {"core": "teacher", "ingest": "ingest", "cache": "cache", "train": "train", "gpu": "gpu"}
BENCHES = {
    "core": "teacher (batched, mixed precision) vs naive fp32 reference, and single pass vs teacher",
    "ingest": "ingest throughput with 1 and 2 Ray workers",
    "cache": "cache size, read/write speed, precompute throughput vs measured matmul rate",
    "train": "training step: streaming vs in-memory targets, cached vs online teacher",
    "gpu": "the prepared GPU check: environment, correctness, throughput, projection, pipeline (report)",
}


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar bench``."""
    p = sub.add_parser("bench", help="run a benchmark (ratios measured side by side in one run)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, helptext in BENCHES.items():
        try:
            mod = importlib.import_module(f"pipeline.bench.{MODULES[name]}")
        except ModuleNotFoundError as e:
            if e.name == f"pipeline.bench.{MODULES[name]}":
                continue
            raise
        bp = bsub.add_parser(name, help=helptext)
        mod.add_args(bp)
        bp.set_defaults(func=mod.run)
