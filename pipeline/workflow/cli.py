"""``spar demo`` and ``spar pipeline``: argument definitions (the work runs in :mod:`pipeline.workflow.demo` and
:mod:`pipeline.workflow.orchestrator`)."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar demo`` and ``spar pipeline``."""
    p = sub.add_parser("demo", help="the whole pipeline on sample photos, on this machine")
    p.add_argument("--workdir", help="where everything goes (default ./spar-work)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--config", help="TOML recipe with a [demo] section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and every stage's report")
    p.set_defaults(
        handler="pipeline.workflow.demo:run_cli", stage_config=("pipeline.workflow.config:DemoConfig", "demo")
    )

    p = sub.add_parser("pipeline", help="all stages from one TOML recipe (jobs/configs/*.toml)")
    p.add_argument(
        "--config", required=True, help="recipe TOML with [run] [ingest] [precompute] [distill] [eval]"
    )
    p.add_argument("--workdir", help="override run.workdir")
    p.add_argument("--source", help="override run.source (raw training images)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.set_defaults(handler="pipeline.workflow.orchestrator:run_cli")
