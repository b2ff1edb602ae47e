"""Shared body of the `python -m jobs.<stage>` entry points run by Ray Jobs.

Each entry point forwards its argv to the `spar` CLI (`pipeline.cli.main([command, *argv])`), so a job behaves,
validates and fails exactly like the same `spar` command on a workstation, and exits with its code.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence


def _banner(command: str) -> str:
    import pipeline

    where = os.path.dirname(os.path.abspath(pipeline.__file__))
    return (
        f"[jobs] spar {command} on {socket.gethostname()} | python {sys.executable} | "
        f"project {os.path.dirname(where)} | cwd {os.getcwd()} | "
        f"commit {os.environ.get('SPAR_GIT_COMMIT', 'unknown')}"
    )


def run(command: str, argv: Sequence[str] | None = None) -> int:
    """Run `spar <command> <argv>` in-process and return its exit code (argv defaults to sys.argv[1:])."""
    args = list(sys.argv[1:] if argv is None else argv)
    print(_banner(command), file=sys.stderr, flush=True)
    from pipeline.cli import main

    try:
        code = main([command, *args])
    except SystemExit as e:  # argparse errors / --help exit through SystemExit
        code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
