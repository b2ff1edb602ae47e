"""Base class of the core's errors about bad input (unknown backbone, bad class list, bad window parameters)."""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input to the core; callers that talk to users report the message as it is, without a traceback."""
