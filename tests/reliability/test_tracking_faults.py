"""A tracking server that goes away for a while (docs/reliability.md), quick part: the queue that carries a run's
metrics, params and tags (:mod:`pipeline.common.tracking_queue`) and a stage's bounded wait for a server that is down
at its start (:func:`pipeline.common.tracking.wait_for_server`), in this process.

Real parts: MLflow's tracking server (its own server application and sqlite store, served from this process on
127.0.0.1: tests/reliability/servers.py), with :class:`tests.faultproxy.FaultProxy` in front of it; the code under
test talks to the proxy, the checks read the server directly. The reference is what the test logged. The 60 s outage in the middle of a Ray Train distillation is
``slow``: tests/reliability/test_tracking_faults_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.common import tracking
from pipeline.common.tracking_queue import QueuedRunLog
from tests.faultproxy import FaultProxy, Faults, fault_proxy
from tests.reliability.servers import LocalMlflow as MlflowServer
from tests.reliability.servers import inprocess_mlflow_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    with inprocess_mlflow_server(tmp_path_factory.mktemp("mlflow-faults")) as s:
        yield s


@pytest.fixture
def proxy(server: MlflowServer) -> Iterator[FaultProxy]:
    with fault_proxy(server.url, max_requests=2000) as p:
        yield p


@pytest.fixture
def run_id(server: MlflowServer) -> str:
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name("faults") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("faults")
    return client.create_run(exp_id).info.run_id


def _history(server: MlflowServer, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(step, value, timestamp) of every logged value of ``key``, as the server holds them."""
    hist = MlflowClient(server.url).get_metric_history(run_id, key)
    return sorted((m.step, m.value, m.timestamp) for m in hist)


def test_entries_logged_during_an_outage_arrive_once_and_in_order(
    server: MlflowServer, proxy: FaultProxy, run_id: str
) -> None:
    """Steps 1..40 logged every 0.05 s while the server is unreachable from step 10 for 1.5 s (the rest of the run
    and the sender's first retries): no call waits on the server, and the server ends up with every step's values
    exactly once, with the timestamps of the steps."""
    said: list[str] = []
    q = QueuedRunLog(proxy.url, run_id, say=said.append)
    q.add_params({"lr": 0.001, "seed": 3})
    q.add_tags({"worker_device": "cpu"})
    logged: dict[int, tuple[float, int]] = {}
    slowest = 0.0
    for step in range(1, 41):
        if step == 10:
            proxy.outage(1.5)
        ts = int(time.time() * 1000)
        t0 = time.perf_counter()
        q.add_metrics({"loss": 1.0 / step, "lr": 0.001}, step, timestamp=ts)
        slowest = max(slowest, time.perf_counter() - t0)
        logged[step] = (1.0 / step, ts)
        time.sleep(0.05)
    assert q.close(wait_s=60) is None  # all delivered
    assert slowest < 0.05, slowest  # the logging call never waited for the server
    got = _history(server, run_id, "loss")
    assert [s for s, _, _ in got] == list(range(1, 41))  # none lost, none repeated
    assert all(v == pytest.approx(logged[s][0]) and t == logged[s][1] for s, v, t in got)
    run = MlflowClient(server.url).get_run(run_id)
    assert run.data.params == {"lr": "0.001", "seed": "3"}
    assert run.data.tags["worker_device"] == "cpu"
    assert len(q.outages) == 1 and 1.0 < q.outages[0] < 20, q.outages
    assert len(said) == 2 and "unreachable" in said[0] and "is back after" in said[1], said
    assert not proxy.over_budget


def test_what_cannot_be_delivered_is_named_kept_locally_and_resent_by_spar_runs(
    server: MlflowServer, proxy: FaultProxy, run_id: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    from pipeline.cli import main
    from pipeline.common.tracking_queue import SPOOL_ENV

    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))
    said: list[str] = []
    q = QueuedRunLog(proxy.url, run_id, say=said.append)
    q.add_metrics({"loss": 0.5}, 1)
    assert q.wait_delivered(30)
    proxy.down()  # and it does not come back before the run ends
    for step in range(2, 12):
        q.add_metrics({"loss": 1.0 / step}, step)
    q.add_params({"trainable_blocks": 2})
    spool = q.close(wait_s=3)
    assert spool is not None and spool.parent == tmp_path / "spool"
    line = said[-1]
    assert str(spool) in line and f"spar runs --resend {spool}" in line
    assert "10 metric values (loss steps 2-11)" in line and "1 params (trainable_blocks)" in line, line
    kept = [json.loads(x) for x in spool.read_text().splitlines()]
    assert [(d["key"], d["step"]) for d in kept] == [("loss", s) for s in range(2, 12)] + [
        ("trainable_blocks", 0)
    ]
    assert [s for s, _, _ in _history(server, run_id, "loss")] == [1]  # the server has only what it got
    proxy.up()
    assert main(["runs", "--resend", str(spool)]) == 0
    assert "re-sent 11 entries" in capsys.readouterr().out
    assert [s for s, _, _ in _history(server, run_id, "loss")] == list(range(1, 12))
    assert MlflowClient(server.url).get_run(run_id).data.params == {"trainable_blocks": "2"}
    assert not spool.exists()


def test_a_stage_waits_for_a_server_that_is_down_at_its_start_and_gives_up_in_bounded_time(
    server: MlflowServer, proxy: FaultProxy, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The MLflow set-up of every stage (``setup_experiment``, as ``MLFLOW_TRACKING_URI`` names the server) waits
    for a server that is down, with one line, and goes on when it is back; one that stays down ends the wait with
    a TrackingError after the bound."""
    monkeypatch.setattr(tracking, "_USER_TRACKING_URI", proxy.url)  # as if MLFLOW_TRACKING_URI was set
    proxy.outage(1.5)
    t0 = time.monotonic()
    exp_id = tracking.setup_experiment("faults-start", tmp_path)
    waited = time.monotonic() - t0
    assert MlflowClient(server.url).get_experiment(exp_id).name == "faults-start"
    assert 1.0 < waited < 30, waited
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not answer" in err[0] and "at most 300 s" in err[0], err
    assert "answers after" in err[1], err
    proxy.down()
    monkeypatch.setenv(tracking.WAIT_ENV, "2")
    t0 = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"{proxy.url} did not answer for 2 s"):
        tracking.setup_experiment("faults-start", tmp_path)
    assert time.monotonic() - t0 < 10
    proxy.up()
    proxy.set_faults(Faults())
