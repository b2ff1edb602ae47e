"""``spar submit``."""

from __future__ import annotations

import argparse

from pipeline.cluster import submit


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar submit``."""
    submit.add_cli(sub)
