"""The one user-error type of the pipeline.

Anything raised for bad user input (paths, configs, data, class lists) derives from :class:`UserError`, or from
:class:`spar_core.errors.InputError` in the pure core; the ``spar`` CLI prints such errors as one line and exits
with 2.
"""

from __future__ import annotations

import sys

__all__ = ["UserError", "is_user_error"]


class UserError(Exception):
    """An error caused by the user's input; the CLI prints its message (no traceback) and exits with 2."""


def is_user_error(e: BaseException) -> bool:
    """True for errors the user can fix from the message alone (pipeline or core input errors).

    The core is not imported for this (it pulls in torch): an error from it can only exist once it is loaded."""
    core = sys.modules.get("spar_core.errors")
    return isinstance(e, UserError) or (core is not None and isinstance(e, core.InputError))
