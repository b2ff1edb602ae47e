"""What a user finds in MLflow after precompute -> distill -> eval, on a real sqlite store and a real Ray cluster.

One small pipeline (tiny-clip-64, 6 steps, 1 worker) is run once for the whole test session
(``finished_run`` in tests/conftest.py, shared with the other tests that only read a finished run); the tests read
the store back:
experiments are model-training experiments; fidelity and speed runs are children of the training run and copy
their headline metrics onto it; every stage's run has system metrics; precompute records what the cache cost
(checked against an independent count of windows and of bytes on disk); parameters carry one resolved value per
name; the student is a registered pyfunc model whose features equal the project's own forward; ``spar runs``
shows the training runs with their eval metrics within 120 columns.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import open_cache
from pipeline.data.imageset import open_imageset
from tests.builders import FINISHED_EXPERIMENT, FINISHED_MODEL

EXP = FINISHED_EXPERIMENT
MODEL = FINISHED_MODEL


@pytest.fixture
def pipeline_runs(finished_run) -> dict:
    """The session's finished run (tests/conftest.py): precompute -> distill -> fidelity and speed evals."""
    return finished_run


def _client(p: dict):
    import mlflow

    return mlflow.MlflowClient(p["res"].tracking_uri)


def _runs(p: dict, stage: str) -> list:
    c = _client(p)
    exp = c.get_experiment_by_name(EXP)
    return c.search_runs([exp.experiment_id], filter_string=f"tags.`spar.stage` = '{stage}'")


def test_experiments_are_model_training_experiments(pipeline_runs) -> None:
    c = _client(pipeline_runs)
    for name in (EXP, "spar-eval"):
        assert c.get_experiment_by_name(name).tags["mlflow.experimentKind"] == "custom_model_development"


def test_eval_runs_are_children_of_the_training_run_and_copy_their_metrics(pipeline_runs) -> None:
    res, c = pipeline_runs["res"], _client(pipeline_runs)
    evals = _runs(pipeline_runs, "eval")
    kinds = {r.data.tags["spar.eval"]: r for r in evals}
    assert set(kinds) == {"fidelity", "speed"}  # in the training run's experiment, not in spar-eval
    for r in evals:
        assert r.data.tags["mlflow.parentRunId"] == res.run_id
    train = c.get_run(res.run_id).data.metrics
    fid = kinds["fidelity"].data.metrics
    for k in ("student_mse", "baseline_mse", "student_cosine", "mse_ratio"):
        assert train[f"fidelity/{k}"] == pytest.approx(fid[k])
    assert fid["mse_ratio"] == pytest.approx(
        pipeline_runs["fid"]["student"]["mse"] / pipeline_runs["fid"]["baseline"]["mse"]
    )
    slowdowns = {k: v for k, v in kinds["speed"].data.metrics.items() if k.startswith("slowdown_")}
    assert slowdowns and all(train[f"speed/{k}"] == pytest.approx(v) for k, v in slowdowns.items())


def test_system_metrics_on_precompute_distill_and_eval_runs(pipeline_runs) -> None:
    runs = [
        *_runs(pipeline_runs, "precompute"),
        *_runs(pipeline_runs, "distill"),
        *_runs(pipeline_runs, "eval"),
    ]
    assert len(runs) == 4
    for r in runs:
        sysm = {k for k in r.data.metrics if k.startswith("system/")}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= sysm, (
            r.data.tags["spar.stage"],
            sorted(r.data.metrics),
        )


def _naive_windows(length: int, crop: int, stride: int) -> int:
    """Window starts along one axis, counted by hand (0, s, 2s, ... plus the boundary window)."""
    if length <= crop:
        return 1
    starts = set(range(0, length - crop + 1, stride)) | {length - crop}
    return len(starts)


def test_precompute_run_records_what_the_cache_cost(pipeline_runs) -> None:
    (run,) = _runs(pipeline_runs, "precompute")
    cache = open_cache(pipeline_runs["held_cache"])
    ims = open_imageset(pipeline_runs["data"]["other"])
    m = run.data.metrics
    assert run.data.tags["cache_fingerprint"] == cache.fingerprint
    assert m["images"] == len(ims.records) and m["shards_computed"] == ims.num_shards
    windows = sum(_naive_windows(r.height, 64, 32) * _naive_windows(r.width, 64, 32) for r in ims.records)
    assert m["windows"] == windows
    on_disk = sum(
        f.stat().st_size
        for f in (Path(cache.path) / "shards").rglob("*")
        if f.is_file() and f.parent.name != "shards"
    )  # fmt: skip  (the .zarr stores, not the .done markers)
    assert m["bytes_written"] == on_disk > 0
    hist = _client(pipeline_runs).get_metric_history(run.info.run_id, "shard_seconds")
    assert sorted(h.step for h in hist) == list(range(ims.num_shards)) and all(h.value > 0 for h in hist)
    assert m["compute_seconds"] == pytest.approx(sum(h.value for h in hist))


def test_one_name_per_parameter_with_the_resolved_value(pipeline_runs) -> None:
    (run,) = _runs(pipeline_runs, "distill")
    params = run.data.params
    assert not [k for k in params if k.endswith("_resolved")]
    assert (
        params["student"] == "tiny-clip-64"
        and params["backbone_seed"] == "0"
        and params["pretrained"] == "none"
    )
    assert params["crop"] == "64" and params["stride"] == "32"  # the cache's, not the config's 0
    speed = next(r for r in _runs(pipeline_runs, "eval") if r.data.tags["spar.eval"] == "speed")
    assert speed.data.params["crop"] == "64" and "speed.crop" not in speed.data.params
    # the strides measured (128 > the crop 64 is left out), not the request (32, 128)
    assert speed.data.params["strides"] in ("(32,)", "[32]")
    assert {k.split("_")[1] for k in speed.data.metrics if k.startswith("slowdown_")} == {"s32"}


def test_student_is_a_registered_pyfunc_model_giving_the_projects_features(pipeline_runs) -> None:
    import mlflow

    from pipeline.student.format import load_student
    from spar_core.segment import predict

    res = pipeline_runs["res"]
    mlflow.set_tracking_uri(res.tracking_uri)
    versions = _client(pipeline_runs).search_model_versions(f"name = '{MODEL}'")
    assert [v.run_id for v in versions] == [res.run_id]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{versions[0].version}")
    meta = model.metadata.metadata
    assert meta["base_backbone"] == "tiny-clip-64" and meta["cache_fingerprint"] == open_cache(
        pipeline_runs["data"]["cache"]).fingerprint  # fmt: skip
    sig = model.metadata.signature
    assert sig.inputs.inputs[0].shape == (-1, -1, 3) and sig.outputs.inputs[0].shape == (-1, -1, 32)
    img = open_imageset(pipeline_runs["data"]["other"]).read("coffee")  # (H, W, 3), H and W multiples of 16
    got = model.predict(np.asarray(img))
    bb = load_student(res.checkpoint_dir)  # the project's own loader and forward, on the exported checkpoint
    with torch.no_grad():
        want = bb.dense(bb.normalize(torch.from_numpy(np.array(img))[None]))[0].numpy()  # (H/p, W/p, D)
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    base = load_student(res.checkpoint_dir)
    assert not np.allclose(want, _untrained(img), atol=1e-4), "the model must be the trained student"
    labels = model.predict(np.asarray(img), params={"output": "segmentation", "classes": "sky;cat;person"})
    from pipeline.eval.model import build_text_classifier

    clf = build_text_classifier(base, [["sky"], ["cat"], ["person"]])
    ref = predict(torch.from_numpy(want)[None], clf, out_size=img.shape[:2], logit_scale=40.0)[0].numpy()
    assert labels.shape == img.shape[:2] and (labels == ref).mean() > 0.999


def _untrained(img: np.ndarray) -> np.ndarray:
    from spar_core.backbones import build_backbone

    bb = build_backbone("tiny-clip-64", seed=0)
    with torch.no_grad():
        return bb.dense(bb.normalize(torch.from_numpy(np.array(img))[None]))[0].numpy()


def test_images_on_runs(pipeline_runs) -> None:
    c = _client(pipeline_runs)
    res = pipeline_runs["res"]
    train_images = {a.path for a in c.list_artifacts(res.run_id, "images")}
    assert any("loss_curve" in p for p in train_images), train_images
    fid = next(r for r in _runs(pipeline_runs, "eval") if r.data.tags["spar.eval"] == "fidelity")
    pca = [a.path for a in c.list_artifacts(fid.info.run_id, "pca")]
    assert len(pca) == 1 and pca[0].endswith("_pca.png")


def test_runs_table_shows_training_runs_with_eval_metrics_in_120_columns(pipeline_runs) -> None:
    from pipeline.cli import main

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert (
            main(["runs", "--workdir", str(pipeline_runs["wd"]), "--experiment", EXP, "--width", "120"]) == 0
        )
    lines = buf.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 120
    header = lines[0].split()
    assert header[:2] == ["run", "name"] and "student_mse" in header and "mse_ratio" in header
    body = [line for line in lines[2:] if line and not line.startswith("(")]
    assert len(body) == 1 and body[0].startswith(pipeline_runs["res"].run_id[:8])  # the training run only
