"""The labels-free fidelity report against a real teacher cache: numbers equal a direct computation."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline.eval.config import EvalError, FidelityConfig, SpeedConfig
from pipeline.eval.fidelity import fidelity_report
from tests.builders import perturbed_student, tiny_cache, write_photo_pngs

CLASSES = "sky;person,people;wall;tree;road;cat;cup"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, ray_local):
    """Real photos ingested (no augmentation, small), a tiny teacher cache, and a perturbed student."""
    from pipeline.data.config import IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.student.format import StudentMeta, save_student

    root = tmp_path_factory.mktemp("fid")
    src = write_photo_pngs(root / "src", ("astronaut", "coffee", "chelsea"))
    ingest(
        str(src), str(root / "set"), IngestConfig(augment=False, max_side=96, shard_size=2), progress=False
    )
    cache = tiny_cache(str(root / "set"), root / "cache", device="cpu")
    bb = perturbed_student(seed=1)
    ckpt = save_student(bb, root / "student", StudentMeta(2, {}, Path(cache).name))
    return root / "set", cache, ckpt


def _direct(images: Path, cache_path: str, ckpt: Path) -> dict[str, dict[str, float]]:
    """Reference: every model's features of every image stacked, MSE/cosine in float64 numpy, and mIoU of
    each prediction against the teacher's from a numpy confusion matrix."""
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset
    from pipeline.student.format import load_student
    from spar_core.backbones import build_backbone
    from spar_core.segment import build_classifier, parse_classes, predict

    ims, cache = open_imageset(str(images)), open_cache(cache_path)
    models = {"baseline": build_backbone("tiny-clip-64"), "student": load_student(ckpt)}
    clf = build_classifier(
        models["baseline"], parse_classes(CLASSES), templates=[lambda c: f"a photo of a {c}."]
    )
    feats = {m: [] for m in models}
    teach, conf = [], {m: np.zeros((7, 7), np.int64) for m in models}
    for s in range(ims.num_shards):
        for rec, img in ims.iter_shard(s):
            t = np.asarray(cache.features(rec.key), np.float32)
            teach.append(t.reshape(-1, t.shape[-1]))
            tp = predict(torch.from_numpy(t)[None], clf, img.shape[:2])[0].numpy().ravel()
            for m, bb in models.items():
                with torch.no_grad():
                    f = bb.dense(bb.normalize(torch.from_numpy(img.copy())[None]))
                feats[m].append(f[0].numpy().reshape(-1, t.shape[-1]))
                p = predict(f, clf, img.shape[:2])[0].numpy().ravel()
                conf[m] += np.bincount(tp * 7 + p, minlength=49).reshape(7, 7)
    t = np.concatenate(teach).astype(np.float64)
    out = {}
    for m in models:
        a = np.concatenate(feats[m]).astype(np.float64)
        cos = (a * t).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1))
        c = conf[m]
        inter, union = np.diag(c), c.sum(0) + c.sum(1) - np.diag(c)
        out[m] = {
            "mse": float(((a - t) ** 2).mean()),
            "cosine": float(cos.mean()),
            "miou_vs_teacher": float((inter[union > 0] / union[union > 0]).mean() * 100),
            "pixel_agreement": float(inter.sum() / c.sum()),
        }
    return out


def test_fidelity_numbers_equal_direct_computation(held_out, tmp_path, capsys):
    images, cache, ckpt = held_out
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    res = fidelity_report(FidelityConfig(images=str(images), teacher_cache=cache, checkpoint=str(ckpt),
                                     classes=CLASSES, templates="simple", workdir=str(tmp_path)))  # fmt: skip
    assert "not held out" in capsys.readouterr().out  # the fixture's student was "trained" on this cache
    ref = _direct(images, cache, ckpt)
    assert res["images"] == 3
    for m in ("baseline", "student"):
        for k in ("mse", "cosine", "miou_vs_teacher", "pixel_agreement"):
            assert res[m][k] == pytest.approx(ref[m][k], rel=1e-4, abs=1e-6), (m, k)
    assert res["student"]["mse"] != pytest.approx(res["baseline"]["mse"])  # the student really differs
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = mlflow.search_runs(experiment_names=["spar-eval"]).iloc[0]
    assert run["metrics.student_mse"] == pytest.approx(res["student"]["mse"])
    assert run["metrics.baseline_miou_vs_teacher"] == pytest.approx(res["baseline"]["miou_vs_teacher"])
    assert run["tags.spar.eval"] == "fidelity"
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_fidelity_bad_input(held_out, tmp_path):
    images, cache, _ = held_out
    with pytest.raises(EvalError, match="--images ROOT and --teacher-cache"):
        fidelity_report(FidelityConfig(images=str(images)))
    with pytest.raises(Exception, match="nowhere"):
        fidelity_report(FidelityConfig(images=str(images), teacher_cache=str(tmp_path / "nowhere")))
    with pytest.raises(Exception, match="duplicate"):
        fidelity_report(FidelityConfig(images=str(images), teacher_cache=cache, classes="a;a",
                                   mlflow=False))  # fmt: skip


def test_quality_vs_cost_curve(held_out, tmp_path):
    """Speed report with --images: cosine of each method to the finest-stride teacher, checked directly."""
    from pipeline.data.imageset import open_imageset
    from pipeline.eval.speed import speed_report
    from pipeline.student.format import load_student
    from spar_core.backbones import build_backbone
    from spar_core.sliding import sliding_window_features

    images, _, ckpt = held_out
    res = speed_report(SpeedConfig(checkpoint=str(ckpt), images=str(images), resolutions=(64,),
                                  strides=(64, 14), repeats=1, mlflow=False, out=str(tmp_path)))  # fmt: skip
    qc = res["quality_cost"]
    pts = {p["method"]: p for p in qc["points"]}
    assert qc["reference"] == "sliding s14" and set(pts) == {
        "single pass",
        "sliding s64",
        "sliding s14",
        "student",
    }
    assert pts["sliding s14"]["cosine"] == pytest.approx(1.0) and pts["sliding s14"]["mse"] == pytest.approx(
        0.0
    )
    assert (tmp_path / "quality_cost.png").read_bytes()[:4] == b"\x89PNG"
    base, student = build_backbone("tiny-clip-64"), load_student(ckpt)
    num = {"single pass": 0.0, "student": 0.0}
    den = 0
    ims = open_imageset(str(images))
    for s in range(ims.num_shards):
        for _, img in ims.iter_shard(s):
            with torch.no_grad():
                x = base.normalize(torch.from_numpy(img.copy())[None])
                ref = sliding_window_features(base, x, 64, 14)[0].numpy().astype(np.float64)
                for name, bb in (("single pass", base), ("student", student)):
                    f = bb.dense(x)[0].numpy().astype(np.float64)
                    cos = (f * ref).sum(-1) / (np.linalg.norm(f, axis=-1) * np.linalg.norm(ref, axis=-1))
                    num[name] += cos.sum()
            den += ref.shape[0] * ref.shape[1]
    for name in num:
        assert pts[name]["cosine"] == pytest.approx(num[name] / den, rel=1e-4)
