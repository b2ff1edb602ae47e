"""The DINOv3 dino.txt backbone through the whole pipeline: ingest -> precompute (sliding teacher, Ray tasks,
Zarr cache) -> distill (Ray Train) -> fidelity eval, from the demo recipe with the teacher switched to the seeded
``tiny-dinov3txt``; then a VOC-layout benchmark eval of the student. Real photos at small sizes (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import load_photo

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_tracking_env():
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def _photos(d: Path, names: tuple[str, ...]) -> str:
    d.mkdir(parents=True)
    for n in names:
        Image.fromarray(load_photo(n)).save(d / f"{n}.png")
    return str(d)


def test_tiny_dinov3txt_through_the_pipeline(tmp_path: Path, ray_local) -> None:
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset
    from pipeline.eval.benchmark import evaluate
    from pipeline.eval.config import EvalConfig
    from pipeline.student.format import load_student
    from pipeline.workflow.config import load_recipe
    from pipeline.workflow.orchestrator import run_pipeline
    from spar_core import build_backbone
    from spar_core.sliding import sliding_window_features
    from tests.pipeline.test_datasets import make_voc

    src = _photos(tmp_path / "train", ("rocket", "horse", "camera"))
    held = _photos(tmp_path / "held", ("astronaut", "coffee"))
    overrides = [
        "precompute.teacher=tiny-dinov3txt",
        "ingest.target_long=128",
        "ingest.target_short=96",
        "ingest.shard_size=2",
        "distill.epochs=2",
        "distill.checkpoint_every=100",
        "eval.overlays=0",
    ]
    flags = {"workdir": str(tmp_path / "work"), "source": src, "heldout_source": held}
    cfgs = load_recipe(str(ROOT / "jobs/configs/demo.toml"), overrides, run_flags=flags)
    out = run_pipeline(cfgs)

    # precompute: the cache holds the sliding-window teacher of tiny-dinov3txt (crop 64, stride 24)
    cache = open_cache(out.cache)
    spec = cache.spec
    assert (spec.backbone, spec.readout, spec.crop, spec.stride) == (
        "tiny-dinov3txt",
        "dinotxt-backbone-patch",
        64,
        24,
    )
    teacher = build_backbone("tiny-dinov3txt", seed=0)
    ims = open_imageset(out.images)
    rec = ims.records[0]
    x = teacher.normalize(torch.from_numpy(ims.read(rec.key))[None])  # (1, 3, H, W)
    with torch.no_grad():
        want = sliding_window_features(teacher, x, crop=64, stride=24)[0]  # (H/16, W/16, D)
    got = torch.from_numpy(np.asarray(cache.features(rec.key), dtype=np.float32))
    assert got.shape == want.shape == (rec.height // 16, rec.width // 16, 64)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)  # float16 storage

    # distill: a tiny-dinov3txt student whose last two backbone blocks moved, nothing else
    student = load_student(out.checkpoint)
    assert student.name == "tiny-dinov3txt"
    base, trained = teacher.state_dict(), student.state_dict()
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert changed and all(k.startswith(("model.visual_model.backbone.blocks.2.",
                                         "model.visual_model.backbone.blocks.3.")) for k in changed)  # fmt: skip

    # fidelity eval on the held-out images: the student is closer to its teacher than the single pass
    fid = out.eval
    assert fid["student"]["mse"] < fid["baseline"]["mse"]

    # benchmark eval of the student on a VOC-layout set (the text tower and tokenizer in use)
    labels = {f"2007_00000{i}": np.kron(np.eye(4, 6, k=i, dtype=np.uint8) * (5 + i), np.ones((10, 10), np.uint8))
              for i in range(2)}  # fmt: skip
    make_voc(tmp_path / "voc", labels)
    res = evaluate(
        EvalConfig(dataset="voc21", data_root=str(tmp_path / "voc"), checkpoint=out.checkpoint,
                   short_side=64, templates="simple", mlflow=False, overlays=0, workdir=str(tmp_path / "work"))
    )  # fmt: skip
    assert res["images"] == 2
    # the counts against the labels written above, the mIoU (percent) against the counts
    labelled = np.bincount(np.concatenate([lab.ravel() for lab in labels.values()]), minlength=21)
    assert res["label_pixels"] == labelled.tolist()
    inter, union = np.array(res["intersection"]), np.array(res["union"])
    assert (inter <= labelled).all() and (union >= labelled).all()
    assert res["miou"] == pytest.approx(100 * np.mean(inter[union > 0] / union[union > 0]))
    assert res["protocol"]["logit_scale"] == 65.0 and res["protocol"]["area_thd"] == 0.0
