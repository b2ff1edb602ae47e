"""The MLflow tracking server unreachable for 60 s in the middle of ``spar distill`` (docs/reliability.md), end to
end (slow).

Real parts: an ``mlflow server`` process on 127.0.0.1 (infra/local/start_mlflow_server.sh, sqlite store, artifacts
served through it) behind :class:`tests.faultproxy.FaultProxy`; ``spar distill`` as a user runs it, in its own
process with its own local Ray cluster and a Ray Train worker, told ``MLFLOW_TRACKING_URI=<proxy>``.

The reference is the same distillation without any fault (run in the test process, logging to an embedded
store). Checked against it and against the server itself (read directly, not through the proxy): the faulty run
ends with exit code 0 and status FINISHED, its student registered; its loss history holds every step exactly once;
steps were trained while the server was unreachable (their own timestamps fall inside the outage); its final weights
equal the reference's.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import load_file

from tests.builders import paired_data
from tests.e2e.conftest import MlflowServer, mlflow_server
from tests.faultproxy import FaultProxy, fault_proxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

OUTAGE_S = 60.0
STEPS = 120
SETS = dict(precision="fp32", workers=1, max_steps=STEPS, checkpoint_every=20, keep_checkpoints=2, lr=1e-3, seed=3,
            shuffle_buffer=4, log_every=1, loader_workers=0, experiment="spar-tracking-faults")  # fmt: skip
SPAR = [sys.executable, "-c", "from pipeline.cli import entry; entry()"]
SCRUB = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    # no GenAI job runner (7 worker processes restarting on a 2-core machine): a tracking server only
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with mlflow_server(tmp_path_factory.mktemp("mlflow-e2e"), env_extra=env, args=["--workers", "1"]) as s:
        yield s


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> dict[str, str]:
    return paired_data(str(tmp_path_factory.getbasetemp() / "spar-tracking-data"))


def _env(uri: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("PYTEST_")}
    return {**env, "MLFLOW_TRACKING_URI": uri, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TQDM_DISABLE": "1",
            "SPAR_TRACKING_SPOOL": str(tmp / "spool")}  # fmt: skip


def _distill(data: dict[str, str], workdir: Path, run: str, uri: str) -> subprocess.Popen:
    sets = [f"{k}={v}" for k, v in {**SETS, "run_name": run}.items()]
    args = ["distill", "--images", data["images"], "--cache", data["cache"], "--workdir", str(workdir),
            *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*SPAR, *args], cwd=workdir, env=_env(uri, workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _run_of(client: MlflowClient, name: str):
    exp = client.get_experiment_by_name(SETS["experiment"])
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'")
    return runs[0] if runs else None


def _weights(workdir: Path, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(workdir / "students" / run / "student.safetensors"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The same distillation without any fault, in this process (the session's Ray cluster, an embedded store)."""
    from pipeline.train.config import DistillConfig
    from pipeline.train.driver import distill

    wd = tmp_path_factory.mktemp("ref")
    res = distill(DistillConfig(images=data["images"], cache=data["cache"], workdir=str(wd), run_name="ref",
                                register_model="", **SETS))  # fmt: skip
    assert res.completed and res.steps == STEPS
    return _weights(wd, "ref")


def test_distill_keeps_training_through_a_60_s_tracking_outage_and_loses_nothing(
    data, server: MlflowServer, reference, tmp_path: Path
) -> None:
    client = MlflowClient(server.url)  # the server itself, not the proxy
    with fault_proxy(server.url, max_requests=5000) as proxy:
        t_start = time.monotonic()
        p = _distill(data, tmp_path / "wd", "outage", proxy.url)
        outage = _outage_after_first_loss(client, proxy, p)
        out, err = p.communicate(timeout=1200)
        seconds = time.monotonic() - t_start
    assert p.returncode == 0, err[-4000:]
    run = client.get_run(_run_of(client, "outage").info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("registered_model", "").startswith("models:/spar-student/"), run.data.tags
    hist = client.get_metric_history(run.info.run_id, "loss")
    steps = sorted(m.step for m in hist)
    assert steps == list(range(1, STEPS + 1)), steps  # every step once: none lost, none repeated
    during = [m.step for m in hist if outage[0] <= m.timestamp <= outage[1]]
    lines = [x for x in err.splitlines() if "[spar tracking]" in x]
    print(f"TRACKING-OUTAGE {OUTAGE_S:.0f}s: steps trained during it {len(during)} ({min(during, default=0)}-"
          f"{max(during, default=0)}), run {seconds:.0f} s, proxy {dict(proxy.stats)}, lines {lines}")  # fmt: skip
    assert during, "no step was trained while the server was unreachable"
    assert any("unreachable" in x for x in lines) and any("is back after" in x for x in lines), lines
    got = _weights(tmp_path / "wd", "outage")
    assert got.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(got[k], reference[k], rtol=1e-5, atol=1e-6)
    assert not proxy.over_budget


def _outage_after_first_loss(client: MlflowClient, proxy: FaultProxy, p: subprocess.Popen) -> tuple[int, int]:
    """Wait until the run's first loss value reached the server, then make the server unreachable for OUTAGE_S;
    returns the outage window in epoch milliseconds."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        assert p.poll() is None, p.communicate()[1][-4000:]
        run = _run_of(client, "outage")
        if run is not None and client.get_metric_history(run.info.run_id, "loss"):
            break
        time.sleep(0.5)
    else:
        raise AssertionError("no loss reached the server")
    t0 = int(time.time() * 1000)
    proxy.outage(OUTAGE_S)
    return t0, t0 + int(OUTAGE_S * 1000)
