"""``spar eval``, ``classes``, ``segment``, ``embed``, ``runs`` and ``viz``."""

from __future__ import annotations

import argparse

from pipeline.eval import benchmark, viz


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the evaluation commands."""
    benchmark.add_cli(sub)
    viz.add_cli(sub)
