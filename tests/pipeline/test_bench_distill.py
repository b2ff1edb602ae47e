"""``spar bench distill``: the steps/s, images/s and data-wait fraction it reports are checked against the same
quantities recomputed here from a run's MLflow metric history: by default on the session's finished run
(``finished_run``, tests/conftest.py: no Ray Train start of its own), and end to end through the real CLI parser
in the slow suite."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from pipeline.bench.distill import run, throughput
from pipeline.cli import build_parser
from pipeline.common.tracking import tracking_uri

STEPS, WARMUP = 8, 3


def test_throughput_of_a_finished_run_equals_its_metric_history(finished_run):
    from tests.builders import FINISHED_STEPS

    res, warmup = finished_run["res"], 2
    client = MlflowClient(res.tracking_uri)
    workers = finished_run["cfg"].workers  # batch 1 per worker
    got = throughput(client, res.run_id, warmup, images_per_step=workers)
    step_s = {m.step: m.value for m in client.get_metric_history(res.run_id, "step_time_s")}
    frac = {m.step: m.value for m in client.get_metric_history(res.run_id, "data_wait_frac")}
    assert (
        sorted(step_s) == sorted(frac) == list(range(1, FINISHED_STEPS + 1))
    )  # one value per optimizer step
    timed = [s for s in step_s if s > warmup]
    total = sum(step_s[s] for s in timed)
    assert (
        got["logged_steps"] == FINISHED_STEPS and got["timed_steps"] == len(timed) == FINISHED_STEPS - warmup
    )
    assert got["data_wait_frac"] == pytest.approx(sum(frac[s] * step_s[s] for s in timed) / total, rel=1e-9)
    assert got["steps_per_s"] == pytest.approx(len(timed) / total, rel=1e-9)
    assert got["images_per_s"] == pytest.approx(workers * len(timed) / total, rel=1e-9)
    assert got["step_ms_max"] == pytest.approx(1e3 * max(step_s[s] for s in timed))


@pytest.mark.slow  # its own Ray Train run (the default run checks the figures on the session's finished run)
def test_bench_distill_reports_its_run_metrics(ray_up, tmp_path):
    work, out = tmp_path / "work", tmp_path / "bench.json"
    args = build_parser("bench").parse_args([
        "bench", "distill", "--backbone", "tiny-clip-64", "--crop", "64", "--stride", "32",
        "--train-long", "128", "--train-short", "64", "--train-min-short", "64", "--photos", "3",
        "--steps", str(STEPS), "--warmup", str(WARMUP), "--workers", "1",
        "--workdir", str(work), "--json", str(out),
    ])  # fmt: skip
    assert run(args) == 0
    rep = json.loads(out.read_text())
    assert rep["settings"]["images"] == 3 and rep["settings"]["backbone"] == "tiny-clip-64"
    assert "images_per_s_ratio" not in rep  # one worker count: nothing to compare
    (r,) = rep["runs"]
    assert r["workers"] == 1 and r["steps"] == STEPS

    client = MlflowClient(tracking_uri(work))
    step_s = {m.step: m.value for m in client.get_metric_history(r["run_id"], "step_time_s")}
    frac = {m.step: m.value for m in client.get_metric_history(r["run_id"], "data_wait_frac")}
    assert sorted(step_s) == sorted(frac) == list(range(1, STEPS + 1))  # one value per optimizer step
    timed = [s for s in step_s if s > WARMUP]
    assert r["timed_steps"] == len(timed) == STEPS - WARMUP
    total = sum(step_s[s] for s in timed)
    wait = sum(frac[s] * step_s[s] for s in timed)
    assert r["data_wait_frac"] == pytest.approx(wait / total, rel=1e-9)
    assert 0.0 <= r["data_wait_frac"] < 1.0
    assert r["steps_per_s"] == pytest.approx(len(timed) / total, rel=1e-9)
    assert r["images_per_s"] == pytest.approx(len(timed) / total, rel=1e-9)  # batch 1, one worker
    # the steps tile the worker loop's wall time, which lies inside the whole distill call
    assert sum(step_s.values()) < r["distill_wall_s"]
