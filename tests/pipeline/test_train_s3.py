"""``spar distill`` with all of its state on S3 (moto's S3 server on 127.0.0.1; credentials and endpoint reach
s3fs, Ray and every Ray Train worker through the environment only).

Quick tests (no Ray Train): a student exported to S3 loads to the same weights as its local copy and a tampered or
half-written one is refused; the resume helpers (newest checkpoint, Ray's snapshot naming a deleted checkpoint, the
continuation directory's name) read an S3 run directory as they read a local one; a workdir URL without an MLflow
tracking server is refused by the CLI with exit code 2 before anything starts.

Slow tests (``spar distill`` as a user runs it, in its own process with its own Ray): the same short distillation
with ``--workdir s3://…`` and ``storage_path=s3://…`` ends with the same weights as the run on local disk (the
independent reference, run in this process) and writes nothing locally; stopped on S3, its newest checkpoint
deleted, and resumed with ``--resume``, it continues from the newest checkpoint left on S3 (in a new Ray Train
directory there) and again ends with the local run's weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from pipeline.common import storage
from pipeline.student.format import (
    CHECKSUMS_FILE,
    STUDENT_FILE,
    CheckpointError,
    StudentMeta,
    load_student,
    read_backbone_info,
)
from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.train.export import export_student
from pipeline.train.run_dir import RAY_SNAPSHOT_FILE, checkpoints_newest_first, newest_good, snapshot_missing
from pipeline.train.run_record import continuation_name
from pipeline.train.state import TrainState, checkpoint_dir_name, save_training_checkpoint
from tests.builders import moto_s3, perturbed_student

BUCKET = "spar-train"
STEPS = 4
# one worker, fp32, a checkpoint every step: small and exactly reproducible on CPU
BASE = dict(precision="fp32", workers=1, trainer="ray", max_steps=STEPS, checkpoint_every=1, keep_checkpoints=3, lr=1e-3,
            seed=3, shuffle_buffer=4, log_every=1, loader_workers=0, register_model="")  # fmt: skip
SPAR = [sys.executable, "-c", "from pipeline.cli import entry; entry()"]
# the developer's cluster and tracking settings must not reach the `spar` processes started here
SCRUB = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with bucket ``BUCKET``; yields (s3fs filesystem, environment variables)."""
    with moto_s3(BUCKET) as (fs, env):
        yield fs, env


def _spar_env(s3_env: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB and not k.startswith("PYTEST_")}
    return {**env, **s3_env, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0", "TQDM_DISABLE": "1", **extra}


def _spar(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([*SPAR, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _tiny_checkpoint(d: Path, step: int, seed: int = 0) -> Path:
    bb = perturbed_student(scale=0.01, seed=seed + step)
    return save_training_checkpoint(
        bb, d / checkpoint_dir_name(step), TrainState(step=step), StudentMeta(2, {"step": step})
    )


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


# ---------------------------------------------------------------------------------------------- quick


def test_student_exported_to_s3_loads_as_its_local_copy_and_a_bad_one_is_refused(s3, tmp_path: Path) -> None:
    fs, _ = s3
    src = _tiny_checkpoint(tmp_path / "run", 2)
    local = export_student(src, str(tmp_path / "students" / "s"), {"run_id": "r", "experiment_id": "1",
                                                                   "tracking_uri": "sqlite:///x.db"})  # fmt: skip
    url = f"s3://{BUCKET}/quick/students/s"
    assert export_student(src, url) == url
    remote_files = {p.rsplit("/", 1)[-1] for p in fs.find(f"{BUCKET}/quick/students/s")}
    assert {STUDENT_FILE, "backbone.json", "config.json", CHECKSUMS_FILE} <= remote_files
    a, b = load_student(local).state_dict(), load_student(url).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the remote tensors are the training checkpoint's, byte for byte (read without the project's loader)
    assert fs.cat(f"{BUCKET}/quick/students/s/{STUDENT_FILE}") == (src / STUDENT_FILE).read_bytes()
    # a flipped byte on S3 is caught by the checksums; a student without checksums.json is incomplete
    raw = bytearray(fs.cat(f"{BUCKET}/quick/students/s/{STUDENT_FILE}"))
    raw[-5] ^= 0xFF
    fs.pipe(f"{BUCKET}/quick/students/s/{STUDENT_FILE}", bytes(raw))
    with pytest.raises(CheckpointError, match=f"{url}: {STUDENT_FILE} does not match its checksum"):
        load_student(url)
    fs.rm(f"{BUCKET}/quick/students/s/{CHECKSUMS_FILE}")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_student(url)
    with pytest.raises(CheckpointError, match="no such directory"):
        load_student(f"s3://{BUCKET}/quick/students/none")
    # exporting again replaces it whole (the stale corrupt file is gone)
    export_student(src, url)
    assert torch.equal(load_student(url).state_dict()[next(iter(a))], a[next(iter(a))])


def test_backbone_info_and_lineage_of_a_student_on_s3_read_as_the_local_copy(s3, tmp_path: Path) -> None:
    """What evaluations read from a student besides its weights (found by the cluster pipeline test: the fidelity
    eval of a student on S3 failed with "missing backbone.json")."""
    import mlflow

    from pipeline.common.tracking import training_run_of

    uri = f"sqlite:///{tmp_path / 'lineage.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("lineage"))
    lineage = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tracking_uri": uri}
    src = _tiny_checkpoint(tmp_path / "run", 2)
    local = export_student(src, str(tmp_path / "students" / "s"), lineage)
    url = export_student(src, f"s3://{BUCKET}/info/students/s", lineage)
    assert read_backbone_info(url) == read_backbone_info(local)
    assert read_backbone_info(url)["name"] == "tiny-clip-64"
    assert (
        training_run_of(url, uri) == training_run_of(local, uri) == (run.info.run_id, run.info.experiment_id)
    )
    with pytest.raises(CheckpointError, match="missing backbone.json"):
        read_backbone_info(f"s3://{BUCKET}/info/students/none")


def test_eval_load_model_reads_a_student_on_s3(s3, tmp_path: Path) -> None:
    from pipeline.eval.model import InferenceError, load_model

    src = _tiny_checkpoint(tmp_path / "run", 3)
    url = export_student(src, f"s3://{BUCKET}/eval/students/s")
    local = export_student(src, str(tmp_path / "s"))
    a, b = load_model(checkpoint=local).state_dict(), load_model(checkpoint=url).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InferenceError, match="no such directory"):
        load_model(checkpoint=f"s3://{BUCKET}/eval/students/missing")


def test_resume_helpers_read_an_s3_run_directory_as_a_local_one(s3, tmp_path: Path, capsys) -> None:
    """Checkpoints 1..3 (3 corrupt) and Ray's snapshot naming a deleted step 4, uploaded to S3: the newest good
    one, the missing one and the continuation name come out as from the same directory on local disk."""
    fs, _ = s3
    run = tmp_path / "ray_results" / "run"
    for step in (1, 2, 3):
        _tiny_checkpoint(run, step)
    (run / checkpoint_dir_name(3) / "train_state.json").write_text("{not json")
    snap = {"checkpoints": [{"checkpoint_dir_name": checkpoint_dir_name(s)} for s in (2, 3, 4)]}
    (run / RAY_SNAPSHOT_FILE).write_text(json.dumps(snap))
    storage.put_dir(str(tmp_path / "ray_results"), f"s3://{BUCKET}/resume/ray_results")
    url = f"s3://{BUCKET}/resume/ray_results/run"

    assert snapshot_missing(url) == snapshot_missing(str(run)) == [checkpoint_dir_name(4)]
    remote = checkpoints_newest_first([url])
    assert remote == [f"{url}/{checkpoint_dir_name(s)}" for s in (3, 2, 1)]
    assert [p.rsplit("/", 1)[-1] for p in remote] == [
        Path(p).name for p in checkpoints_newest_first([str(run)])
    ]
    logged: list[str] = []
    assert newest_good(remote, log=logged.append) == f"{url}/{checkpoint_dir_name(2)}"
    assert len(logged) == 1 and f"{url}/{checkpoint_dir_name(3)} is unusable" in logged[0]
    name = continuation_name(f"s3://{BUCKET}/resume/ray_results", "run", remote[1])
    assert name == "run.resumed-step000000002"
    fs.pipe(f"{BUCKET}/resume/ray_results/{name}/x", b"taken")
    assert continuation_name(f"s3://{BUCKET}/resume/ray_results", "run", remote[1]) == f"{name}-2"


def test_s3_workdir_without_a_tracking_server_is_refused_before_anything_starts(
    s3, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Through the CLI's ``main(argv)`` in-process (the one ``spar`` process per command is in
    tests/reliability/test_bad_input.py)."""
    from tests.reliability.conftest import run_main

    fs, _env = s3
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = run_main(["distill", "--images", str(tmp_path / "none"), "--cache", str(tmp_path / "none"),
                    "--workdir", f"s3://{BUCKET}/no-tracking"], capsys)  # fmt: skip
    assert res.rc == 2, res.err[-3000:]
    assert f"--workdir s3://{BUCKET}/no-tracking needs a tracking server: set MLFLOW_TRACKING_URI" in res.err
    assert "Traceback" not in res.err
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/no-tracking") and list(cwd.iterdir()) == []


# ------------------------------------------------------------------------------------- slow: Ray Train


@pytest.fixture(scope="module")
def data(paired) -> dict[str, str]:
    return paired


@pytest.fixture(scope="module")
def local_run(data, tmp_path_factory: pytest.TempPathFactory):
    """The reference: the same distillation on local disk, in this process (the session's Ray cluster)."""
    wd = tmp_path_factory.mktemp("s3-local-ref")
    res = distill(DistillConfig(images=data["images"], cache=data["cache"], workdir=str(wd), run_name="ref",
                                **BASE))  # fmt: skip
    assert res.completed and res.steps == STEPS
    return load_file(str(Path(res.checkpoint_dir) / STUDENT_FILE))


def _distill_args(data: dict[str, str], workdir: str, run: str, *extra: str) -> list[str]:
    sets = [f"{k}={v}" for k, v in BASE.items()] + [f"run_name={run}", f"storage_path={workdir}/ray_results"]
    return ["distill", "--images", data["images"], "--cache", data["cache"], "--workdir", workdir,
            *[a for s in sets for a in ("--set", s)], *extra]  # fmt: skip


def _s3_weights(fs, prefix: str, run: str) -> dict[str, torch.Tensor]:
    fs.invalidate_cache()
    return load_safetensors(fs.cat(f"{prefix}/students/{run}/{STUDENT_FILE}"))


@pytest.mark.slow
def test_distill_with_all_state_on_s3_equals_the_run_on_local_disk(
    s3, data, local_run, tmp_path: Path
) -> None:
    fs, env = s3
    workdir, cwd = f"s3://{BUCKET}/work", tmp_path / "cwd"
    run_env = _spar_env(env, MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    res = _spar(_distill_args(data, workdir, "straight"), run_env, cwd)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"student checkpoint: {workdir}/students/straight" in res.stdout
    _assert_same_weights(local_run, _s3_weights(fs, f"{BUCKET}/work", "straight"))
    # everything is in the bucket: Ray Train's run directory and checkpoints, the student, the driver's files
    files = {f.removeprefix(f"{BUCKET}/work/") for f in fs.find(f"{BUCKET}/work")}
    steps = {f.split("/")[2] for f in files if f.startswith("ray_results/straight/checkpoint_step")}
    assert steps == {checkpoint_dir_name(s) for s in (2, 3, 4)}  # keep_checkpoints=3
    assert f"ray_results/straight/{RAY_SNAPSHOT_FILE}" in files
    assert {f"students/straight/{f}" for f in (STUDENT_FILE, "backbone.json", CHECKSUMS_FILE)} <= files
    assert {"distill/last_run.json", "distill/straight/resolved_config.json"} <= files
    assert load_student(f"{workdir}/students/straight").name == "tiny-clip-64"
    # ... and nothing local: no folder named like the prefix (s3:/..., spar-train/...) in the process's folder
    made = [str(p.relative_to(cwd)) for p in cwd.rglob("*")]
    assert not [p for p in made if p.startswith(("s3:", BUCKET))], made


@pytest.mark.slow
def test_resume_from_checkpoints_on_s3_equals_the_uninterrupted_run(
    s3, data, local_run, tmp_path: Path
) -> None:
    """Stopped after step 3 (checkpoints 1-3 on S3), the newest checkpoint deleted from S3: --resume says so,
    continues from step 2 in a new Ray Train directory on S3 and ends with the uninterrupted run's weights."""
    from mlflow import MlflowClient

    fs, env = s3
    workdir, cwd = f"s3://{BUCKET}/resume-run", tmp_path / "cwd"
    db = tmp_path / "mlflow.db"
    run_env = _spar_env(env, MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    first = _spar(_distill_args(data, workdir, "r", "--set", "stop_at_step=3"), run_env, cwd)
    assert first.returncode == 0, first.stderr[-4000:]
    assert "stopped before the last step" in first.stdout
    run_dir = f"{BUCKET}/resume-run/ray_results/r"
    fs.invalidate_cache()
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(run_dir)} >= {checkpoint_dir_name(s) for s in (1, 2, 3)}
    fs.rm(f"{run_dir}/{checkpoint_dir_name(3)}", recursive=True)

    second = _spar(_distill_args(data, workdir, "r", "--resume"), run_env, cwd)
    assert second.returncode == 0, second.stderr[-4000:]
    gone, start = f"s3://{run_dir}/{checkpoint_dir_name(3)}", f"s3://{run_dir}/{checkpoint_dir_name(2)}"
    assert f"checkpoint {gone} no longer exists: skipped; resuming from {start}" in second.stderr
    _assert_same_weights(local_run, _s3_weights(fs, f"{BUCKET}/resume-run", "r"))
    fs.invalidate_cache()
    cont = f"{BUCKET}/resume-run/ray_results/r.resumed-step{2:09d}"
    assert checkpoint_dir_name(STEPS) in {p.rsplit("/", 1)[-1] for p in fs.ls(cont)}
    record = json.loads(fs.cat(f"{BUCKET}/resume-run/distill/last_run.json"))
    assert record["continuations"]["r"] == [{"ray_run": f"r.resumed-step{2:09d}", "from": start}]
    # one MLflow run; steps 1-2 trained once, step 3 again after the lost checkpoint, step 4 once: resumed, not
    # restarted from scratch
    client = MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs(client.get_experiment_by_name("spar-distill").experiment_id)
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert logged == [1, 2, 3, 3, 4] and run.info.status == "FINISHED"
