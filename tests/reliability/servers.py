"""A real MLflow tracking server served from this test process, for the quick fault tests (docs/reliability.md).

It is MLflow's own tracking-server application (``mlflow.server.app``: the same REST handlers and SQLAlchemy sqlite
store that ``mlflow server`` runs), served by werkzeug on 127.0.0.1 from a thread, so a module pays only the store's
set-up, not a server process start-up (~100 s on the shared 2-core machine under load, ~20 s to stop). The slow
tests use the ``mlflow server`` process (tests.e2e.conftest.mlflow_server).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LocalMlflow", "inprocess_mlflow_server"]


@dataclass(frozen=True)
class LocalMlflow:
    url: str
    workdir: Path


@contextlib.contextmanager
def inprocess_mlflow_server(workdir: Path) -> Iterator[LocalMlflow]:
    """MLflow's tracking server on a free 127.0.0.1 port for the block (sqlite store under ``workdir``)."""
    from mlflow.server import app
    from mlflow.server.handlers import initialize_backend_stores
    from werkzeug.serving import make_server

    workdir.mkdir(parents=True, exist_ok=True)
    initialize_backend_stores(f"sqlite:///{workdir / 'mlflow.db'}", None, str(workdir / "mlartifacts"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="mlflow-server")
    thread.start()
    try:
        yield LocalMlflow(f"http://127.0.0.1:{server.server_port}", workdir)
    finally:
        server.shutdown()
        thread.join(10)
