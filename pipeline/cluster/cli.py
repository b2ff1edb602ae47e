"""``spar submit``: registered by :func:`pipeline.cluster.submit.add_cli` (a light module: Ray is imported only
when a job is submitted)."""

from pipeline.cluster.submit import add_cli

__all__ = ["add_cli"]
