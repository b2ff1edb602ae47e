"""The ``spar`` command: one subcommand per stage, registered by the stage modules themselves.

Each module in :data:`STAGE_MODULES` exposes ``add_cli(subparsers)``, adding its subcommand(s) with
``set_defaults(func=...)``; ``func(args) -> int`` is the exit code. User errors (bad paths, bad configs, bad
inputs) print one clear line and exit with 2; unexpected failures print a traceback and exit with 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pipeline.common.config import UserError

STAGE_MODULES = (
    "pipeline.data.ingest",
    "pipeline.cache.precompute",
    "pipeline.cache.store",
    "pipeline.train.distill",
    "pipeline.eval.benchmark",
    "pipeline.workflow.demo",
    "pipeline.workflow.orchestrator",
    "pipeline.cluster.submit",
    "pipeline.bench.cli",
    "pipeline.train.checkpoint_io",
    "pipeline.eval.viz",
)

# Errors raised for bad user input by the pure core (ValueError subclasses) are user errors too.
_USER_ERROR_NAMES = {"BackboneError", "ClassListError", "CacheError", "CachePairingError", "DatasetError"}


def build_parser() -> argparse.ArgumentParser:
    """The full ``spar`` parser with every available stage registered."""
    parser = argparse.ArgumentParser(
        prog="spar",
        description="SPAR: distil a sliding-window ViT teacher into a single-pass any-resolution student.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not available in this build
                continue
            raise
        mod.add_cli(sub)
    return parser


def _is_user_error(e: BaseException) -> bool:
    return isinstance(e, UserError) or any(c.__name__ in _USER_ERROR_NAMES for c in type(e).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``spar`` (and of ``python -m jobs.<stage>``). Returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("spar: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI decides how to report
        if _is_user_error(e):
            print(f"spar {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


def entry() -> None:
    """Console-script wrapper."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
