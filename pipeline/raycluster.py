"""Connecting to Ray: a local in-process cluster by default, or an existing cluster by address.

Token authentication stays on (Ray's default); a local cluster binds to 127.0.0.1 and runs no dashboard.
"""

from __future__ import annotations

import os

import ray

__all__ = ["init_ray", "cluster_gpus", "shutdown_ray"]


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs) -> None:
    """Idempotently connect to Ray.

    Args:
        address: a cluster address (``auto``, ``ray://...``, ``HOST:PORT``); ``None`` uses ``RAY_ADDRESS`` when set
            (as inside a Ray Job), else starts a local cluster in-process.
        num_cpus: CPUs of a local cluster (default: all).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="warning",
        **kwargs,
    )


def cluster_gpus() -> float:
    """GPUs in the connected cluster (0 when none)."""
    return float(ray.cluster_resources().get("GPU", 0.0)) if ray.is_initialized() else 0.0


def shutdown_ray() -> None:
    """Disconnect (and stop a local cluster)."""
    if ray.is_initialized():
        ray.shutdown()
