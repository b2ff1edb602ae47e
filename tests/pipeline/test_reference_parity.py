"""Resizes, the eval protocol, teacher strides and recipes against the authors' code (literals in the test).

Reference: naomikombol/SPAR at 0f63ff2 (configs/*/base_config.py, cfg_<dataset>.py, cfg_train_*.py,
utils/image_generation_utils.py) and mmcv's ``rescale_size`` / cv2 ``INTER_LINEAR`` that its pipelines call.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.resize import resize_linear
from pipeline.eval.config import EmbedConfig, EvalConfig
from pipeline.eval.model import model_input, protocol_size, resolve_protocol
from pipeline.eval.segment import embed_images
from pipeline.eval.speed import speed_strides
from spar_core.sliding import default_stride
from tests.conftest import load_photo
from tests.cv2_reference import cv2_fixed_pixel, cv2_linear, cv2_linear_float, cv2_linear_pixel

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- resizing


@pytest.mark.parametrize("src,dst", [((23, 37), (50, 17)), ((40, 31), (13, 64)), ((9, 14), (9, 29))])
def test_resize_equals_cv2_inter_linear_per_pixel(src, dst):
    rng = np.random.default_rng(sum(src) + sum(dst))
    img = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    got = resize_linear(img, dst)
    ref_f = cv2_linear_float(img, *dst)
    for y in range(dst[0]):
        for x in range(dst[1]):
            # the separable float reference equals the 2x2 formula; resize_linear equals OpenCV's fixed point
            np.testing.assert_allclose(ref_f[y, x], cv2_linear_pixel(img, *dst, y, x), rtol=0, atol=1e-9)
            np.testing.assert_array_equal(got[y, x], cv2_fixed_pixel(img, *dst, y, x))
    # and the exact-arithmetic formula to within OpenCV's 11-bit weights: one grey level at most
    diff = np.abs(got.astype(int) - cv2_linear(img, *dst).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.97


@pytest.mark.parametrize("size", [(1000, 1501), (352, 531), (203, 1187), (672, 448)])
def test_torch_bilinear_without_antialias_is_cv2_on_a_photo(size):
    # what the brief calls "F.interpolate(bilinear, align_corners=False, antialias=False) = INTER_LINEAR":
    # up- and downsampling, non-integer factors, on a real photograph (512 x 512)
    img = load_photo("astronaut")
    ref = cv2_linear_float(img, *size)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].double()
    t = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)[0].permute(1, 2, 0)
    assert float(np.abs(t.numpy() - ref).max()) < 1e-6
    got = resize_linear(img, size)
    diff = np.abs(got.astype(int) - np.floor(ref + 0.5).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99  # measured 99.88% (1000 x 1501)


def test_no_antialias_when_shrinking():
    # a 1-px checkerboard halved: INTER_LINEAR samples between two pixels (their mean, 127.5 -> 128), while an
    # antialiased resize (PIL) would blur 2x2 blocks; at 1/4 it lands on single source pixels (no averaging)
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, 2)
    assert (resize_linear(board, (32, 32)) == 128).all()
    quarter = resize_linear(board, (16, 16))  # src = 4d + 1.5: the mean of pixels 4d+1 and 4d+2 per axis
    assert (quarter == 128).all()
    third = resize_linear(board, (21, 21))[..., 0].astype(int)  # src = 64/21 (d + .5) - .5
    assert np.unique(third).size > 2  # aliasing survives: no low-pass filter


def test_eval_resize_is_mmcv_rescale_then_patch_crop():
    # mmcv.rescale_size(old=(w, h), scale=(2048, 672)): s = min(2048 / long, 672 / short); int(x * s + 0.5)
    def mmcv(h, w, long_, short):
        s = min(long_ / max(h, w), short / min(h, w))
        return int(h * s + 0.5), int(w * s + 0.5)

    for h, w, short in [
        (375, 500, 672),
        (333, 500, 672),
        (500, 281, 672),
        (1024, 2048, 1024),
        (100, 5000, 672),
    ]:
        assert protocol_size(h, w, short, 2048) == mmcv(h, w, 2048, short)
    assert protocol_size(333, 500, 672, 2048) == (672, 1009)  # not snapped to 16
    img = load_photo("coffee")[:333]  # 333 x 600
    x, size = model_input(img, 672, 2048, 16)
    assert size == (672, 1211) and x.shape == (672, 1200, 3)  # the conv reads the top-left 42 x 75 patches
    np.testing.assert_array_equal(x, resize_linear(img, size)[:672, :1200])


# ---------------------------------------------------------------------------------------------- protocol


# configs/{maskclip,siglip2}/cfg_<dataset>.py: (logit_scale, prob_thd, area_thd or None), Resize scale
REFERENCE_PROTOCOL = {
    "clip": {
        "voc21": (65, 0.1, 0.1),
        "voc20": (40, 0.0, None),
        "context60": (50, 0.1, None),
        "context59": (40, 0.0, None),
        "cityscapes": (40, 0.0, None),
        "ade20k": (40, 0.0, None),
    },
    "siglip2": {
        "voc21": (65, 0.0, None),
        "voc20": (40, 0.0, None),
        "context60": (50, 0.1, None),
        "context59": (40, 0.0, None),
        "cityscapes": (40, 0.0, None),
        "ade20k": (40, 0.0, None),
    },
}
REFERENCE_RESIZE = {"cityscapes": (2048, 1024)}  # others (2048, 672)
REFERENCE_CROP = {"clip": 224, "siglip2": 512}  # slide_crop (base_config.py)


@pytest.mark.parametrize("family,readout", [("clip", "maskclip"), ("siglip2", "siglip2-pool-bypass")])
def test_protocol_defaults_are_the_reference_configs(family, readout):
    for ds, (scale, prob, area) in REFERENCE_PROTOCOL[family].items():
        p = resolve_protocol(EvalConfig(dataset=ds), readout, REFERENCE_CROP[family], 16)
        long_, short = REFERENCE_RESIZE.get(ds, (2048, 672))
        assert (p.long_side, p.short_side) == (long_, short), ds
        assert (p.logit_scale, p.prob_thd) == (scale, prob), ds
        assert p.area_thd == (area or 0.0), ds  # None (off) = 0 here: the same predictions
        assert (p.crop, p.stride) == (REFERENCE_CROP[family], 24)


# ---------------------------------------------------------------------------------------------- strides


def test_teacher_stride_is_24_px_at_every_crop():
    # configs/*/cfg_train_*.py: slide_stride_gen = 24 for CLIP (crop 224), SigLIP2 (512), DINOv3-txt (384)
    assert [default_stride(c) for c in (224, 384, 512, 64)] == [24, 24, 24, 24]
    assert default_stride(16) == 16  # never larger than the crop
    assert speed_strides((224, 112, 48, 24), 512) == [224, 112, 48, 24]
    assert speed_strides((224, 112, 48, 24), 64) == [48, 24]


def test_online_teacher_defaults_to_24_px():
    from pipeline.train.config import DistillConfig
    from pipeline.train.plan import teacher_window

    cfg = DistillConfig(images="x", teacher_online=True)
    assert teacher_window(cfg, None, 512) == (512, 24)
    assert teacher_window(cfg, None, 224) == (224, 24)

    class Spec:
        crop, stride = 224, 48

    assert teacher_window(cfg, Spec(), 224) == (224, 48)  # a cache's teacher is kept


def test_embed_records_the_stride_it_used(tmp_path):
    from spar_core.backbones import build_backbone
    from spar_core.sliding import sliding_window_features

    photo = tmp_path / "p.png"
    Image.fromarray(load_photo("coffee")).save(photo)  # 400 x 600
    out = tmp_path / "e"
    (rec,) = embed_images(
        [str(photo)], EmbedConfig(backbone="tiny-clip-64", out=str(out), short_side=96, mode="sliding")
    )
    meta = json.loads((out / "p.json").read_text())
    assert (meta["crop"], meta["stride"]) == (64, 24) and rec["stride"] == 24
    assert meta["processed_size"] == [96, 144] and meta["resized_size"] == [96, 144]
    bb = build_backbone("tiny-clip-64")
    x, _ = model_input(load_photo("coffee"), 96, 2048, 16)
    with torch.no_grad():
        ref = sliding_window_features(bb, bb.normalize(torch.from_numpy(x.copy())[None]), 64, 24)[0].numpy()
        other = sliding_window_features(bb, bb.normalize(torch.from_numpy(x.copy())[None]), 64, 32)[0].numpy()
    arr = np.load(out / "p.npy")
    np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(arr - other).max() > 1e-3  # the stride matters, so the check above is about 24


# ---------------------------------------------------------------------------------------------- recipes


# configs/{maskclip,siglip2}/cfg_train_*.py training_params and model
REFERENCE_TRAIN = {
    "maskclip_vitb16.toml": dict(
        teacher="maskclip-vit-b16", pretrained="laion2b_s34b_b88k", crop=224, blocks=2
    ),
    "siglip2_vitb16_512.toml": dict(teacher="siglip2-vit-b16-512", pretrained="webli", crop=512, blocks=2),
    "maskclip_vitb16_all.toml": dict(
        teacher="maskclip-vit-b16", pretrained="laion2b_s34b_b88k", crop=224, blocks="all"
    ),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_TRAIN))
def test_paper_recipes_are_the_authors_run(name):
    ref = REFERENCE_TRAIN[name]
    r = tomllib.loads((REPO / "jobs" / "configs" / name).read_text())
    d, pc, ing = r["distill"], r["precompute"], r["ingest"]
    # train_devices = 2 (DDP), batch_size = 1 per device, precision = 16 (fp16 autocast + GradScaler),
    # train_num_epochs = 10, AdamW(lr 2e-5, weight_decay 1e-4) with no scheduler
    assert (d["workers"], d["batch_size"], d["precision"], d["epochs"]) == (2, 1, "fp16", 10)
    assert (d["lr"], d["weight_decay"], d["schedule"], d.get("warmup_steps", 0)) == (
        2e-5,
        1e-4,
        "constant",
        0,
    )
    assert d["trainable_blocks"] == ref["blocks"]  # unfrozen_config "blk_-1,blk_-2" (or "all")
    # the teacher: slide_crop, slide_stride_gen = 24, gen precision = 16
    assert (pc["teacher"], pc["pretrained"], pc["crop"], pc["stride"], pc["autocast"]) == (
        ref["teacher"], ref["pretrained"], ref["crop"], 24, "fp16")  # fmt: skip
    # image generation: RandomResize scale/ratio_range, RandomCropOrFullImage(prob_crop=0.5), 0.4 crop, flip 0.5
    gen = (2560, 2560, 0.2) if name.endswith("_all.toml") else (2048, 1024, 0.5)
    assert (ing["target_long"], ing["target_short"], ing["scale_min"], ing["scale_max"]) == (*gen, 1.0)
    assert (ing["crop_prob"], ing["crop_min_frac"], ing["min_short"], ing["flip_prob"], ing["multiple"]) == (
        0.5, 0.4, 512, 0.5, 16)  # fmt: skip


def test_recipes_load_into_the_stage_configs():
    from pipeline.cache.config import PrecomputeConfig
    from pipeline.common.config import load_config
    from pipeline.data.config import IngestConfig
    from pipeline.train.config import DistillConfig
    from pipeline.train.step import lr_at

    for name in REFERENCE_TRAIN:
        path = str(REPO / "jobs" / "configs" / name)
        ing = load_config(IngestConfig, path, [], section="ingest")
        load_config(PrecomputeConfig, path, [], section="precompute")
        if not name.endswith("_all.toml"):  # "all" is another change's (trainable_blocks accepts it there)
            d = load_config(DistillConfig, path, [], section="distill")
            assert all(lr_at(s, d.lr, d.warmup_steps, d.schedule, 1000) == 2e-5 for s in (0, 500, 999))
        if name.endswith("_all.toml"):  # the extended generation reaches a 2560 px long side
            from pipeline.data.augment import sample_augmentation

            rng = np.random.default_rng(0)
            longs = [max(sample_augmentation(1500, 2250, ing, rng)["resize"]) for _ in range(400)]
            assert 2400 < max(longs) <= 2560 and min(longs) == 768  # short side 512 floor: 512 x 768
            assert math.isclose(ing.scale_min, 0.2)
