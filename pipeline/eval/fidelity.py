"""``spar eval --fidelity``: the labels-free report on held-out images against their cached teacher features.

One image's path: the image set's photo (at its stored size) -> single-pass dense features of the baseline (the
cache's backbone, untrained) and of the student -> feature MSE and mean cosine to the cached teacher features
(``spar_core.metrics.feature_fidelity``, pooled over every patch position: :class:`PooledFidelity`), and the
segmentation each model predicts for a class list against the teacher's own prediction (mIoU, pixel agreement).
Logged to MLflow through :mod:`pipeline.eval.tracking`, with PCA pictures of the three feature maps
(:func:`pipeline.eval.viz.pca_panel`).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.data.datasets import default_classes
from pipeline.data.imageset import ImageRecord, ImageSet, open_imageset
from pipeline.eval.config import EvalError, FidelityConfig
from pipeline.eval.model import (
    build_text_classifier,
    dense_features,
    load_model,
    pick_device,
    resolve_classes,
)
from pipeline.eval.tracking import EvalRun, log_eval, output_dir, png_images
from pipeline.eval.viz import pca_panel
from pipeline.student.format import read_backbone_info
from spar_core.backbones import Backbone, build_backbone, random_weights_seed
from spar_core.metrics import IoUAccumulator, feature_fidelity
from spar_core.segment import predict

MODELS = ("baseline", "student")


def held_out_images(ims: ImageSet, limit: int = 0) -> Iterator[tuple[ImageRecord, np.ndarray]]:
    """The image set's (record, (H, W, 3) uint8) in shard order, at most ``limit`` of them (0 = all)."""
    records = (item for shard in range(ims.num_shards) for item in ims.iter_shard(shard))
    return itertools.islice(records, limit or None)


@dataclass
class PooledFidelity:
    """Feature MSE and mean cosine to a reference, pooled over every patch position of every image (each image
    weighted by its number of positions)."""

    mse_sum: float = 0.0
    cosine_sum: float = 0.0
    positions: int = 0

    def add(self, feats: torch.Tensor, ref: torch.Tensor) -> None:
        """One image's features and reference, both (h, w, D)."""
        hw = ref.shape[0] * ref.shape[1]
        f = feature_fidelity(feats, ref)
        self.mse_sum += f["mse"] * hw
        self.cosine_sum += f["cosine"] * hw
        self.positions += hw

    def mse(self) -> float:
        return self.mse_sum / self.positions

    def cosine(self) -> float:
        return self.cosine_sum / self.positions


@dataclass
class _Agreement:
    """One model's features and segmentation against the teacher's."""

    num_classes: int
    features: PooledFidelity = field(default_factory=PooledFidelity)
    agree: int = 0
    pixels: int = 0
    iou: IoUAccumulator = field(init=False)

    def __post_init__(self) -> None:
        self.iou = IoUAccumulator(self.num_classes, ignore_index=-1)

    def add_prediction(self, pred: torch.Tensor, teacher_pred: torch.Tensor) -> None:
        self.iou.update(pred, teacher_pred)
        self.agree += int((pred == teacher_pred).sum())
        self.pixels += pred.numel()

    def summary(self) -> dict[str, float]:
        return {
            "mse": self.features.mse(),
            "cosine": self.features.cosine(),
            "miou_vs_teacher": self.iou.miou() * 100.0,
            "pixel_agreement": self.agree / self.pixels,
        }


def fidelity_report(cfg: FidelityConfig) -> dict[str, Any]:
    """Labels-free quality report on held-out images against their cached teacher features.

    For the single-pass baseline (the cache's backbone, no training) and, with ``checkpoint``, the student:
    feature MSE and mean cosine to the teacher pooled over every patch position of every image, and
    segmentation agreement: mIoU (percent) and pixel agreement of each prediction against the teacher's own
    prediction for the class list. Returns {"images", "baseline": {...}, "student": {...}?}.
    """
    if not cfg.images or not cfg.teacher_cache:
        raise EvalError("--fidelity needs --images ROOT and --teacher-cache PATH")
    ims = open_imageset(cfg.images)
    cache = open_cache(cfg.teacher_cache)
    cache.check_pairing(ims)
    dev = pick_device(cfg.device)
    models = {"baseline": _baseline(cfg, cache, dev)}
    if cfg.checkpoint:
        models["student"] = _student(cfg, cache, dev)
    if cfg.classes or cfg.classes_file:
        classes = resolve_classes(cfg.classes, cfg.classes_file)
    else:
        classes = default_classes("context59", cfg.class_set)
    clf = build_text_classifier(models["baseline"], classes, cfg.templates)
    scores = {m: _Agreement(len(classes)) for m in models}
    scale = cfg.logit_scale if cfg.logit_scale is not None else 40.0
    n = 0
    for rec, img in held_out_images(ims, cfg.max_images):  # img (H, W, 3) uint8
        teacher = torch.from_numpy(np.asarray(cache.features(rec.key), dtype=np.float32)).to(dev)  # (h, w, D)
        with torch.no_grad():
            t_pred = predict(teacher[None], clf, out_size=img.shape[:2], logit_scale=scale)[0].cpu()  # (H, W)
        for m, bb in models.items():
            feats = dense_features(bb, img, "single", precision=cfg.precision)[0]  # (h, w, D)
            if feats.shape != teacher.shape:
                raise EvalError(
                    f"image {rec.key}: {m} features {tuple(feats.shape)} "
                    f"vs cached teacher {tuple(teacher.shape)}"
                )
            scores[m].features.add(feats, teacher)
            with torch.no_grad():
                pred = predict(feats[None], clf, out_size=img.shape[:2], logit_scale=scale)[0].cpu()  # (H, W)
            scores[m].add_prediction(pred, t_pred)
        n += 1
    if n == 0:
        raise EvalError(f"no images in {cfg.images}")
    spec = cache.spec
    result: dict[str, Any] = {
        "images": n,
        "positions": scores["baseline"].features.positions,
        "classes": [c[0] for c in classes],
        "teacher": {
            "crop": spec.crop,
            "stride": spec.stride,
            "backbone": spec.backbone,
            "cache_fingerprint": cache.fingerprint,
        },
        **{m: s.summary() for m, s in scores.items()},
    }
    print(format_fidelity(result))
    _log_fidelity(cfg, result, ims, cache, models)
    return result


def _baseline(cfg: FidelityConfig, cache: TeacherCache, dev: torch.device) -> Backbone:
    """The cache's backbone rebuilt here, refused unless its weights are the ones the teacher used."""
    spec = cache.spec
    pretrained = cfg.pretrained or spec.pretrained or None  # the spec's path is a hint from another machine
    try:
        seed = random_weights_seed(spec.weights_id)
        seed = cfg.seed if seed is None else seed
        base = build_backbone(spec.backbone, pretrained, device=dev, seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(
            f"cannot rebuild the cache's backbone {spec.backbone!r} ({e}); pass --pretrained"
        ) from e
    if base.weights_id != spec.weights_id:
        raise EvalError(
            f"teacher cache {cfg.teacher_cache} was computed with weights {spec.weights_id!r}, but the baseline "
            f"built here has {base.weights_id!r} (pass the same pretrained weights)"
        )
    return base


def _student(cfg: FidelityConfig, cache: TeacherCache, dev: torch.device) -> Backbone:
    """The student of ``cfg.checkpoint``, refused unless it is of the cache's backbone; warns when it was trained
    on this very cache (its images are then not held out)."""
    spec = cache.spec
    student = load_model(cfg.checkpoint, device=dev)
    if student.name != spec.backbone:
        raise EvalError(
            f"checkpoint {cfg.checkpoint} is a {student.name} student; the cache is for {spec.backbone}"
        )
    trained_on = read_backbone_info(cfg.checkpoint).get("cache_fingerprint") or ""
    if trained_on and trained_on == cache.fingerprint:
        print(
            f"warning: {cfg.checkpoint} was trained on this very cache ({trained_on[:12]}): the images "
            "are not held out, so the student's numbers measure fit, not generalisation"
        )
    return student


def format_fidelity(result: dict[str, Any]) -> str:
    """The fidelity report as a terminal table."""
    rows = [f"{'model':<10} {'MSE':>12} {'cosine':>8} {'mIoU vs teacher':>16} {'pixel agree':>12}"]
    for m in MODELS:
        if m in result:
            r = result[m]
            rows.append(
                f"{m:<10} {r['mse']:>12.6g} {r['cosine']:>8.4f} {r['miou_vs_teacher']:>16.2f} "
                f"{r['pixel_agreement']:>12.4f}"
            )
    rows.append(
        f"{result['images']} held-out images, teacher crop {result['teacher']['crop']} "
        f"stride {result['teacher']['stride']}"
    )
    return "\n".join(rows)


def _log_fidelity(
    cfg: FidelityConfig,
    result: dict[str, Any],
    ims: ImageSet,
    cache: TeacherCache,
    models: dict[str, Backbone],
) -> None:
    with output_dir(cfg) as out:
        (out / "fidelity.json").write_text(json.dumps(result, indent=1))
        if not cfg.mlflow:
            return
        # PCA panels of the first held-out images (teacher from the cache, baseline and student in one basis), for
        # a report with a student
        pca = "student" in models and cfg.overlays > 0
        if pca:
            (out / "pca").mkdir(parents=True, exist_ok=True)
            for rec, img in held_out_images(ims, cfg.overlays):
                maps = {"teacher (cache)": np.asarray(cache.features(rec.key), dtype=np.float32)}  # (h, w, D)
                for m, bb in models.items():
                    maps[m] = dense_features(bb, img, "single")[0].cpu().numpy()  # (h, w, D)
                pca_panel(img, maps).save(out / "pca" / f"{rec.key}_pca.png")
        metrics = _fidelity_metrics(result)
        run = EvalRun(
            kind="fidelity",
            default_name="fidelity",
            params={f"teacher.{k}": result["teacher"][k] for k in ("cache_fingerprint", "crop", "stride")},
            metrics=metrics,
            headline_kind="fidelity",
            headline={k: v for k, v in metrics.items() if k != "num_images" and not math.isnan(v)},
            files=["fidelity.json"],
            folders=["pca"] if pca else [],
            images=png_images(out, "pca", "pca") if pca else {},
        )
        log_eval(cfg, out, run)


def _fidelity_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics: dict[str, float] = {"num_images": result["images"]}
    for m in MODELS:
        for k, v in result.get(m, {}).items():
            metrics[f"{m}_{k}"] = v
    if "student" in result and result["baseline"]["mse"] > 0:
        metrics["mse_ratio"] = result["student"]["mse"] / result["baseline"]["mse"]
    return metrics
