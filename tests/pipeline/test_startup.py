"""What the start-up work relies on: a new MLflow store made from the empty template equals one MLflow makes itself;
the driver's forwarded variables reach Ray tasks whether or not the task needs a runtime environment of its own;
the early start's warm-up imports land in the worker processes that later tasks reuse; Ray Train's local-cluster
switches never override the user's; phase marks and ``spar bench startup``'s table."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from pipeline.bench.startup import Sample, _table
from pipeline.common import tasks
from pipeline.common.trace import TRACE_ENV, mark, read_marks
from pipeline.common.tracking import mlflow_runs_url, new_embedded_store


def _schema(db: Path) -> tuple[dict, list, list]:
    """Every table's columns and indexes (MLflow's own creation words the CREATE statements differently from one
    run to the next: its migrations rebuild tables with constraints in hash order), the schema version and the
    experiments."""
    with sqlite3.connect(db) as c:
        names = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        tables = {
            n: (
                c.execute(f"PRAGMA table_info('{n}')").fetchall(),
                sorted(
                    (i[1], i[2], tuple(x[2] for x in c.execute(f"PRAGMA index_info('{i[1]}')")))
                    for i in c.execute(f"PRAGMA index_list('{n}')")
                    if not i[1].startswith("sqlite_autoindex")
                ),
                sorted(r[2:] for r in c.execute(f"PRAGMA foreign_key_list('{n}')")),  # not its ids
            )
            for n in names
        }
        version = c.execute("SELECT * FROM alembic_version").fetchall()
        exps = c.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments"
        ).fetchall()
    return tables, version, exps


def test_new_store_from_the_template_equals_the_store_mlflow_makes(tmp_path, monkeypatch) -> None:
    import mlflow

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "own").mkdir()
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    own = tmp_path / "own" / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{own}").search_experiments()  # the reference: MLflow's own creation
    new_embedded_store(f"sqlite:///{tmp_path / 'first' / 'mlflow.db'}")  # no template yet: MLflow's way, kept
    assert (tmp_path / "cache" / "spar").is_dir() and list((tmp_path / "cache" / "spar").glob("mlflow-*.db"))
    second = tmp_path / "second" / "mlflow.db"
    new_embedded_store(f"sqlite:///{second}")  # from the template
    assert _schema(second) == _schema(own)
    client = mlflow.MlflowClient(f"sqlite:///{second}")  # and MLflow uses it as its own
    exp = client.create_experiment("x")
    run = client.create_run(exp).info.run_id
    client.log_metric(run, "m", 2.0)
    assert client.get_run(run).data.metrics == {"m": 2.0}
    before = second.read_bytes()
    new_embedded_store(f"sqlite:///{second}")  # an existing store is left alone
    assert second.read_bytes() == before


def test_forwarded_variables_reach_tasks_with_and_without_a_runtime_env(
    ray_up, monkeypatch, tmp_path
) -> None:
    import ray

    @ray.remote(num_cpus=0)
    def probe() -> str | None:
        import os

        return os.environ.get("SPAR_STARTUP_PROBE")

    def run() -> str | None:
        return ray.get(probe.options(runtime_env=tasks.task_runtime_env()).remote())

    monkeypatch.delenv("SPAR_STARTUP_PROBE", raising=False)
    if (
        tasks._LOCAL_CLUSTER_ENV is not None
    ):  # this process started the cluster: the variables as they were then
        for k in tasks._forwarded_env():  # (other tests set some since: MLflow writes MLFLOW_TRACKING_URI)
            if k not in tasks._LOCAL_CLUSTER_ENV:
                monkeypatch.delenv(k)
        for k, v in tasks._LOCAL_CLUSTER_ENV.items():
            monkeypatch.setenv(k, v)
        assert tasks.task_runtime_env() is None  # unchanged: the default worker pool, no runtime env
        _mlflow_sets_its_uri_and_it_does_not_travel(tmp_path, monkeypatch)
    assert run() is None
    monkeypatch.setenv("SPAR_STARTUP_PROBE", "after-init")  # set after the cluster started: must travel
    assert tasks.task_runtime_env()["env_vars"]["SPAR_STARTUP_PROBE"] == "after-init"
    assert run() == "after-init"
    monkeypatch.setenv(TRACE_ENV, "/nonexistent/trace")  # the benchmark's own variables never travel
    monkeypatch.setenv("SPAR_RAY_DEFAULTS", "0")
    env = tasks.task_runtime_env()["env_vars"]
    assert TRACE_ENV not in env and "SPAR_RAY_DEFAULTS" not in env


def _mlflow_sets_its_uri_and_it_does_not_travel(tmp_path, monkeypatch) -> None:
    """``mlflow.set_tracking_uri`` and ``mlflow.set_experiment`` (every stage's MLflow set-up) write
    MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID into the environment: they do not make a runtime environment (a
    fresh worker process per task); the user's own MLFLOW_TRACKING_URI, set since, travels."""
    import os

    import mlflow

    from pipeline.common import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # restored after the test
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    prev = mlflow.get_tracking_uri()
    try:
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("mlflow.db")  # what MLflow does (the cause)
        exp_id = tracking.setup_experiment("spar-startup-env", tmp_path)
        assert os.environ["MLFLOW_EXPERIMENT_ID"] == exp_id  # MLflow's set_experiment wrote it
        assert tasks.task_runtime_env() is None
        monkeypatch.setattr(tracking, "_USER_TRACKING_URI", "http://127.0.0.1:5999")  # as if set by the user
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
        assert tasks.task_runtime_env()["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"
    finally:
        mlflow.set_tracking_uri(prev)


def test_local_cluster_switches_never_override_the_user(monkeypatch) -> None:
    for k in tasks.LOCAL_TRAIN_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")
    monkeypatch.delenv("SPAR_RAY_DEFAULTS", raising=False)
    tasks._local_cluster_settings()
    import os

    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "5"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "0"
    for k in tasks.LOCAL_TRAIN_SETTINGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SPAR_RAY_DEFAULTS", "1")  # the benchmark's "before" side: Ray's defaults
    tasks._local_cluster_settings()
    assert not any(k in os.environ for k in tasks.LOCAL_TRAIN_SETTINGS)


# In a process of its own (its own local cluster, as the `spar` command starts it): the early start warms Ray's
# idle worker processes with a module no Ray worker imports by itself; the command's later tasks run in those
# processes, with the module already there.
WARM_SCRIPT = """
import json, os, sys
import ray
from pipeline.common import tasks
tasks.start_local_cluster_early(warm=("xml.dom.minidom",))
tasks.init_ray()
warmed = sorted(set(ray.get(tasks._WARM_REFS)))
probe = ray.remote(num_cpus=1)(lambda: (os.getpid(), "xml.dom.minidom" in sys.modules))
later = ray.get([probe.remote() for _ in range(4)])
cpus = int(ray.cluster_resources()["CPU"])
tasks.shutdown_ray()
print("RESULT " + json.dumps({"warmed": warmed, "tasks": len(tasks._WARM_REFS), "later": later, "cpus": cpus}))
"""


@pytest.mark.slow  # a Ray cluster of its own (~12 s); the default run checks the warm-up's task count in-process
def test_early_start_warms_the_workers_that_later_tasks_reuse() -> None:
    import json
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT, clean_env

    r = subprocess.run([sys.executable, "-c", WARM_SCRIPT], cwd=ROOT, env=clean_env(PYTHONPATH=str(ROOT)),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    got = json.loads(line.removeprefix("RESULT "))
    assert got["tasks"] == min(got["cpus"], tasks.WARM_TASKS_MAX)  # one per CPU: tasks of 1 CPU
    assert 1 <= len(got["warmed"]) <= got["tasks"]
    assert all(imported for _, imported in got["later"])  # no task paid the import itself
    assert {pid for pid, _ in got["later"]} <= set(got["warmed"])  # they ran in the warmed processes


def test_warm_up_tasks_never_exceed_what_the_command_will_run(ray_up) -> None:
    """As many warm-up tasks as the command's own tasks at once: its ``workers`` when set, else as many of its
    shape (``cpus_per_task``) as fit in the cluster, at most WARM_TASKS_MAX; none when one does not fit."""
    import ray

    cpus = int(ray.cluster_resources()["CPU"])
    try:
        for workers, per_task, want in [(1, 1, 1), (0, 1, min(cpus, tasks.WARM_TASKS_MAX)), (0, cpus + 1, 0)]:
            tasks._warm_workers(("json",), workers, per_task)
            assert len(tasks._WARM_REFS) == want, (workers, per_task)
            assert all(isinstance(pid, int) for pid in ray.get(tasks._WARM_REFS, timeout=120))
    finally:
        tasks._WARM_REFS.clear()


def test_marks_go_to_the_trace_file_once_when_asked(tmp_path, monkeypatch) -> None:
    trace = tmp_path / "t.jsonl"
    mark("nothing")  # no file named: nothing written anywhere
    monkeypatch.setenv(TRACE_ENV, str(trace))
    mark("a")
    mark("b", once=True)
    mark("b", once=True)
    mark("a")
    got = read_marks(str(trace))
    assert [m["phase"] for m in got] == ["a", "b", "a"]
    assert got[0]["t"] <= got[1]["t"] <= got[2]["t"]


def test_runs_url_opens_the_runs_table() -> None:
    assert (
        mlflow_runs_url("http://127.0.0.1:5000/", "7")
        == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_bench_table_medians_ratios_and_fixed_cost() -> None:
    def s(side: str, wall: float, imports: float, start: float, done: float) -> Sample:
        marks = {"spawn": 0.0, "imports": imports, "ray_init_start": imports, "ray_init_done": imports + 1,
                 "pool_start": start - 1, "task_start": start, "pool_done": done, "run_end": done, "exit": wall}  # fmt: skip
        return Sample("ingest", side, wall, 0, marks)

    rows = _table("ingest", [s("before", 30, 4, 20, 25), s("before", 40, 6, 30, 35), s("before", 50, 8, 40, 45),
                             s("after", 10, 2, 6, 8), s("after", 12, 2, 7, 9), s("after", 20, 3, 8, 10)])  # fmt: skip
    table = {r[:46].strip(): r[46:].split() for r in rows[2:]}
    # fixed cost = wall - (pool_done - task_start): before 25, 35, 45 -> 35; after 8, 10, 18 -> 10
    assert table["fixed cost (wall - tasks computing)"] == ["35.0", "10.0", "3.5x"]
    assert table["wall (spawn -> exit)"] == ["40.0", "12.0", "3.3x"]
    assert table["interpreter and imports"] == ["6.0", "2.0", "3.0x"]
    assert table["shutdown (handler returned -> exit)"] == ["5.0", "3.0", "1.7x"]


@pytest.mark.slow
def test_bench_startup_end_to_end(tmp_path, capsys) -> None:
    from pipeline.bench.startup import run
    from pipeline.cli import build_parser

    out = tmp_path / "startup.json"
    args = build_parser("bench").parse_args(["bench", "startup", "--stages", "ingest", "--rounds", "1",
                                             "--photos", "4", "--json", str(out)])  # fmt: skip
    assert run(args) == 0
    import json

    samples = json.loads(out.read_text())
    assert sorted(x["side"] for x in samples) == ["after", "before"]
    for x in samples:
        m = x["marks"]
        # the early start's thread starts Ray while the main thread imports: those two phases overlap
        assert 0 < m["ray_init_start"] < m["ray_init_done"] <= m["pool_start"] < m["task_start"]
        assert 0 < m["imports"] <= m["pool_start"]
        assert m["task_start"] <= m["pool_done"] <= m["run_end"] <= m["exit"] == pytest.approx(x["wall_s"])
    assert "fixed cost" in capsys.readouterr().out
