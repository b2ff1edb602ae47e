"""``spar ingest``."""

from __future__ import annotations

import argparse

from pipeline.data import ingest


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar ingest``."""
    ingest.add_cli(sub)
