"""`spar submit` against a real Ray head (token auth on) started by infra/local/start_ray_head.sh.

The submitted jobs run `python -m jobs.<stage>` from the uploaded working directory; their outputs are compared
with the same command run locally, and refusals (no token, wrong token) are shown for real.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.cluster.submit import (
    build_entrypoint,
    build_runtime_env,
    job_exit_code,
    parse_env_pairs,
    passthrough_env,
    read_auth_token,
    resolve_address,
    split_trailing_options,
)
from pipeline.common.errors import UserError
from tests.conftest import load_photo
from tests.e2e.conftest import ROOT, RayHead, clean_env, http_status, listening_ips, run_spar

# ------------------------------------------------------------------------------------------------ pure parts


def test_entrypoint_quotes_every_argument():
    args = ["--src", "/data/my photos", "--set", "a=b;rm -rf /", "$(whoami)"]
    ep = build_entrypoint("ingest", args)
    assert shlex.split(ep) == ["python", "-m", "jobs.ingest", *args]
    assert shlex.split(build_entrypoint("eval", ["--x"]))[:3] == ["python", "-m", "jobs.evaluate"]
    with pytest.raises(UserError, match="unknown stage 'nope'"):
        build_entrypoint("nope", [])


def test_trailing_submit_options_are_split_from_stage_args():
    opts, stage = split_trailing_options(
        ["src", "--out", "o", "--working-dir", ".", "--no-wait", "--env=A=1", "--", "--no-wait", "x"]
    )
    assert opts == ["--working-dir", ".", "--no-wait", "--env=A=1"]
    assert stage == ["src", "--out", "o", "--no-wait", "x"]
    with pytest.raises(UserError, match="--env needs a value"):
        split_trailing_options(["--env"])


def test_env_pairs_and_passthrough():
    assert parse_env_pairs(["A=1", "B_2=x=y", "C="]) == {"A": "1", "B_2": "x=y", "C": ""}
    for bad in ("NOEQUALS", "=v", "1A=v", "A-B=v"):
        with pytest.raises(UserError, match=re.escape(repr(bad))):
            parse_env_pairs([bad])
    environ = {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_SECRET_ACCESS_KEY": "s",
        "SPAR_CACHE_ROOT": "/mnt/c",
        "HOME": "/root",
        "RAY_AUTH_TOKEN": "t",
        "AWS_REGION": "",
    }
    assert passthrough_env(environ) == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "AWS_SECRET_ACCESS_KEY": "s",
        "SPAR_CACHE_ROOT": "/mnt/c",
    }  # never the Ray token, never unrelated variables, never empty values


def test_runtime_env(tmp_path):
    renv = build_runtime_env(
        ROOT, {"X": "1", "MLFLOW_TRACKING_URI": "override"}, environ={"MLFLOW_TRACKING_URI": "a"}
    )
    assert renv["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "mlruns/", "*.db"} <= set(renv["excludes"])
    env = renv["env_vars"]
    assert env["X"] == "1" and env["MLFLOW_TRACKING_URI"] == "override"
    assert env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] == "0"
    assert env["SPAR_GIT_COMMIT"] not in ("", "unknown")
    assert (
        "MLFLOW_TRACKING_URI"
        not in build_runtime_env(ROOT, pass_env=False, environ={"MLFLOW_TRACKING_URI": "a"})["env_vars"]
    )
    with pytest.raises(UserError, match="not the spar project"):
        build_runtime_env(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        build_runtime_env(tmp_path / "missing")


def test_token_lookup_follows_rays_precedence(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    path_file = tmp_path / "tok"
    path_file.write_text("from-path")
    explicit = tmp_path / "explicit"
    explicit.write_text("from-explicit")
    env = {"HOME": str(home), "RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert read_auth_token(str(explicit), env) == "from-explicit"
    assert read_auth_token(None, env) == "from-env"
    assert read_auth_token(None, {**env, "RAY_AUTH_TOKEN": ""}) == "from-path"
    assert read_auth_token(None, {"HOME": str(home)}) == "from-home"
    assert read_auth_token(None, {"HOME": str(tmp_path)}) is None
    with pytest.raises(UserError, match="cannot read"):
        read_auth_token(str(tmp_path / "missing"), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(UserError, match="is empty"):
        read_auth_token(str(tmp_path / "empty"), {})


def test_address_and_exit_codes():
    assert resolve_address("http://h:8265/", {}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://x:1"}) == "http://x:1"
    with pytest.raises(UserError, match="not the GCS address"):
        resolve_address("h:6379", {})
    with pytest.raises(UserError, match="no cluster address"):
        resolve_address(None, {})
    assert job_exit_code("SUCCEEDED", None) == 0
    assert job_exit_code("FAILED", 2) == 2
    assert job_exit_code("FAILED", None) == 1
    assert job_exit_code("STOPPED", 0) == 1


# --------------------------------------------------------------------------------------------- real cluster


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory) -> Path:
    """Three real photographs, shrunk to ~100 px."""
    d = tmp_path_factory.mktemp("tiny-photos")
    for name, size in (("astronaut", (96, 96)), ("coffee", (112, 80)), ("chelsea", (100, 72))):
        Image.fromarray(load_photo(name)).resize(size, Image.BICUBIC).save(d / f"{name}.png")
    return d


INGEST_ARGS = [
    "--set",
    "target_long=128",
    "--set",
    "target_short=96",
    "--set",
    "min_short=48",
    "--shard-size",
    "2",
]


def _banner(output: str) -> dict[str, str]:
    m = re.search(
        r"\[jobs\] spar (\w+) on \S+ \| python (\S+) \| project (\S+) \| cwd (\S+) \| commit (\S+)", output
    )
    assert m, output[-3000:]
    return dict(zip(("command", "python", "project", "cwd", "commit"), m.groups(), strict=True))


def _client_env(monkeypatch, env: dict[str, str]) -> None:
    """Make this process's environment exactly `env` for an in-process `spar` call."""
    for k in list(__import__("os").environ):
        if k not in env:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_head_is_loopback_only_and_refuses_unauthenticated_clients(
    ray_head: RayHead, tiny_photos, tmp_path, monkeypatch, capsys
):
    # the dashboard / Jobs API listens on loopback only
    assert listening_ips(ray_head.dashboard_port) == {"127.0.0.1"}
    # raw HTTP: no token -> 401, wrong token -> 403, right token -> 200
    url = f"{ray_head.address}/api/jobs/"
    assert http_status(url)[0] == 401
    assert http_status(url, {"Authorization": "Bearer not-the-token"})[0] == 403
    assert http_status(url, ray_head.headers())[0] == 200
    jobs_before = len(json.loads(http_status(url, ray_head.headers())[1]))

    empty_home = tmp_path / "home"
    empty_home.mkdir()
    submit = ["submit", "--address", ray_head.address]
    stage = ["ingest", str(tiny_photos), "--out", str(tmp_path / "x")]
    # spar submit without any token (empty HOME, nothing in the environment): refused, nothing submitted. Its own
    # process: Ray's client in a process that ran Ray before (this one, in other tests) sends the token it cached
    r = run_spar([*submit, *stage], clean_env(HOME=str(empty_home)))
    assert r.returncode == 2 and "401 Unauthorized" in r.stderr and "requires a token" in r.stderr, r.stderr[
        -3000:
    ]
    _client_env(monkeypatch, clean_env(HOME=str(empty_home)))
    # ... with a wrong token
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    assert main([*submit, "--token-file", str(wrong), *stage]) == 2
    assert "403 Forbidden" in capsys.readouterr().err
    # ... and RAY_AUTH_MODE=token without a token is caught before any request
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert main([*submit, *stage]) == 2
    assert "no Ray auth token found" in capsys.readouterr().err
    assert len(json.loads(http_status(url, ray_head.headers())[1])) == jobs_before  # the refused made no job


def test_submit_ingest_runs_the_stage_from_the_uploaded_project(ray_head: RayHead, tiny_photos, tmp_path):
    out_job = tmp_path / "job"
    # the real `spar` command line, as a user runs it
    r = run_spar(
        [
            "submit",
            "--address",
            ray_head.address,
            "ingest",
            str(tiny_photos),
            "--out",
            str(out_job),
            *INGEST_ARGS,
        ],
        ray_head.client_env(),
    )
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-4000:]
    assert re.search(r"job raysubmit_\w+ SUCCEEDED", output)
    banner = _banner(output)
    # the job ran from the uploaded copy of the project, with the venv's interpreter, and knows our commit
    assert Path(banner["project"]).is_relative_to(ray_head.tmp), banner
    assert Path(banner["python"]).parent == Path(sys.executable).parent
    from pipeline.common.tracking import git_commit

    assert banner["commit"] == git_commit(ROOT)

    # reference: each photo pushed through the stage's per-image function here, without Ray
    from pipeline.data.augment import process_image
    from pipeline.data.config import IngestConfig
    from pipeline.data.imageset import open_imageset

    cfg = IngestConfig(target_long=128, target_short=96, min_short=48, shard_size=2)
    job = open_imageset(out_job)
    assert job.num_shards == 2
    assert sorted(rec.key for rec in job.records) == ["astronaut", "chelsea", "coffee"]
    for i in range(job.num_shards):
        for rec, arr in job.iter_shard(i):
            src = tiny_photos / f"{rec.key}.png"
            expected, _ = process_image(rec.key, str(src), src.read_bytes(), cfg)
            assert np.array_equal(arr, expected), rec.key


def test_failed_job_reports_its_exit_code_and_error(ray_head: RayHead, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "no-such-folder"
    _client_env(monkeypatch, ray_head.client_env())
    rc = main(["submit", "--address", ray_head.address, "ingest", str(missing), "--out", str(tmp_path / "o")])
    output = capsys.readouterr().out
    assert rc == 2, output[-3000:]  # the stage's own exit code (user error), not a generic failure
    assert re.search(r"job raysubmit_\w+ FAILED", output)
    assert "spar ingest: error:" in output and str(missing) in output
    assert not (tmp_path / "o" / "images" / "imageset.json").exists()


@pytest.mark.slow
def test_no_wait_returns_after_submission(ray_head: RayHead, tiny_photos, tmp_path, monkeypatch, capsys):
    from ray.job_submission import JobStatus, JobSubmissionClient

    out = tmp_path / "nw"
    job_id = f"spar-e2e-{tmp_path.name}"
    _client_env(monkeypatch, ray_head.client_env())
    rc = main(
        ["submit", "--address", ray_head.address, "ingest", str(tiny_photos), "--out", str(out), *INGEST_ARGS,
         "--no-wait", "--submission-id", job_id]
    )  # fmt: skip
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert f"job {job_id} submitted" in stdout and "ray job logs" in stdout
    client = JobSubmissionClient(ray_head.address, headers=ray_head.headers())
    status = None
    for _ in range(1500):
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.2)
    assert status == JobStatus.SUCCEEDED
    assert (out / "images" / "imageset.json").is_file()


@pytest.mark.slow
def test_submit_demo_pipeline_logs_to_a_tracking_server(ray_head: RayHead, tmp_path, monkeypatch, capsys):
    """The whole pipeline as one Ray Job, MLflow through the local tracking server (URI forwarded by submit)."""
    import mlflow

    from pipeline.cache.reader import open_cache
    from pipeline.student.format import load_student
    from tests.e2e.conftest import mlflow_server

    work = tmp_path / "work"
    with mlflow_server(tmp_path / "mlflow") as server:
        _client_env(monkeypatch, ray_head.client_env(MLFLOW_TRACKING_URI=server.url))
        rc = main(
            ["submit", "--address", ray_head.address, "--working-dir", str(ROOT), "pipeline",
             "--config", "jobs/configs/demo.toml", "--workdir", str(work),
             "--set", "distill.max_steps=6", "--set", "distill.checkpoint_every=3"]
        )  # fmt: skip
        output = capsys.readouterr().out
        assert rc == 0, output[-5000:]
        m = re.search(r"\[spar pipeline\] done: cache (\S+), student (\S+), MLflow run (\w+)", output)
        assert m, output[-3000:]
        cache_path, ckpt, run_id = m.groups()
        # outputs on the (shared) filesystem: a complete cache, a loadable student
        assert Path(cache_path).is_relative_to(work) and Path(ckpt).is_relative_to(work)
        assert open_cache(cache_path).is_complete()
        student = load_student(ckpt)
        assert student.name == "tiny-clip-64"
        # the runs are on the tracking server, not in an embedded store of the job
        client = mlflow.MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params.get("trainable_blocks") == "2" or any(
            k.endswith("trainable_blocks") and v == "2" for k, v in run.data.params.items()
        )
        assert "loss" in run.data.metrics or any("loss" in k for k in run.data.metrics)
        exp = client.get_experiment(run.info.experiment_id)
        assert exp.name == "spar-demo"
        assert len(client.search_runs([exp.experiment_id])) >= 2  # distill + eval
        assert not (work / "mlflow.db").exists()


@pytest.mark.slow
def test_gcs_port_refuses_drivers_without_the_right_token(ray_head: RayHead, tmp_path):
    """Ray's core port listens on every interface (Ray maps 127.0.0.1 to the routable IP); the token guards it."""
    import subprocess

    empty_home = tmp_path / "home"
    empty_home.mkdir()
    code = (
        "import ray\n"
        f"ray.init(address='127.0.0.1:{ray_head.gcs_port}', log_to_driver=False)\n"
        "print('CONNECTED', ray.cluster_resources())\n"
    )
    for extra in ({"RAY_AUTH_TOKEN": "f" * 64, "RAY_AUTH_MODE": "token"}, {}):
        env = clean_env(HOME=str(empty_home), RAY_TMPDIR=str(tmp_path), **extra)
        try:
            r = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
            )
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:  # still retrying after 2 minutes: not connected either
            out, rc = f"{e.stdout or ''}{e.stderr or ''}", None
        assert "CONNECTED" not in out, (extra, out[-3000:])
        assert rc != 0 and "InvalidAuthToken" in out, (extra, out[-3000:])  # refused by the server's auth
    # the right token connects (the control for the two refusals above)
    env = clean_env(HOME=str(empty_home), RAY_TMPDIR=str(tmp_path), RAY_AUTH_MODE="token",
                    RAY_AUTH_TOKEN=ray_head.token_file.read_text().strip())  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "CONNECTED" in r.stdout, (r.stdout + r.stderr)[-3000:]
