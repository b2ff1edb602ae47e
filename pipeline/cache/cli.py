"""``spar precompute`` and ``spar cache``."""

from __future__ import annotations

import argparse

from pipeline.cache import precompute, store


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar precompute`` and ``spar cache``."""
    precompute.add_cli(sub)
    store.add_cli(sub)
