"""Evaluation: mIoU accounting, an eval run logged to a real MLflow sqlite store, Ray workers, sliding mode,
the speed report, the runs table and bad input. Tiny random backbone (tiny-clip-64), tiny fake VOC layout."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.common.config import ConfigError, config_from_cli
from pipeline.data.datasets import DatasetError
from pipeline.eval.benchmark import evaluate
from pipeline.eval.config import EvalConfig, EvalError, SpeedConfig
from pipeline.eval.model import resolve_protocol
from pipeline.eval.runs import RunsError, compare_runs, format_table
from pipeline.eval.speed import speed_report
from spar_core.metrics import IoUAccumulator
from tests.pipeline.test_datasets import make_voc

LABELS = {
    "2007_000001": np.array(
        [[0, 0, 0, 5, 5, 5], [0, 0, 255, 5, 5, 5], [15, 15, 15, 0, 0, 0], [15, 15, 15, 0, 0, 0]]
    ),
    "2007_000002": np.array(
        [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1], [255, 255, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
    ),
    "2007_000003": np.array([[7, 7, 7, 7, 7, 7], [7, 7, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
}


@pytest.fixture(autouse=True)
def _fresh_tracking_env():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which pipeline.common.tracking would then prefer over
    each test's own workdir: clear it around every test."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _upscale(lab: np.ndarray, k: int = 10) -> np.ndarray:
    return np.kron(lab, np.ones((k, k), dtype=lab.dtype)).astype(np.uint8)  # (40, 60)


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    make_voc(root, {k: _upscale(v) for k, v in LABELS.items()})
    return root


def _cfg(voc_root: Path, workdir: Path, **kw) -> EvalConfig:
    base = dict(
        dataset="voc21", data_root=str(voc_root), backbone="tiny-clip-64", baseline=True, short_side=64,
        templates="simple", workdir=str(workdir), experiment="eval-test", overlays=2,
    )  # fmt: skip
    base.update(kw)
    return EvalConfig(**base)


def test_miou_equals_hand_computed_confusion_matrix():
    # two chunks, as two Ray tasks would return them; 255 = ignore, 7 = out of range for 3 classes
    a, b = IoUAccumulator(3), IoUAccumulator(3)
    a.update(np.array([0, 1, 1, 1, 2, 0]), np.array([0, 0, 1, 1, 255, 2]))
    b.update(np.array([2, 0, 1, 1]), np.array([2, 2, 1, 7]))
    got = IoUAccumulator(3)  # the driver's merge of the chunks' counts
    for part in (a, b):
        got.merge(part)
    # confusion matrix (rows label, cols pred): [[1,1,0],[0,2,0],[1,0,1]] + [[0,0,0],[0,1,0],[1,0,1]]
    #   = [[1,1,0],[0,3,0],[2,0,1]]; inter = diag = [1,3,1]; union = row + col - diag = [2+3-1, 3+4-3, 3+1-1]
    np.testing.assert_array_equal(got.intersection, [1, 3, 1])
    np.testing.assert_array_equal(got.union, [4, 4, 3])
    np.testing.assert_array_equal(got.label_area, [2, 3, 3])
    np.testing.assert_allclose(got.iou() * 100, [25.0, 75.0, 100 / 3])
    assert got.miou() * 100 == pytest.approx((25 + 75 + 100 / 3) / 3)
    # a class absent from labels and predictions is NaN and left out of the mean
    c = IoUAccumulator(4)
    c.update(np.array([0, 1]), np.array([0, 0]))
    got = IoUAccumulator(4)
    got.merge(c)
    assert math.isnan(got.iou()[2]) and got.miou() * 100 == pytest.approx((50 + 0) / 2)


def test_protocol_defaults():
    cfg = EvalConfig(dataset="voc21")
    p = resolve_protocol(cfg, "maskclip", 224, 16)
    assert (p.short_side, p.long_side, p.logit_scale, p.prob_thd, p.area_thd) == (672, 2048, 65.0, 0.1, 0.1)
    p = resolve_protocol(cfg, "siglip2-pool-bypass", 512, 16)
    assert (p.prob_thd, p.area_thd) == (0.0, 0.0)
    p = resolve_protocol(EvalConfig(dataset="context60"), "siglip2-pool-bypass", 512, 16)
    assert (p.logit_scale, p.prob_thd, p.area_thd) == (50.0, 0.1, 0.0)
    p = resolve_protocol(EvalConfig(dataset="cityscapes"), "maskclip", 224, 16)
    assert (p.short_side, p.logit_scale, p.prob_thd, p.crop) == (1024, 40.0, 0.0, 224)
    p = resolve_protocol(
        EvalConfig(dataset="ade20k", logit_scale=10, prob_thd=0.3, stride=24), "maskclip", 224, 16
    )
    assert (p.logit_scale, p.prob_thd, p.stride) == (10.0, 0.3, 24)


def test_eval_run_logs_metrics_and_artifacts(voc_root, tmp_path):
    # prob_thd = 1.0: every pixel falls back to class 0 (softmax probabilities are < 1), so the expected
    # IoUs follow from the labels alone: IoU_0 = |label 0| / |valid|, 0 for other labelled classes.
    res = evaluate(_cfg(voc_root, tmp_path, prob_thd=1.0, run_name="thd1"))
    labs = [_upscale(v) for v in LABELS.values()]
    valid = sum(int((lb != 255).sum()) for lb in labs)
    zero = sum(int((lb == 0).sum()) for lb in labs)
    present = {int(c) for lb in labs for c in np.unique(lb) if c != 255}
    expected = [zero / valid * 100] + [0.0] * (len(present) - 1)
    assert res["images"] == 3
    assert res["miou"] == pytest.approx(np.mean(expected))
    assert res["iou"][0] == pytest.approx(expected[0])
    assert res["iou"][5] == 0.0 and res["iou"][3] is None
    assert res["classes"][0] == "background" and res["classes"][1] == "aeroplane"

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["eval-test"])
    assert len(runs) == 1
    run = mlflow.get_run(runs.run_id[0])
    m = run.data.metrics
    assert m["mIoU"] == pytest.approx(res["miou"])
    assert m["iou/background"] == pytest.approx(expected[0])
    assert m["num_images"] == 3 and m["images_per_s"] > 0
    # one name per parameter, holding the resolved value (the protocol under the config's own names)
    assert run.data.params["dataset"] == "voc21" and run.data.params["prob_thd"] == "1.0"
    assert not any(k.startswith("protocol.") or k.endswith("_resolved") for k in run.data.params)
    assert run.data.params["model.weights_id"] == "random:tiny-clip-64:seed0"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"per_class_iou.json", "per_class_iou.txt", "results.json", "overlays"} <= arts
    pngs = mlflow.MlflowClient().list_artifacts(run.info.run_id, "overlays")
    assert sorted(Path(a.path).name for a in pngs) == ["2007_000001.png", "2007_000002.png"]
    local = Path(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="per_class_iou.json")
    )
    table = json.loads(local.read_text())
    rows = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
    assert rows["class"][0] == "background" and rows["iou"][0] == pytest.approx(expected[0])


@pytest.mark.slow
@pytest.mark.ci
def test_eval_ray_workers_equal_local(voc_root, tmp_path, ray_up):
    local = evaluate(_cfg(voc_root, tmp_path, mlflow=False, prob_thd=0.0, area_thd=0.0))
    dist = evaluate(_cfg(voc_root, tmp_path, mlflow=False, prob_thd=0.0, area_thd=0.0, workers=2))
    assert dist["intersection"] == local["intersection"] and dist["union"] == local["union"]
    assert dist["images"] == 3 and sum(dist["label_pixels"]) == sum(local["label_pixels"])
    assert dist["miou"] == pytest.approx(local["miou"])


def test_eval_sliding_any_stride(voc_root, tmp_path):
    # the teacher row: sliding window at an odd stride (40x60 -> 64x96 at short side 64, crop 64)
    for stride in (7, 24):
        sl = evaluate(_cfg(voc_root, tmp_path, mlflow=False, mode="sliding", stride=stride, max_images=2))
        assert sl["images"] == 2 and sl["protocol"]["stride"] == stride and 0 <= sl["miou"] <= 100
        assert sum(sl["label_pixels"]) == sum(
            int((_upscale(v) != 255).sum()) for v in list(LABELS.values())[:2]
        )


def test_speed_report_and_runs_table(voc_root, tmp_path):
    res = speed_report(SpeedConfig(backbone="tiny-clip-64", resolutions=(64, 128), repeats=1,
                                  strides=(224, 64, 32, 7), workdir=str(tmp_path), experiment="speed-test",
                                  out=str(tmp_path / "out")))  # fmt: skip
    assert res["strides"] == [64, 32, 7] and res["resolutions"] == [64, 128]  # pixels; 224 > crop 64 left out
    assert res["windows"]["7"] == [1, 11 * 11] and all(v > 0 for v in res["single"])
    assert (tmp_path / "out" / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["speed-test"]).iloc[0]
    assert "metrics.sec_sliding_s7_r128" in run and "metrics.slowdown_s64_r128" in run
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)}
    assert {"speed.png", "speed.txt", "speed.json"} <= arts

    # runs table: two benchmark runs that differ in logit_scale
    for scale in (10.0, 50.0):
        evaluate(_cfg(voc_root, tmp_path, logit_scale=scale, max_images=1, overlays=0, experiment="cmp"))
    header, rows = compare_runs("cmp", "mIoU", str(tmp_path), all_runs=True)  # evaluation runs, not training
    assert compare_runs("cmp", "", str(tmp_path))[1] == []  # the default view: training runs only
    assert "logit_scale" in header and "mIoU" in header and "dataset" not in header and len(rows) == 2
    col = header.index("logit_scale")
    assert sorted(r[col] for r in rows) == ["10.0", "50.0"]
    assert "logit_scale" in format_table(header, rows)
    with pytest.raises(RunsError, match="no MLflow experiment named 'nope'; known: .*cmp"):
        compare_runs("nope", "", str(tmp_path))
    with pytest.raises(RunsError, match="no run has metric 'acc'"):
        compare_runs("cmp", "acc", str(tmp_path), all_runs=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # exported by mlflow.set_tracking_uri above
    with pytest.raises(RunsError, match="no MLflow store"):
        compare_runs("cmp", "", str(tmp_path / "empty"))


def test_bad_input(voc_root, tmp_path, capsys):
    rc = main(["eval", "--dataset", "voc21", "--data-root", str(tmp_path / "missing"), "--baseline",
               "--backbone", "tiny-clip-64", "--workdir", str(tmp_path)])  # fmt: skip
    assert rc == 2 and "data root not found" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="JPEGImages"):
        evaluate(_cfg(tmp_path, tmp_path))
    f = tmp_path / "three.txt"
    f.write_text("a\nb\nc\n")
    with pytest.raises(EvalError, match="has 3 classes; voc21 has 21"):
        evaluate(_cfg(voc_root, tmp_path, classes_file=str(f)))
    f.write_text("a\nb\na\n")
    rc = main(["eval", "--dataset", "voc21", "--data-root", str(voc_root), "--baseline", "--backbone",
               "tiny-clip-64", "--classes-file", str(f), "--workdir", str(tmp_path)])  # fmt: skip
    assert rc == 2 and "duplicate class name 'a'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--baseline"):
        EvalConfig(baseline=True, checkpoint="x")
    with pytest.raises(ConfigError, match="prob_thd"):
        EvalConfig(prob_thd=2.0)
    with pytest.raises(EvalError, match="--checkpoint CKPT or --baseline"):
        evaluate(EvalConfig(data_root=str(voc_root)))


def test_config_recipe_and_cli_flags(tmp_path):
    from pipeline.cli import build_parser

    recipe = tmp_path / "r.toml"
    recipe.write_text('[eval]\ndataset = "context59"\nlogit_scale = 30.0\nresolutions = [448, 672]\n')
    args = build_parser("eval").parse_args(
        [
            "eval",
            "--config",
            str(recipe),
            "--logit-scale",
            "5",
            "--set",
            "eval.repeats=2",
            "--strides",
            "224,24",
        ]
    )
    cfg = config_from_cli(EvalConfig, args, "eval")
    assert (cfg.dataset, cfg.logit_scale, cfg.repeats) == ("context59", 5.0, 2)
    assert cfg.resolutions == (448, 672) and cfg.strides == (224, 24) and cfg.prob_thd is None
    args = build_parser("eval").parse_args(["eval", "--set", "eval.mode=diagonal"])
    with pytest.raises(ConfigError, match="mode"):
        config_from_cli(EvalConfig, args, "eval")


def test_each_report_gets_its_own_config_from_the_flat_flags():
    from pipeline.cli import build_parser
    from pipeline.eval.config import BenchmarkConfig, FidelityConfig

    def report(*argv: str):
        return config_from_cli(EvalConfig, build_parser("eval").parse_args(["eval", *argv]), "eval").report()

    fid = report("--fidelity", "--images", "h", "--teacher-cache", "c", "--classes", "a;b", "--overlays", "1")
    assert type(fid) is FidelityConfig
    assert (fid.images, fid.teacher_cache, fid.classes, fid.overlays) == ("h", "c", "a;b", 1)
    speed = report("--speed", "--backbone", "tiny-clip-64", "--resolutions", "64", "--repeats", "2")
    assert type(speed) is SpeedConfig
    assert (speed.backbone, speed.resolutions, speed.repeats) == ("tiny-clip-64", (64,), 2)
    bench = report("--dataset", "voc20", "--data-root", "d", "--prob-thd", "0.5")
    assert type(bench) is BenchmarkConfig
    assert (bench.dataset, bench.data_root, bench.prob_thd) == ("voc20", "d", 0.5)
    assert not hasattr(bench, "resolutions") and not hasattr(speed, "dataset") and not hasattr(fid, "repeats")
    with pytest.raises(ConfigError, match="dataset does not apply to the fidelity report"):
        report("--fidelity", "--dataset", "voc20")
    with pytest.raises(ConfigError, match="repeats does not apply to the benchmark report"):
        report("--repeats", "2")


def test_eval_student_checkpoint_records_lineage(voc_root, tmp_path):
    import torch

    from pipeline.student.format import StudentMeta, save_student
    from spar_core.backbones import build_backbone

    bb = build_backbone("tiny-clip-64")
    bb.set_trainable(1)
    with torch.no_grad():
        for p in bb.parameters():
            if p.requires_grad:
                p.mul_(1.5)
    ckpt = save_student(bb, tmp_path / "ckpt", StudentMeta(1, {}, "abc123"))
    res = evaluate(_cfg(voc_root, tmp_path, baseline=False, backbone="", checkpoint=str(ckpt), max_images=1,
                        overlays=1, run_name="stud"))  # fmt: skip
    assert res["images"] == 1 and res["model"]["backbone"] == "tiny-clip-64"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["eval-test"]).iloc[0]
    assert run["params.model.cache_fingerprint"] == "abc123" and run["params.model.trainable_blocks"] == "1"
    assert run["tags.spar.role"] == "student" and run["tags.mlflow.runName"] == "stud"
    rc = main(["segment", str(voc_root / "VOCdevkit/VOC2012/JPEGImages/2007_000001.jpg"), "--classes", "a;b",
               "--checkpoint", str(ckpt), "--short-side", "64", "--out", str(tmp_path / "seg")])  # fmt: skip
    assert rc == 0 and (tmp_path / "seg" / "2007_000001_labels.png").is_file()
