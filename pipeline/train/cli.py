"""``spar distill``, ``spar import-checkpoint`` and ``spar export``."""

from __future__ import annotations

import argparse

from pipeline.train import checkpoint_io, distill


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the training commands."""
    distill.add_cli(sub)
    checkpoint_io.add_cli(sub)
