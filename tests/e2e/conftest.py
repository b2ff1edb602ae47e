"""Fixtures for end-to-end tests: a real Ray head started by infra/local/start_ray_head.sh (token auth on, bound to
127.0.0.1, isolated temp dir), real MLflow servers from infra/local/start_mlflow_server.sh, and the `spar` CLI run
as a subprocess the way a user runs it.

Processes are started in their own session and stopped by their own process id / group (never `ray stop`, which
would stop every Ray process of this user on the machine).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
SPAR = [sys.executable, "-c", "from pipeline.cli import entry; entry()"]

# environment variables of the developer's shell that must not leak into the isolated cluster / clients
_SCRUB = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
    "RAY_TMPDIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


def free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus cluster/tracking settings, the venv first on PATH, plus `extra`."""
    # PYTEST_CURRENT_TEST would make libraries in the cluster's processes behave as if under test
    # (scikit-image raises pytest's Skipped for a photo it cannot download)
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("PYTEST_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    env["TQDM_DISABLE"] = "1"
    env.update(extra)
    return env


def http_status(url: str, headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, str]:
    """(status, body) of a GET; HTTP errors are returned, not raised; connection errors -> (0, reason)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        return 0, str(e)


def listening_ips(port: int) -> set[str]:
    """Local IPs with a TCP socket listening on `port` (any process)."""
    import psutil

    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    }


def stop_process_group(proc: subprocess.Popen, grace_s: float = 40.0) -> None:
    """SIGTERM the process (its own handlers stop its children), then SIGKILL its process group if needed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this group only (started with start_new_session)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def stop_process_groups(procs: Sequence[subprocess.Popen], grace_s: float = 40.0) -> None:
    """:func:`stop_process_group` for several processes at once: SIGTERM to all, one shared grace period."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        stop_process_group(proc, grace_s=max(0.0, deadline - time.monotonic()))


def run_spar(args: Sequence[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`spar ARGS` as a subprocess from the project root; stdout+stderr captured as text."""
    return subprocess.run(
        [*SPAR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@dataclass
class RayHead:
    address: str  # dashboard / Jobs API URL
    dashboard_port: int
    gcs_port: int
    token_file: Path
    tmp: Path  # RAY_TMPDIR of this head (session dirs, uploaded working dirs)
    log: Path
    proc: subprocess.Popen

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of an authorised client of this head."""
        return clean_env(RAY_AUTH_TOKEN_PATH=str(self.token_file), RAY_TMPDIR=str(self.tmp), **extra)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token_file.read_text().strip()}"}


def wait_until(what: str, ok, proc: subprocess.Popen | None, log: Path | None, timeout: float = 180) -> None:
    """Poll `ok()` every 0.2 s until true; raise, with the tail of `log`, once `proc` has exited or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while not ok():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} did not come up (exit {proc.poll() if proc else None}):\n{tail}")
        time.sleep(0.2)


def new_token(path: Path) -> Path:
    """A fresh cluster token at `path` (mode 0600)."""
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def start_ray_head(tmp: Path, token_file: Path, log: Path, env: dict[str, str], *args: str) -> RayHead:
    """infra/local/start_ray_head.sh (token auth on, 127.0.0.1) on free ports, with `args` added (CPUs, temp dir...),
    in its own session; returns once its Jobs API answers with the token (stopped again if it does not come up)."""
    gcs, dash, client, agent, agent_grpc, metrics, rt_env, nm, om = free_ports(9)
    cmd = [
        str(ROOT / "infra/local/start_ray_head.sh"),
        "--port", str(gcs), "--dashboard-port", str(dash),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
        "--runtime-env-agent-port", str(rt_env), "--node-manager-port", str(nm), "--object-manager-port", str(om),
        *args, "--block",
    ]  # fmt: skip
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = RayHead(f"http://127.0.0.1:{dash}", dash, gcs, token_file, tmp, log, proc)
    try:
        wait_until(
            "Ray head",
            lambda: http_status(f"{head.address}/api/jobs/", head.headers(), timeout=5)[0] == 200,
            proc,
            log,
        )
    except RuntimeError:
        stop_process_group(proc)
        raise
    return head


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A real Ray head (2 CPUs) started by infra/local/start_ray_head.sh with token auth on; stopped at the end."""
    # a short path: Ray's unix sockets live under it (107-char limit)
    tmp = Path(tempfile.mkdtemp(prefix="spar-e2e-", dir="/tmp"))
    token_file = new_token(tmp / "auth_token")
    env = clean_env(RAY_TMPDIR=str(tmp), RAY_AUTH_TOKEN_PATH=str(token_file))
    try:
        head = start_ray_head(tmp, token_file, tmp / "head.log", env, "--num-cpus", "2")
        try:
            yield head
        finally:
            stop_process_group(head.proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # session dirs, uploaded working dirs, the token


@dataclass
class MlflowServer:
    url: str
    port: int
    workdir: Path
    log: Path
    proc: subprocess.Popen


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    auth: bool = False,
    env_extra: dict[str, str] | None = None,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[MlflowServer]:
    """infra/local/start_mlflow_server.sh on a free 127.0.0.1 port; waits until it answers; stops it after.

    `args`: more options of the script (e.g. `--artifacts-destination s3://...`); `env`: the server's whole
    environment (default: clean_env(**env_extra))."""
    (port,) = free_ports(1)
    log = workdir / f"mlflow-server-{port}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(ROOT / "infra/local/start_mlflow_server.sh"), "--workdir", str(workdir), "--port", str(port)]
    if auth:
        cmd.append("--auth")
    cmd.extend(args)
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or clean_env(**(env_extra or {})), stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    server = MlflowServer(f"http://127.0.0.1:{port}", port, workdir, log, proc)
    try:
        deadline = time.monotonic() + 180
        while True:
            status, _ = http_status(f"{server.url}/health", timeout=5)
            if status == 200:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"MLflow server did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}"
                )
            time.sleep(0.2)
        yield server
    finally:
        stop_process_group(proc, grace_s=20)
