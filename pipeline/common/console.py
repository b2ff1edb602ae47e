"""How much of the libraries' own output reaches the console: ``--verbose`` / ``SPAR_VERBOSE=1`` shows Ray's and
MLflow's logs; by default only spar's own lines and progress bars are shown."""

from __future__ import annotations

import os

VERBOSE_ENV = "SPAR_VERBOSE"  # "1": show Ray's own logs (Ray Train chatter, controller warnings)


def verbose() -> bool:
    """Whether Ray's own chatter is shown (``--verbose`` or ``SPAR_VERBOSE=1``); by default only ours is."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0", "false")


def set_verbose(on: bool) -> None:
    """Switch Ray's chatter on or off for this process and the Ray workers it starts afterwards."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
