"""Distillation end to end on a real Ray local cluster (2 CPU workers, DDP over gloo) and a real MLflow sqlite store.

Most tests of this module read the session's one finished distill run (``finished_run``, tests/conftest.py; Ray
Train start-up dominates the time), here called ``resumed``: 2 workers, 6 steps, stopped after step 3 (background decoding in a forkserver loader worker), then continued with
``resume=True`` (decoding in the training process), during which one worker raises once after step 5 and Ray
Train restarts the group from the step-4 checkpoint. Its final weights must equal those of an uninterrupted
naive single-process loop (independent reference); the slow test also compares with an uninterrupted Ray run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.reader import open_cache
from pipeline.cache.spec import CachePairingError
from pipeline.data.imageset import open_imageset
from pipeline.student.format import load_student
from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.train.step import StepRunner
from spar_core.backbones import build_backbone
from tests.builders import FINISHED_DISTILL, FINISHED_RUN, assert_same_trainable, naive_distill

BASE = {k: v for k, v in FINISHED_DISTILL.items() if k not in ("experiment", "register_model")}


@pytest.fixture(scope="module")
def data(paired) -> dict[str, str]:
    return paired


@pytest.fixture(scope="module")
def workdir(finished_run) -> Path:
    return finished_run["wd"]


@pytest.fixture(scope="module")
def resumed(finished_run):
    """The session's finished run (tests/conftest.py): stopped after step 3, resumed, one worker failure."""
    return finished_run["cfg"], finished_run["first"], finished_run["res"]


def _feature_mse(bb, data) -> float:
    """Independent check: mean over the images of MSE(student single pass, cached teacher target)."""
    ims, cache = open_imageset(data["images"]), open_cache(data["cache"])
    errs = []
    with torch.no_grad():
        for rec in ims.records:
            x = bb.normalize(torch.from_numpy(ims.read(rec.key))[None])
            t = torch.from_numpy(np.asarray(cache.features(rec.key), dtype=np.float32))[None]
            errs.append(float((bb.dense(x) - t).pow(2).mean()))
    return float(np.mean(errs))


def test_mismatched_cache_is_refused_before_any_step(data, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    cfg = DistillConfig(images=data["other"], cache=data["cache"], workdir=str(wd), **BASE)
    with pytest.raises(CachePairingError, match="image set"):
        distill(cfg)
    assert not (wd / "ray_results").exists() and not (wd / "mlflow.db").exists()


def test_two_workers_reduce_the_loss(resumed, data) -> None:
    _, _, res = resumed
    assert res.completed and res.steps == 6 == res.total_steps
    base = build_backbone("tiny-clip-64", seed=0)
    student = load_student(res.checkpoint_dir)
    before, after = _feature_mse(base, data), _feature_mse(student, data)
    assert after < 0.9 * before, (before, after)


def test_stopped_resumed_and_failed_run_matches_a_naive_uninterrupted_loop(resumed, data) -> None:
    """DDP + stop + --resume + worker failure/restart == 6 plain uninterrupted steps (no data repeated/skipped,
    optimizer and schedule state carried over)."""
    cfg, _, res = resumed
    ref = naive_distill(data, cfg, world=2)
    assert_same_trainable(_trainable(res.checkpoint_dir), ref, cfg)


def test_only_the_last_blocks_changed(resumed) -> None:
    _, _, res = resumed
    base = build_backbone("tiny-clip-64", seed=0).state_dict()
    trained = load_student(res.checkpoint_dir).state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    last_two = {k for k in base if ".resblocks.2." in k or ".resblocks.3." in k}
    assert changed and changed <= last_two
    assert {k for k in last_two if k.endswith("weight")} & changed  # the blocks really trained


def test_mlflow_run_has_params_metrics_artifacts_and_cache_input(resumed, data, workdir) -> None:
    from mlflow import MlflowClient

    from pipeline.common.tracking import tracking_uri

    cfg, _, res = resumed
    assert res.tracking_uri == tracking_uri(workdir) and res.tracking_uri.startswith("sqlite:")
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    for name in ("lr", "trainable_blocks", "workers", "seed", "images", "cache", "precision", "total_steps"):
        assert name in params, name
    assert float(params["lr"]) == cfg.lr and params["total_steps"] == "6"
    cache = open_cache(data["cache"])
    tags = run.data.tags
    assert tags["cache_fingerprint"] == cache.fingerprint
    assert tags["imageset_fingerprint"] == open_imageset(data["images"]).fingerprint
    assert tags["backbone"] == "tiny-clip-64" and tags["weights_id"] == "random:tiny-clip-64:seed0"
    assert tags["git_commit"]
    for key in ("loss", "lr", "images_per_s", "data_wait_frac"):
        hist = client.get_metric_history(res.run_id, key)
        assert sorted({m.step for m in hist}) == [1, 2, 3, 4, 5, 6], key
    lrs = {m.step: m.value for m in client.get_metric_history(res.run_id, "lr")}
    assert lrs[1] == pytest.approx(cfg.lr / 2) and lrs[2] == pytest.approx(cfg.lr)  # warm-up
    epoch_losses = client.get_metric_history(res.run_id, "epoch_loss")
    assert sorted(m.step for m in epoch_losses) == [0, 1]  # 6 images / 2 workers = 3 steps per epoch
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"resolved_config.json", "loss_curve.png"} <= arts
    # the finished student is a registered pyfunc model whose artifacts are the checkpoint files
    import mlflow

    model_uri = tags["registered_model"]  # models:/spar-student/<version>
    # MLflow resolves models:/ URIs with the global registry (= tracking)
    mlflow.set_tracking_uri(res.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, tracking_uri=res.tracking_uri,
                                                       registry_uri=res.tracking_uri))  # fmt: skip
    (ckpt,) = (local / "artifacts").iterdir()  # the checkpoint directory, stored under its own name
    assert {"student.safetensors", "backbone.json", "checksums.json"} <= {p.name for p in ckpt.iterdir()}
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    cache_input = inputs[f"teacher-cache-{cache.fingerprint[:12]}"]
    assert cache_input.dataset.digest == cache.fingerprint[:36]
    assert cache.path in cache_input.dataset.source
    assert {t.key: t.value for t in cache_input.tags}["mlflow.data.context"] == "training"


def test_resume_continues_the_run_and_the_failure_was_recovered(resumed, workdir) -> None:
    _, first, second = resumed
    assert not first.completed and first.steps == 3
    assert second.completed and second.steps == 6 and second.run_id == first.run_id
    marker = workdir / "distill" / FINISHED_RUN / "fail_at_step_5.done"
    assert marker.exists(), "the injected failure never fired"
    from mlflow import MlflowClient

    run = MlflowClient(second.tracking_uri).get_run(second.run_id)
    assert run.info.status == "FINISHED" and run.data.tags.get("resumed") == "true"
    assert run.data.tags.get("resume.changed.loader_workers") == "0"


@pytest.mark.slow
def test_resumed_run_equals_an_uninterrupted_ray_run(data, workdir, resumed) -> None:
    cfg, _, res = resumed
    straight = dataclasses.replace(
        cfg, run_name="straight", loader_workers=1, experiment="straight", register_model=""
    )  # the session's registered model keeps one version
    ref = distill(straight)
    a, b = _trainable(ref.checkpoint_dir), _trainable(res.checkpoint_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def _trainable(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(ckpt_dir) / "student.safetensors"))


def test_online_teacher_step_matches_the_cached_targets(data) -> None:
    """Online mode computes the same targets the cache holds (cache: fp16 storage of a bf16 teacher)."""
    from pipeline.train.stream import PairedStream, make_loader

    cache = open_cache(data["cache"])
    cfg = DistillConfig(images=data["images"], teacher_online=True, lr=1e-3)
    bb = build_backbone("tiny-clip-64")
    teacher = build_backbone("tiny-clip-64")
    params = [p for p in bb.parameters() if p.requires_grad] or [torch.nn.Parameter(torch.zeros(1))]
    runner = StepRunner(bb, bb, params, cfg, torch.device("cpu"), 1, teacher=teacher, crop=cache.spec.crop,
                        stride=cache.spec.stride)  # fmt: skip
    stream = PairedStream(
        data["images"], data["cache"], seed=0, rank=0, world_size=1, patch_size=16, num_batches=2
    )
    for item in make_loader(stream, 0):
        online = runner.target({}, bb.normalize(item["image"]))
        cached = item["target"].float()
        rel = float((online - cached).norm() / cached.norm())
        assert rel < 0.02, rel
