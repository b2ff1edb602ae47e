"""A Ray cluster of several nodes on this one machine with no shared disk, for the node-loss tests.

* a Ray head (infra/local/start_ray_head.sh: token auth on, dashboard on 127.0.0.1, 0 CPUs: it runs the job
  drivers only) and two worker nodes, each a separate ``ray start --block`` process in its own session, with its
  own ``--temp-dir`` (Ray >= 2.51 honours a per-node temp dir, ray-project/ray#57735), its own ports, and a
  custom resource naming it (``node_a``, ``node_b``) so tests can tell the nodes apart;
* moto's S3 server as a subprocess on 127.0.0.1 (the Ray worker processes must reach it);
* an MLflow tracking server on 127.0.0.1 whose artifacts go to S3 on moto (the server holds the S3 credentials;
  clients log artifacts through it), started when a test first asks for it (``Cluster.mlflow``): the default
  run's test_cluster.py does not need one.

No node is started with storage credentials in its environment: a task only has them through the job's runtime
environment (``spar submit`` forwards AWS_* / MLFLOW_* from the submitting shell), which the tests rely on.
Processes are stopped by their own process groups, never with ``ray stop``. The fixtures are package-scoped: the
cluster is stopped after the last test of tests/cluster, so the rest of a run (the default run includes
test_cluster.py) does not share the machine with three idle Ray nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import (
    ROOT,
    VENV_BIN,
    MlflowServer,
    RayHead,
    clean_env,
    free_ports,
    http_status,
    mlflow_server,
    new_token,
    start_ray_head,
    stop_process_group,
    stop_process_groups,
    wait_until,
)

BUCKET = "spar"
WORKER_CPUS = 2  # per worker node: a 2-worker training group fits on either node alone
OBJECT_STORE_BYTES = 200 * 1024**2
# the node processes' environment never carries these: storage credentials reach tasks through the job only
_NODE_SCRUB_PREFIXES = ("AWS_", "MLFLOW_", "SPAR_", "FSSPEC_")


def node_env(**extra: str) -> dict[str, str]:
    """clean_env() without any storage / tracking / spar setting, plus `extra`."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(_NODE_SCRUB_PREFIXES)}
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ S3 (moto)


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        """The variables a client of this S3 needs (fake credentials: moto accepts any)."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
        }

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """This process's environment points s3fs at this server for the block (restored after)."""
        import s3fs

        with pytest.MonkeyPatch.context() as mp:
            for k, v in self.env().items():
                mp.setenv(k, v)
            s3fs.S3FileSystem.clear_instance_cache()
            try:
                yield
            finally:
                s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="package")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 server as its own process on 127.0.0.1, with the bucket ``spar``."""
    (port,) = free_ports(1)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            env=node_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = S3Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        wait_until(
            "moto S3 server", lambda: http_status(f"{server.endpoint}/", timeout=5)[0] == 200, proc, log
        )
        with server.environ():
            import s3fs

            s3fs.S3FileSystem().mkdir(BUCKET)
        yield server
    finally:
        stop_process_group(proc, grace_s=10)


# ------------------------------------------------------------------------------------------------ Ray nodes


@dataclass
class WorkerNode:
    """One `ray start --block` worker node: its own session (process group), temp dir and custom resource."""

    name: str  # also its custom resource: {"<name>": 1}
    tmp: Path
    log: Path
    proc: subprocess.Popen
    killed_at: float | None = None  # time.time() of kill()

    def processes(self) -> list[psutil.Process]:
        """The `ray start` process and every process below it (raylet, agents, Ray workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def processes_by_temp_dir(self) -> list[psutil.Process]:
        """Processes of this user whose command line names this node's temp dir (a cross-check of processes())."""
        out = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.tmp) in a for a in (p.info["cmdline"] or [])):
                    out.append(p)
        return out

    def kill(self) -> dict[str, object]:
        """SIGKILL the whole node at once (raylet, agents, every Ray worker): a lost machine. Returns what died."""
        procs = {p.pid: p for p in [*self.processes(), *self.processes_by_temp_dir()]}
        names: dict[int, str] = {}
        for pid, p in procs.items():
            with contextlib.suppress(psutil.Error):
                names[pid] = " ".join(p.cmdline())[:80]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        self.killed_at = time.time()
        gone, alive = psutil.wait_procs(list(procs.values()), timeout=10)
        assert not alive, [p.pid for p in alive]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return {"node": self.name, "pids": sorted(procs), "commands": names, "at": self.killed_at}

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    head: RayHead
    head_tmp: Path
    workers: dict[str, WorkerNode]
    s3: S3Server
    root: Path  # scratch folder of the fixture (node temp dirs, logs)
    log_dir: Path
    _servers: contextlib.ExitStack  # the tracking server, once started; closed by the fixture
    _starts: int = field(default=0)
    _mlflow: MlflowServer | None = None

    @property
    def address(self) -> str:
        return self.head.address

    @property
    def mlflow(self) -> MlflowServer:
        """The tracking server (artifacts on S3; it alone holds the S3 credentials), started on first use."""
        if self._mlflow is None:
            env = clean_env(**self.s3.env())
            args = ["--artifacts-destination", f"s3://{BUCKET}/mlartifacts"]
            self._mlflow = self._servers.enter_context(
                mlflow_server(self.log_dir / "mlflow", args=args, env=env)
            )
        return self._mlflow

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a user who submits jobs: the cluster's token, S3 credentials, the tracking server."""
        return self.head.client_env(**self.s3.env(), MLFLOW_TRACKING_URI=self.mlflow.url, **extra)

    def nodes(self) -> list[dict]:
        """Ray's node table (state API through the dashboard, with the token)."""
        status, body = http_status(f"{self.address}/api/v0/nodes?limit=100&detail=1", self.head.headers())
        if status != 200:
            return []
        return json.loads(body)["data"]["result"]["result"]

    def alive_nodes(self) -> dict[str, dict]:
        """ALIVE nodes by name: "head" or the worker's custom resource name."""
        out = {}
        for n in self.nodes():
            if n.get("state") != "ALIVE":
                continue
            res = n.get("resources_total") or {}
            name = "head" if n.get("is_head_node") else next((w for w in self.workers if w in res), "?")
            out[name] = n
        return out

    def start_workers(self, names: list[str]) -> None:
        """Start (or replace) worker nodes ``names``, all at once, and wait until Ray lists each ALIVE."""
        nodes = [self._spawn_worker(name) for name in names]
        for node in nodes:
            wait_until(f"Ray worker node {node.name}", lambda n=node.name: n in self.alive_nodes(), node.proc,
                       node.log)  # fmt: skip

    def _spawn_worker(self, name: str) -> WorkerNode:
        """``ray start --block`` for worker node ``name`` in its own session, temp dir and ports."""
        self._starts += 1
        # a short path: Ray's unix sockets live under it (107-char limit)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))
        log = self.log_dir / f"{name}-{self._starts}.log"
        nm, om, metrics, agent, agent_grpc, rt_env = free_ports(6)
        cmd = [
            str(VENV_BIN / "ray"), "start", "--address", f"127.0.0.1:{self.head.gcs_port}",
            "--node-ip-address", "127.0.0.1", "--num-cpus", str(WORKER_CPUS), "--num-gpus", "0",
            "--resources", json.dumps({name: 1}), "--temp-dir", str(tmp),
            "--object-store-memory", str(OBJECT_STORE_BYTES), "--disable-usage-stats",
            "--node-manager-port", str(nm), "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(rt_env), "--block",
        ]  # fmt: skip
        env = node_env(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.head.token_file), RAY_TMPDIR=str(tmp)
        )
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = WorkerNode(name, tmp, log, proc)
        self.workers[name] = node
        return node

    def ensure_workers(self) -> None:
        """Every worker node up (a test before may have killed one): dead ones are replaced."""
        down = [
            name for name, node in self.workers.items() if not node.alive() or name not in self.alive_nodes()
        ]
        for name in down:
            with contextlib.suppress(Exception):
                stop_process_group(self.workers[name].proc, grace_s=5)
        if down:
            self.start_workers(down)

    def stop(self) -> None:
        """The worker nodes together (SIGTERM to all, then each waited for), then the head."""
        stop_process_groups([node.proc for node in self.workers.values()], grace_s=20)
        stop_process_group(self.head.proc)


def _start_head(root: Path, log_dir: Path) -> tuple[RayHead, Path]:
    """The head: 0 CPUs (job drivers only), its own temp dir, no storage credentials in its environment."""
    tmp = Path(tempfile.mkdtemp(prefix="head-", dir=root))
    token_file = new_token(root / "auth_token")
    env = node_env(RAY_TMPDIR=str(tmp), RAY_AUTH_TOKEN_PATH=str(token_file))
    args = ["--num-cpus", "0", "--num-gpus", "0", "--temp-dir", str(tmp),
            "--object-store-memory", str(OBJECT_STORE_BYTES)]  # fmt: skip
    return start_ray_head(tmp, token_file, log_dir / "head.log", env, *args), tmp


@pytest.fixture(scope="package")
def ray_cluster(s3_server: S3Server, tmp_path_factory) -> Iterator[Cluster]:
    """Head + two worker nodes + moto S3 (+ the MLflow server, on first use): see the module docstring."""
    root = Path(tempfile.mkdtemp(prefix="spar-cl-", dir="/tmp"))  # short: unix socket paths
    log_dir = tmp_path_factory.mktemp("cluster-logs")
    cluster: Cluster | None = None
    head: RayHead | None = None
    with contextlib.ExitStack() as servers:
        try:
            head, head_tmp = _start_head(root, log_dir)
            cluster = Cluster(head, head_tmp, {}, s3_server, root, log_dir, servers)
            cluster.start_workers(["node_a", "node_b"])
            yield cluster
        finally:
            servers.close()  # the tracking server first, as before the nodes
            if cluster is not None:
                cluster.stop()
            elif head is not None:
                stop_process_group(head.proc)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def cluster(ray_cluster: Cluster) -> Cluster:
    """The session's cluster with both worker nodes up (a node killed by an earlier test is replaced)."""
    ray_cluster.ensure_workers()
    return ray_cluster
