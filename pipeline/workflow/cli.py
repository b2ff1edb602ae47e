"""``spar demo`` and ``spar pipeline``."""

from __future__ import annotations

import argparse

from pipeline.workflow import demo, orchestrator


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar demo`` and ``spar pipeline``."""
    demo.add_cli(sub)
    orchestrator.add_cli(sub)
