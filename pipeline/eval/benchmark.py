"""Evaluation: open-vocabulary segmentation benchmarks, the labels-free fidelity report and the speed report.

* ``spar eval --dataset voc21 --data-root DIR (--checkpoint CKPT | --baseline --backbone NAME)``: mIoU,
  per-class IoU and images/s under the paper's protocol (per-dataset defaults, all configurable), optionally
  spread over Ray tasks (``--workers N``: each task returns intersection/union counts; the driver sums them).
* ``spar eval --fidelity --images ROOT --teacher-cache PATH [--checkpoint CKPT]``: on held-out images, feature
  MSE / mean cosine to the cached teacher for the single-pass baseline and the student, and segmentation
  agreement (mIoU against the teacher's own prediction).
* ``spar eval --speed --backbone NAME``: seconds per image, single pass vs sliding window at strides
  {224, 112, 48, 24} px (24 = the paper's teacher at every crop; strides above the crop are left out), at
  several resolutions; table + PNG plot.
* ``spar classes DATASET [--set paper|rich]``: the class list a benchmark is evaluated with.

Everything is logged to MLflow (metrics, params, a per-class table, overlays / plots as artifacts) and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from pipeline.common.config import ConfigError, to_dict
from pipeline.common.errors import UserError
from pipeline.data.datasets import (
    CLASS_SETS,
    DATASETS,
    DEFAULT_CLASS_SET,
    INFOS,
    default_classes,
    format_classes,
    open_dataset,
    read_class_file,
)
from pipeline.eval.inference import (
    Precision,
    build_text_classifier,
    config_from_args,
    default_stride,
    dense_features,
    load_model,
    make_palette,
    model_identity,
    model_input,
    overlay,
    pick_device,
    resolve_classes,
)

DatasetName = Literal["voc21", "voc20", "context60", "context59", "cityscapes", "ade20k"]
PAPER_STRIDES = (224, 112, 48, 24)  # speed report sweep, in pixels at every crop (24 = the paper's teacher)

# The authors' evaluation protocol (configs/{maskclip,siglip2}/base_config.py and cfg_<dataset>.py at 0f63ff2):
# mmseg Resize(scale=(long, short), keep_ratio=True), logit_scale (model default 40), prob_thd (default 0),
# area_thd (default None = off), per dataset and backbone family ("clip" = the MaskCLIP readout, "siglip2").
PAPER_SIZES: dict[str, tuple[int, int]] = {"cityscapes": (1024, 2048)}  # (short, long); others (672, 2048)
PAPER_LOGIT_SCALE: dict[str, float] = {"voc21": 65.0, "context60": 50.0}  # others 40
PAPER_PROB_THD: dict[tuple[str, str], float] = {
    ("voc21", "clip"): 0.1,
    ("context60", "clip"): 0.1,
    ("context60", "siglip2"): 0.1,
}  # others 0
PAPER_AREA_THD: dict[tuple[str, str], float] = {("voc21", "clip"): 0.1}  # others off


class EvalError(UserError):
    """Bad evaluation request (conflicting options, missing inputs)."""


@dataclass
class EvalConfig:
    """``spar eval``. Fields left at ``None`` take the paper's protocol default for the dataset/backbone."""

    # what to run: benchmark (default), or the fidelity / speed report
    fidelity: bool = False
    speed: bool = False
    # model: a student checkpoint, or a named backbone (single-pass baseline; with mode=sliding the teacher)
    checkpoint: str = ""
    baseline: bool = False
    backbone: str = ""
    pretrained: str = ""
    # benchmark
    dataset: DatasetName = "voc21"
    data_root: str = ""
    split: str = "val"
    max_images: int = 0  # 0 = all
    classes_file: str = ""  # default: the packaged list spar_core/data/<class_set>/<dataset>.txt
    class_set: str = DEFAULT_CLASS_SET  # "paper" (the authors' lists) or "rich" (more synonyms)
    templates: Literal["imagenet", "simple"] = "imagenet"
    # protocol (None = paper default)
    short_side: int | None = None  # 672; Cityscapes 1024
    long_side: int | None = None  # 2048
    logit_scale: float | None = None  # 40; VOC21 65; Context60 50
    prob_thd: float | None = None  # 0.1 Context60 and VOC21 with a CLIP backbone; else 0
    area_thd: float | None = None  # 0.1 VOC21 with a CLIP backbone; else 0
    # inference
    mode: Literal["single", "sliding"] = "single"
    crop: int = 0  # 0 = backbone's native size
    stride: int = 0  # 0 = the paper's teacher stride, 24 px at every crop
    window_batch: int = 32
    precision: Precision = "fp32"
    device: str = "auto"
    seed: int = 0
    # distribution
    workers: int = 0  # >0: split the images across this many Ray tasks
    ray_address: str = ""
    gpus_per_worker: float = 0.0  # 0: one GPU per task when the cluster has GPUs (unless device=cpu)
    # fidelity report
    images: str = ""  # fidelity: held-out image set; speed: adds the quality-vs-cost curve on these images
    teacher_cache: str = ""
    classes: str = ""  # fidelity class list (default: Context59's names)
    # speed report
    resolutions: tuple[int, ...] = ()  # default: 2x, 3x, 4x the native size
    strides: tuple[int, ...] = PAPER_STRIDES  # pixels; those larger than the crop are left out
    repeats: int = 3
    # tracking & output
    experiment: str = "spar-eval"
    run_name: str = ""
    workdir: str = ""  # default: $SPAR_WORKDIR or ./work (as spar distill)
    overlays: int = 4
    out: str = ""  # optional folder for results.json / tables / plots (default: a temp dir, logged to MLflow)
    mlflow: bool = True
    parent_run: str = ""  # MLflow id of the training run evaluated ("" = the one that produced --checkpoint)

    def __post_init__(self) -> None:
        for k in ("max_images", "crop", "stride", "workers", "overlays", "repeats", "window_batch"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.window_batch == 0 or self.repeats == 0:
            raise ConfigError("window_batch and repeats must be >= 1")
        for k in ("short_side", "long_side"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ConfigError(f"{k} must be >= 0, got {v}")
        for k in ("prob_thd", "area_thd"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{k} must be in [0, 1], got {v}")
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise ConfigError(f"logit_scale must be > 0, got {self.logit_scale}")
        if any(r <= 0 for r in self.resolutions) or any(s <= 0 for s in self.strides):
            raise ConfigError("resolutions and strides must be positive")
        if self.class_set not in CLASS_SETS:
            raise ConfigError(f"class_set must be one of {', '.join(CLASS_SETS)}, got {self.class_set!r}")
        if self.fidelity and self.speed:
            raise ConfigError("choose one of --fidelity and --speed")
        if self.baseline and self.checkpoint:
            raise ConfigError(
                "--baseline evaluates a named backbone; it cannot be combined with --checkpoint"
            )


@dataclass(frozen=True)
class Protocol:
    """The resolved evaluation protocol for one dataset and backbone."""

    short_side: int
    long_side: int
    logit_scale: float
    prob_thd: float
    area_thd: float
    mode: str
    crop: int
    stride: int


def backbone_family(readout: str) -> str:
    """``clip`` for the MaskCLIP readout (CLIP towers), ``siglip2`` otherwise (the protocol's two columns).

    DINOv3 dino.txt (``dinotxt-*`` readouts) takes the non-CLIP column, as the reference's configs/dinov3txt do.
    """
    return "clip" if readout == "maskclip" else "siglip2"


def resolve_protocol(cfg: EvalConfig, readout: str, native_size: int, patch: int) -> Protocol:
    """Fill the authors' per-dataset, per-backbone-family defaults into the fields left at None."""
    ds, fam = cfg.dataset, backbone_family(readout)
    paper_short, paper_long = PAPER_SIZES.get(ds, (672, 2048))
    short = cfg.short_side if cfg.short_side is not None else paper_short
    long = cfg.long_side if cfg.long_side is not None else paper_long
    scale = cfg.logit_scale if cfg.logit_scale is not None else PAPER_LOGIT_SCALE.get(ds, 40.0)
    prob = cfg.prob_thd if cfg.prob_thd is not None else PAPER_PROB_THD.get((ds, fam), 0.0)
    area = cfg.area_thd if cfg.area_thd is not None else PAPER_AREA_THD.get((ds, fam), 0.0)
    crop = cfg.crop or native_size
    if crop % patch:
        raise ConfigError(f"crop {crop} is not a multiple of the patch size {patch}")
    stride = cfg.stride or default_stride(crop)
    return Protocol(short, long, float(scale), float(prob), float(area), cfg.mode, crop, stride)


def _workdir(cfg: EvalConfig) -> str:
    return cfg.workdir or os.environ.get("SPAR_WORKDIR", "work")


# ---------------------------------------------------------------------------------------------- benchmark


def _model_spec(cfg: EvalConfig) -> dict[str, Any]:
    return {
        "checkpoint": cfg.checkpoint,
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "seed": cfg.seed,
    }


def _features(bb, img: np.ndarray, proto: Protocol, precision: str, window_batch: int) -> torch.Tensor:
    """Dense features (1, h, w, D) of the protocol's model input (mmseg keep-ratio resize without antialias, the
    top-left multiple of the patch size, as the reference); sliding falls back to one pass when the crop covers it."""
    x, _ = model_input(img, proto.short_side, proto.long_side, bb.patch_size)  # (h', w', 3), multiples of p
    mode = proto.mode if (proto.mode == "single" or proto.crop < max(x.shape[:2])) else "single"
    return dense_features(bb, x, mode, proto.crop, proto.stride, precision, window_batch)


def _overlay_png(img: np.ndarray, pred: np.ndarray, label: np.ndarray, names: list[str]) -> bytes:
    """Image | prediction overlay | ground-truth overlay, side by side, as PNG bytes."""
    pal = make_palette(len(names))
    panels = [img, np.asarray(overlay(img, pred, names, pal)), np.asarray(overlay(img, label, names, pal))]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def eval_chunk(
    cfg_dict: dict[str, Any], indices: list[int], overlay_indices: list[int] = (), model=None
) -> dict[str, Any]:
    """Evaluate the images ``indices`` of the configured dataset; returns plain counts (summable across tasks).

    Returns {"intersection", "union", "label_area" (num_classes,) int64, "out_of_range": {key: pixels},
    "images": n, "seconds": model time, "overlays": {key: png bytes}}. Runs in the driver (``model``: an
    already loaded backbone) or as a Ray task (loads its own).
    """
    from spar_core.metrics import IoUAccumulator
    from spar_core.segment import predict

    cfg = EvalConfig(**cfg_dict)
    ds = open_dataset(cfg.dataset, cfg.data_root, cfg.split)
    dev = pick_device(cfg.device)
    bb = model if model is not None else load_model(**_model_spec(cfg), device=dev)
    dev = next(bb.parameters()).device
    proto = resolve_protocol(cfg, bb.readout, bb.native_size, bb.patch_size)
    classes = _benchmark_classes(cfg)
    clf = build_text_classifier(bb, classes, cfg.templates)
    names = display_names(cfg.dataset, classes)
    acc = IoUAccumulator(ds.num_classes, ignore_index=255)
    seconds, pngs = 0.0, {}
    warm = np.zeros(
        (proto.crop, proto.crop, 3), np.uint8
    )  # warm-up (lazy init, kernels) kept out of the timing
    dense_features(bb, warm, "single", precision=cfg.precision)
    for i in indices:
        img, label = ds.load(i)
        t0 = time.perf_counter()
        feats = _features(bb, img, proto, cfg.precision, cfg.window_batch)  # (1, h, w, D)
        with torch.no_grad():
            pred = predict(
                feats,
                clf,
                out_size=label.shape,
                logit_scale=proto.logit_scale,
                prob_thd=proto.prob_thd,
                area_thd=proto.area_thd,
            )[0]  # (H, W)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds += time.perf_counter() - t0
        pred = pred.cpu().numpy()
        acc.update(pred, label)
        if i in overlay_indices:
            pngs[ds.samples[i].key] = _overlay_png(img, pred, label, names)
    return {
        "intersection": acc.intersection,
        "union": acc.union,
        "label_area": acc.label_area,
        "out_of_range": dict(ds.out_of_range),
        "images": len(indices),
        "seconds": seconds,
        "overlays": pngs,
    }


def _benchmark_classes(cfg: EvalConfig) -> list[list[str]]:
    if cfg.classes_file:
        classes = read_class_file(cfg.classes_file)
    else:
        classes = default_classes(cfg.dataset, cfg.class_set)
    n = INFOS[cfg.dataset].num_classes
    if len(classes) != n:
        raise EvalError(
            f"class list {cfg.classes_file or cfg.dataset} has {len(classes)} classes; {cfg.dataset} has {n}"
        )
    return classes


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """Contiguous, near-equal chunks (no empty ones)."""
    parts = max(1, min(parts, len(indices)))
    bounds = np.linspace(0, len(indices), parts + 1).round().astype(int)
    return [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _run_chunks(
    cfg: EvalConfig, chunks: list[list[int]], overlay_idx: list[int], model
) -> list[dict[str, Any]]:
    cfg_dict = asdict(cfg)
    for k in ("data_root", "checkpoint", "classes_file", "pretrained"):  # remote workers may run elsewhere
        if cfg_dict[k] and Path(cfg_dict[k]).expanduser().exists():
            cfg_dict[k] = str(Path(cfg_dict[k]).expanduser().resolve())
    if cfg.workers <= 0:
        return [eval_chunk(cfg_dict, c, overlay_idx, model) for c in chunks]
    import ray

    from pipeline.common.tasks import cluster_gpus, init_ray

    init_ray(address=cfg.ray_address or None)
    gpus = cfg.gpus_per_worker
    if gpus == 0 and cfg.device != "cpu" and cluster_gpus() > 0:
        gpus = 1.0  # a GPU cluster: one GPU per task unless told otherwise
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2)(eval_chunk)
    return ray.get([task.remote(cfg_dict, c, [i for i in overlay_idx if i in c]) for c in chunks])


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the intersection/union/label-area counts of evaluation chunks; IoU (percent) and mIoU at the end.

    IoU is NaN for classes absent from both labels and predictions; mIoU averages the others.
    """
    inter = np.sum([np.asarray(p["intersection"], np.int64) for p in parts], axis=0)
    union = np.sum([np.asarray(p["union"], np.int64) for p in parts], axis=0)
    area = np.sum([np.asarray(p["label_area"], np.int64) for p in parts], axis=0)
    oor: dict[str, int] = {}
    for p in parts:
        oor.update(p.get("out_of_range", {}))
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan) * 100.0
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return {
        "intersection": inter,
        "union": union,
        "label_area": area,
        "out_of_range": oor,
        "iou": iou,
        "miou": miou,
    }


def display_names(dataset: str, classes: list[list[str]]) -> list[str]:
    """One display name per class: the first synonym; a background class (VOC21/Context60) shows 'background'."""
    names = [c[0] for c in classes]
    if INFOS[dataset].has_background:
        names[0] = "background"
    return names


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the benchmark evaluation; returns {"miou", "iou" (per class), "classes", "images_per_s", ...}.

    mIoU/IoU are in percent, summed as intersection/union counts over the whole set (and over Ray tasks).
    """
    if not cfg.data_root:
        raise EvalError("--data-root is required for a benchmark evaluation")
    if not (cfg.checkpoint or cfg.backbone):
        raise EvalError("give --checkpoint CKPT or --baseline --backbone NAME")
    ds = open_dataset(cfg.dataset, cfg.data_root, cfg.split)  # fail early on a bad layout
    classes = _benchmark_classes(cfg)
    indices = list(range(len(ds)))[: cfg.max_images or None]
    overlay_idx = indices[: cfg.overlays]
    local = cfg.workers <= 0
    # with Ray workers the driver loads the model only for its identity and protocol (on the CPU)
    bb = load_model(**_model_spec(cfg), device=pick_device(cfg.device) if local else "cpu")
    ident = model_identity(bb)
    proto = resolve_protocol(cfg, bb.readout, bb.native_size, bb.patch_size)
    if proto.prob_thd > 0 and not INFOS[cfg.dataset].has_background:
        print(
            f"warning: prob_thd {proto.prob_thd} sends low-confidence pixels to class 0 ({classes[0][0]!r}), "
            f"but {cfg.dataset} has no background class"
        )
    t0 = time.perf_counter()
    parts = _run_chunks(cfg, _split(indices, max(cfg.workers, 1)), overlay_idx, bb if local else None)
    del bb
    wall = time.perf_counter() - t0
    counts = merge_counts(parts)
    iou, miou = counts["iou"], counts["miou"]
    inter, union, area, oor = (
        counts["intersection"],
        counts["union"],
        counts["label_area"],
        counts["out_of_range"],
    )
    n = sum(p["images"] for p in parts)
    model_s = sum(p["seconds"] for p in parts)
    result = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "images": n,
        "num_classes": ds.num_classes,
        "miou": miou,
        "iou": [None if math.isnan(v) else float(v) for v in iou],
        "classes": display_names(cfg.dataset, classes),
        "label_pixels": area.tolist(),
        "intersection": inter.tolist(),
        "union": union.tolist(),
        "images_per_s": n / model_s if model_s > 0 else float("nan"),
        "wall_s": wall,
        "out_of_range_pixels": int(sum(oor.values())),
        "out_of_range_images": oor,
        "protocol": asdict(proto),
        "model": ident,
        "workers": cfg.workers,
    }
    overlays = {k: v for p in parts for k, v in p["overlays"].items()}
    if oor:
        print(
            f"warning: {len(oor)} label map(s) had {result['out_of_range_pixels']} pixel(s) outside "
            f"0..{ds.num_classes - 1} (treated as ignore), e.g. {next(iter(oor))}"
        )
    print(format_iou_table(result))
    _log_benchmark(cfg, result, overlays)
    return result


def format_iou_table(result: dict[str, Any]) -> str:
    """Per-class IoU table plus the summary line, for the terminal."""
    w = max(12, *(len(c) for c in result["classes"]))
    lines = [f"{'class':<{w}}  {'IoU %':>7}  {'label px':>10}"]
    for c, v, a in zip(result["classes"], result["iou"], result["label_pixels"], strict=True):
        lines.append(f"{c:<{w}}  {('-' if v is None else f'{v:.2f}'):>7}  {a:>10}")
    lines.append("-" * (w + 21))
    lines.append(
        f"{result['dataset']} ({result['images']} images): mIoU {result['miou']:.2f}  "
        f"{result['images_per_s']:.2f} images/s  [{result['protocol']['mode']}]"
    )
    return "\n".join(lines)


def _metric_key(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)[:200]


def _class_key_part(name: str) -> str:
    """A class name as one metric-key segment: no '/', '\\' or '..' (MLflow refuses path-like keys)."""
    import re

    part = re.sub(r"[^A-Za-z0-9_\- ]", "_", str(name)).strip() or "_"
    return part[:120]


def _output_dir(cfg: EvalConfig) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if cfg.out:
        p = Path(cfg.out).expanduser()
        p.mkdir(parents=True, exist_ok=True)
        return p, None
    tmp = tempfile.TemporaryDirectory(prefix="spar-eval-")
    return Path(tmp.name), tmp


def _parent_run(cfg: EvalConfig, uri: str) -> tuple[str, str] | None:
    """(run id, experiment id) of the training run this evaluation belongs under, if any."""
    from mlflow import MlflowClient

    from pipeline.common.tracking import training_run_of

    if cfg.parent_run:
        try:
            run = MlflowClient(uri).get_run(cfg.parent_run)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own exception types
            raise EvalError(f"--parent-run {cfg.parent_run}: no such MLflow run in {uri} ({e})") from None
        return run.info.run_id, run.info.experiment_id
    return training_run_of(cfg.checkpoint, uri)


@contextlib.contextmanager
def _start_run(cfg: EvalConfig, default_name: str, extra_params: dict[str, Any]) -> Iterator[Any]:
    """An MLflow run with the resolved config (``extra_params`` override the config's unresolved values: one name
    per parameter), git commit and system metrics; a child of the evaluated training run when there is one (in
    that run's experiment), else a run of ``cfg.experiment``."""
    import mlflow

    from pipeline.common.tracking import (
        PARENT_RUN_TAG,
        git_commit,
        log_params_flat,
        setup_experiment,
        system_metrics,
        tracking_uri,
    )

    exp_id = setup_experiment(cfg.experiment, _workdir(cfg))
    uri = tracking_uri(_workdir(cfg))
    parent = _parent_run(cfg, uri)
    tags = {"spar.stage": "eval", "git_commit": git_commit()}
    if parent is not None:
        exp_id = parent[1]
        tags[PARENT_RUN_TAG] = parent[0]
    with mlflow.start_run(experiment_id=exp_id, run_name=cfg.run_name or default_name, tags=tags) as run:
        log_params_flat({**to_dict(cfg), **extra_params, "parent_run": parent[0] if parent else ""})
        with system_metrics(run.info.run_id, uri):
            yield run


def _to_parent(run: Any, kind: str, metrics: dict[str, float]) -> None:
    """Copy an evaluation's headline metrics onto its training run (``<kind>/<name>``)."""
    import mlflow

    from pipeline.common.tracking import PARENT_RUN_TAG, log_headline_metrics

    parent = run.data.tags.get(PARENT_RUN_TAG)
    if parent:
        log_headline_metrics(mlflow.get_tracking_uri(), parent, kind, metrics)


def _lineage_params(cfg: EvalConfig, ident: dict[str, Any]) -> dict[str, Any]:
    out = {f"model.{k}": v for k, v in ident.items()}
    if cfg.checkpoint:
        try:
            from pipeline.train.checkpoint import read_backbone_info

            info = read_backbone_info(cfg.checkpoint)
            out["model.cache_fingerprint"] = info.get("cache_fingerprint", "")
            out["model.trainable_blocks"] = info.get("trainable_blocks", "")
        except Exception:  # lineage is best-effort; the model itself already loaded
            pass
    return out


def _log_benchmark(cfg: EvalConfig, result: dict[str, Any], overlays: dict[str, bytes]) -> None:
    out, tmp = _output_dir(cfg)
    try:
        (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "per_class_iou.txt").write_text(format_iou_table(result) + "\n")
        for key, png in overlays.items():
            (out / "overlays").mkdir(exist_ok=True)
            (out / "overlays" / f"{_metric_key(key).replace('/', '_').replace(' ', '_')}.png").write_bytes(
                png
            )
        if not cfg.mlflow:
            return
        import mlflow

        role = "student" if cfg.checkpoint else ("teacher" if cfg.mode == "sliding" else "baseline")
        params = dict(result["protocol"])  # the resolved protocol, under the config's own names
        params.update(_lineage_params(cfg, result["model"]))
        with _start_run(cfg, f"{cfg.dataset}-{role}", params) as run:
            mlflow.set_tag("spar.eval", "benchmark")
            mlflow.set_tag("spar.role", role)
            metrics = {
                "mIoU": result["miou"],
                "images_per_s": result["images_per_s"],
                "num_images": result["images"],
                "out_of_range_pixels": result["out_of_range_pixels"],
            }
            for c, v in zip(result["classes"], result["iou"], strict=True):
                if v is not None:
                    key = _metric_key("iou/" + _class_key_part(c))
                    while key in metrics:  # two hostile names sanitised alike stay two metrics
                        key += "_"
                    metrics[key] = v
            metrics = {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}
            mlflow.log_metrics(metrics)
            mlflow.log_table(
                {
                    "class": result["classes"],
                    "iou": result["iou"],
                    "label_pixels": result["label_pixels"],
                    "intersection": result["intersection"],
                    "union": result["union"],
                },
                artifact_file="per_class_iou.json",
            )
            mlflow.log_artifact(str(out / "per_class_iou.txt"))
            mlflow.log_artifact(str(out / "results.json"))
            if overlays:
                mlflow.log_artifacts(str(out / "overlays"), artifact_path="overlays")
                _log_images(out / "overlays", "overlay")
            headline = {"mIoU": result["miou"], "images_per_s": result["images_per_s"]}
            _to_parent(run, cfg.dataset if role == "student" else f"{cfg.dataset}_{role}", headline)
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---------------------------------------------------------------------------------------------- fidelity


def _seed_of(weights_id: str, default: int) -> int:
    """The seed of random weights from a weights id 'random:<name>:seed<k>' (else ``default``)."""
    import re

    m = re.fullmatch(r"random:.*:seed(\d+)", weights_id or "")
    return int(m.group(1)) if m else default


def fidelity_report(cfg: EvalConfig) -> dict[str, Any]:
    """Labels-free quality report on held-out images against their cached teacher features.

    For the single-pass baseline (the cache's backbone, no training) and, with ``checkpoint``, the student:
    feature MSE and mean cosine to the teacher pooled over every patch position of every image, and
    segmentation agreement: mIoU (percent) and pixel agreement of each prediction against the teacher's own
    prediction for the class list. Returns {"images", "baseline": {...}, "student": {...}?}.
    """
    from pipeline.cache.store import open_cache
    from pipeline.data.imageset import open_imageset
    from spar_core.backbones import build_backbone
    from spar_core.metrics import IoUAccumulator, feature_fidelity
    from spar_core.segment import predict

    if not cfg.images or not cfg.teacher_cache:
        raise EvalError("--fidelity needs --images ROOT and --teacher-cache PATH")
    ims = open_imageset(cfg.images)
    cache = open_cache(cfg.teacher_cache)
    cache.check_pairing(ims)
    spec = cache.spec
    dev = pick_device(cfg.device)
    pretrained = cfg.pretrained or spec.pretrained or None  # the spec's path is a hint from another machine
    try:
        base = build_backbone(spec.backbone, pretrained, device=dev, seed=_seed_of(spec.weights_id, cfg.seed))
    except (ValueError, FileNotFoundError) as e:
        raise EvalError(
            f"cannot rebuild the cache's backbone {spec.backbone!r} ({e}); pass --pretrained"
        ) from e
    if base.weights_id != spec.weights_id:
        raise EvalError(
            f"teacher cache {cfg.teacher_cache} was computed with weights {spec.weights_id!r}, but the baseline "
            f"built here has {base.weights_id!r} (pass the same pretrained weights)"
        )
    models = {"baseline": base}
    if cfg.checkpoint:
        student = load_model(cfg.checkpoint, device=dev)
        if student.name != spec.backbone:
            raise EvalError(
                f"checkpoint {cfg.checkpoint} is a {student.name} student; the cache is for {spec.backbone}"
            )
        models["student"] = student
        from pipeline.train.checkpoint import read_backbone_info

        trained_on = read_backbone_info(cfg.checkpoint).get("cache_fingerprint") or ""
        if trained_on and trained_on == cache.fingerprint:
            print(
                f"warning: {cfg.checkpoint} was trained on this very cache ({trained_on[:12]}): the images "
                "are not held out, so the student's numbers measure fit, not generalisation"
            )
    if cfg.classes or cfg.classes_file:
        classes = resolve_classes(cfg.classes, cfg.classes_file)
    else:
        classes = default_classes("context59", cfg.class_set)
    clf = build_text_classifier(base, classes, cfg.templates)
    scale = cfg.logit_scale if cfg.logit_scale is not None else 40.0
    sums = {m: {"mse": 0.0, "cosine": 0.0, "agree": 0, "pixels": 0} for m in models}
    accs = {m: IoUAccumulator(len(classes), ignore_index=-1) for m in models}
    positions, n = 0, 0
    limit = cfg.max_images or None
    for shard in range(ims.num_shards):
        for rec, img in ims.iter_shard(shard):
            if limit is not None and n >= limit:
                break
            teacher = torch.from_numpy(np.asarray(cache.features(rec.key), dtype=np.float32)).to(
                dev
            )  # (h, w, D)
            hw = teacher.shape[0] * teacher.shape[1]
            out_size = img.shape[:2]
            with torch.no_grad():
                t_pred = predict(teacher[None], clf, out_size=out_size, logit_scale=scale)[0].cpu()  # (H, W)
            for m, bb in models.items():
                feats = dense_features(bb, img, "single", precision=cfg.precision)[0]  # (h, w, D)
                if feats.shape != teacher.shape:
                    raise EvalError(
                        f"image {rec.key}: {m} features {tuple(feats.shape)} vs cached teacher "
                        f"{tuple(teacher.shape)}"
                    )
                f = feature_fidelity(feats, teacher)
                sums[m]["mse"] += f["mse"] * hw
                sums[m]["cosine"] += f["cosine"] * hw
                with torch.no_grad():
                    pred = predict(feats[None], clf, out_size=out_size, logit_scale=scale)[0].cpu()
                accs[m].update(pred, t_pred)
                sums[m]["agree"] += int((pred == t_pred).sum())
                sums[m]["pixels"] += pred.numel()
            positions += hw
            n += 1
    if n == 0:
        raise EvalError(f"no images in {cfg.images}")
    result: dict[str, Any] = {
        "images": n,
        "positions": positions,
        "classes": [c[0] for c in classes],
        "teacher": {
            "crop": spec.crop,
            "stride": spec.stride,
            "backbone": spec.backbone,
            "cache_fingerprint": cache.fingerprint,
        },
    }
    for m in models:
        result[m] = {
            "mse": sums[m]["mse"] / positions,
            "cosine": sums[m]["cosine"] / positions,
            "miou_vs_teacher": accs[m].miou() * 100.0,
            "pixel_agreement": sums[m]["agree"] / sums[m]["pixels"],
        }
    print(format_fidelity(result))
    _log_fidelity(cfg, result)
    return result


def format_fidelity(result: dict[str, Any]) -> str:
    """The fidelity report as a terminal table."""
    rows = [f"{'model':<10} {'MSE':>12} {'cosine':>8} {'mIoU vs teacher':>16} {'pixel agree':>12}"]
    for m in ("baseline", "student"):
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


def _log_fidelity(cfg: EvalConfig, result: dict[str, Any]) -> None:
    out, tmp = _output_dir(cfg)
    try:
        (out / "fidelity.json").write_text(json.dumps(result, indent=1))
        if not cfg.mlflow:
            return
        import mlflow

        params = {
            "teacher.cache_fingerprint": result["teacher"]["cache_fingerprint"],
            "teacher.crop": result["teacher"]["crop"],
            "teacher.stride": result["teacher"]["stride"],
        }
        with _start_run(cfg, "fidelity", params) as run:
            mlflow.set_tag("spar.eval", "fidelity")
            metrics = {"num_images": result["images"]}
            for m in ("baseline", "student"):
                for k, v in result.get(m, {}).items():
                    metrics[f"{m}_{k}"] = v
            if "student" in result and result["baseline"]["mse"] > 0:
                metrics["mse_ratio"] = result["student"]["mse"] / result["baseline"]["mse"]
            metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
            mlflow.log_metrics(metrics)
            mlflow.log_artifact(str(out / "fidelity.json"))
            _log_feature_pca(cfg, out)
            _to_parent(run, "fidelity", {k: v for k, v in metrics.items() if k != "num_images"})
    finally:
        if tmp is not None:
            tmp.cleanup()


def _log_images(folder: Path, key: str, only: list[str] | None = None) -> None:
    """PNG files of ``folder`` as MLflow images of the active run (the UI shows them as pictures)."""
    import mlflow
    from PIL import Image

    for png in sorted(folder.glob("*.png")):
        if only is not None and png.name not in only:
            continue
        with Image.open(png) as im:
            mlflow.log_image(im.convert("RGB"), key=f"{key}/{png.stem}", step=0)


def _log_feature_pca(cfg: EvalConfig, out: Path) -> None:
    """PCA pictures of teacher / baseline / student features (one shared basis per image) on the fidelity run."""
    try:
        from pipeline.eval.viz import fidelity_pca_pngs
    except ImportError:  # pragma: no cover - viz not available in this build
        return
    import mlflow

    pngs = fidelity_pca_pngs(cfg, out / "pca")
    if pngs:
        mlflow.log_artifacts(str(out / "pca"), artifact_path="pca")
        _log_images(out / "pca", "pca")


# ---------------------------------------------------------------------------------------------- speed


def speed_strides(strides: tuple[int, ...], crop: int) -> list[int]:
    """The swept strides in pixels, deduplicated, leaving out those larger than the crop (gaps)."""
    out = [s for s in dict.fromkeys(strides) if s <= crop]
    if not out:
        raise EvalError(f"no stride in {list(strides)} fits the crop {crop} (a stride must be <= the crop)")
    return out


def _time(fn, dev: torch.device, repeats: int, budget_s: float = 5.0) -> float:
    """Median seconds of ``fn()``; the first call is the warm-up, and also the answer if it exceeded budget."""

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    first = once()
    if first > budget_s:
        return first
    return float(np.median([once() for _ in range(repeats)]))


def speed_report(cfg: EvalConfig) -> dict[str, Any]:
    """Seconds per image: single pass vs sliding window (crop = native size) at strides in pixels and several
    square resolutions. Returns {"resolutions", "strides", "single": [s], "sliding": {stride: [s]}, "windows"}."""
    from pipeline.eval.inference import autocast, autocast_dtype
    from spar_core.sliding import num_windows, sliding_window_features

    if not (cfg.checkpoint or cfg.backbone):
        raise EvalError("--speed needs --backbone NAME or --checkpoint CKPT")
    dev = pick_device(cfg.device)
    bb = load_model(**_model_spec(cfg), device=dev)
    native, p = bb.native_size, bb.patch_size
    crop = cfg.crop or native
    strides = speed_strides(cfg.strides, crop)
    res = list(cfg.resolutions) or [2 * native, 3 * native, 4 * native]
    res = [max(p, round(r / p) * p) for r in res]
    gen = torch.Generator().manual_seed(cfg.seed)
    single, sliding, windows = [], {s: [] for s in strides}, {s: [] for s in strides}
    for r in res:
        x = torch.randn(1, 3, r, r, generator=gen).to(dev, next(bb.parameters()).dtype)

        def run_single(x=x):
            with torch.no_grad(), autocast(dev, cfg.precision):
                bb.dense(x)

        single.append(_time(run_single, dev, cfg.repeats))
        for s in strides:

            def run_slide(x=x, s=s):
                with torch.no_grad():
                    sliding_window_features(bb, x, crop, s, cfg.window_batch, autocast_dtype(cfg.precision))

            sliding[s].append(_time(run_slide, dev, cfg.repeats) if crop < r else single[-1])
            windows[s].append(num_windows(r, r, crop, s) if crop < r else 1)
    result = {
        "backbone": bb.name,
        "device": str(dev),
        "precision": cfg.precision,
        "crop": crop,
        "resolutions": res,
        "strides": strides,
        "single": single,
        "sliding": {str(s): v for s, v in sliding.items()},
        "windows": {str(s): v for s, v in windows.items()},
    }
    print(format_speed(result))
    if cfg.images:
        result["quality_cost"] = quality_vs_cost(cfg, bb, crop, strides)
        print(format_quality_cost(result["quality_cost"]))
    _log_speed(cfg, result)
    return result


def quality_vs_cost(cfg: EvalConfig, model, crop: int, strides: list[int]) -> dict[str, Any]:
    """The quality-vs-cost curve on real held-out images (``cfg.images``, an image set, at stored sizes).

    Reference: the base backbone's sliding window at the finest stride. Points: single pass, sliding at each
    stride and (for a checkpoint) the student's single pass, each with mean seconds/image and the feature MSE
    and mean cosine to the reference pooled over every patch position.
    """
    from pipeline.data.imageset import open_imageset
    from spar_core.backbones import build_backbone
    from spar_core.metrics import feature_fidelity

    ims = open_imageset(cfg.images)
    dev = next(model.parameters()).device
    if cfg.checkpoint:  # the teacher/baseline are the student's untrained base
        base = build_backbone(
            model.name, model.pretrained or None, device=dev, seed=_seed_of(model.weights_id, 0)
        )
    else:
        base = model
    ref_stride = min(strides)
    methods: list[tuple[str, Any, int | None]] = [("single pass", base, None)]
    methods += [(f"sliding s{s}", base, s) for s in sorted(strides, reverse=True)]
    if cfg.checkpoint:
        methods.append(("student", model, None))
    acc = {m: {"seconds": 0.0, "mse": 0.0, "cosine": 0.0} for m, _, _ in methods}
    positions, n, limit = 0, 0, cfg.max_images or None
    for shard in range(ims.num_shards):
        for _, img in ims.iter_shard(shard):
            if limit is not None and n >= limit:
                break
            feats = {}
            for name, bb, s in methods:
                mode = "single" if s is None or crop >= max(img.shape[:2]) else "sliding"
                t0 = time.perf_counter()
                feats[name] = dense_features(bb, img, mode, crop, s or 0, cfg.precision, cfg.window_batch)[0]
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                acc[name]["seconds"] += time.perf_counter() - t0
            ref = feats[f"sliding s{ref_stride}"]  # (h, w, D)
            hw = ref.shape[0] * ref.shape[1]
            for name, f in feats.items():
                fid = feature_fidelity(f, ref)
                acc[name]["mse"] += fid["mse"] * hw
                acc[name]["cosine"] += fid["cosine"] * hw
            positions += hw
            n += 1
    if n == 0:
        raise EvalError(f"no images in {cfg.images}")
    points = [
        {
            "method": m,
            "seconds": a["seconds"] / n,
            "mse": a["mse"] / positions,
            "cosine": a["cosine"] / positions,
        }
        for m, a in acc.items()
    ]
    return {"images": n, "reference": f"sliding s{ref_stride}", "crop": crop, "points": points}


def format_quality_cost(qc: dict[str, Any]) -> str:
    """Quality-vs-cost table."""
    rows = [
        f"{'method':<14} {'s/image':>10} {'cosine':>8} {'MSE':>12}   (vs {qc['reference']}, {qc['images']} images)"
    ]
    for p in qc["points"]:
        rows.append(f"{p['method']:<14} {p['seconds']:>10.4f} {p['cosine']:>8.4f} {p['mse']:>12.6g}")
    return "\n".join(rows)


def quality_cost_plot(qc: dict[str, Any], path: Path) -> Path:
    """Cosine to the finest teacher vs seconds/image (log), one labelled point per method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    slide = [p for p in qc["points"] if p["method"].startswith("sliding")]
    ax.plot([p["seconds"] for p in slide], [p["cosine"] for p in slide], "s--", label="sliding window")
    for p in qc["points"]:
        if not p["method"].startswith("sliding"):
            ax.plot([p["seconds"]], [p["cosine"]], "o", markersize=8, label=p["method"])
        ax.annotate(
            p["method"], (p["seconds"], p["cosine"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("seconds / image")
    ax.set_ylabel(f"mean cosine to {qc['reference']}")
    ax.set_title(f"quality vs cost ({qc['images']} held-out images)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_speed(result: dict[str, Any]) -> str:
    """Speed table: seconds/image and slowdown vs single pass."""
    head = f"{'resolution':>10} {'single s':>10}" + "".join(
        f" {'s' + s + ' s (x)':>18}" for s in result["sliding"]
    )
    rows = [head]
    for i, r in enumerate(result["resolutions"]):
        line = f"{r:>10} {result['single'][i]:>10.4f}"
        for _s, v in result["sliding"].items():
            line += f" {v[i]:>10.4f} ({v[i] / result['single'][i]:>5.1f}x)"
        rows.append(line)
    rows.append(f"{result['backbone']} on {result['device']} ({result['precision']}), crop {result['crop']}")
    return "\n".join(rows)


def speed_plot(result: dict[str, Any], path: Path) -> Path:
    """Seconds/image vs resolution (log scale), one line per method, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["resolutions"], result["single"], "o-", label="single pass")
    for s, v in result["sliding"].items():
        ax.plot(result["resolutions"], v, "s--", label=f"sliding, stride {s}")
    ax.set_xlabel("image side (px)")
    ax.set_ylabel("seconds / image")
    ax.set_yscale("log")
    ax.set_title(f"{result['backbone']}: single pass vs sliding window (crop {result['crop']})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _log_speed(cfg: EvalConfig, result: dict[str, Any]) -> None:
    out, tmp = _output_dir(cfg)
    try:
        (out / "speed.json").write_text(json.dumps(result, indent=1))
        (out / "speed.txt").write_text(format_speed(result) + "\n")
        speed_plot(result, out / "speed.png")
        if "quality_cost" in result:
            quality_cost_plot(result["quality_cost"], out / "quality_cost.png")
        if not cfg.mlflow:
            return
        import mlflow

        resolved = {
            "crop": result["crop"],
            "resolutions": tuple(result["resolutions"]),
            "strides": tuple(int(s) for s in result["sliding"]),
        }
        with _start_run(cfg, f"speed-{result['backbone']}", resolved) as run:
            mlflow.set_tag("spar.eval", "speed")
            metrics = {}
            for i, r in enumerate(result["resolutions"]):
                metrics[f"sec_single_r{r}"] = result["single"][i]
                for s, v in result["sliding"].items():
                    metrics[f"sec_sliding_s{s}_r{r}"] = v[i]
                    metrics[f"slowdown_s{s}_r{r}"] = v[i] / result["single"][i]
            files = ["speed.json", "speed.txt", "speed.png"]
            if "quality_cost" in result:
                for p in result["quality_cost"]["points"]:
                    key = _metric_key(p["method"]).replace(" ", "_")
                    metrics[f"qc_cosine_{key}"] = p["cosine"]
                    metrics[f"qc_sec_{key}"] = p["seconds"]
                files.append("quality_cost.png")
            mlflow.log_metrics(metrics)
            for f in files:
                mlflow.log_artifact(str(out / f))
            _log_images(out, "speed", only=[f for f in files if f.endswith(".png")])
            _to_parent(
                run, "speed", {k: v for k, v in metrics.items() if k.startswith(("slowdown_", "sec_"))}
            )
    finally:
        if tmp is not None:
            tmp.cleanup()


# ---------------------------------------------------------------------------------------------- CLI


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Dispatch to the benchmark, fidelity or speed report."""
    if cfg.fidelity:
        return fidelity_report(cfg)
    if cfg.speed:
        return speed_report(cfg)
    return evaluate(cfg)


def _cmd_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(EvalConfig, args, "eval")
    run_eval(cfg)
    return 0


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def add_eval_cli(subparsers) -> None:
    """Register ``eval``."""
    p = subparsers.add_parser("eval", help="segmentation benchmarks (mIoU), --fidelity or --speed reports")
    p.add_argument(
        "--fidelity", action="store_const", const=True, help="labels-free report vs a teacher cache"
    )
    p.add_argument("--speed", action="store_const", const=True, help="single pass vs sliding window timings")
    p.add_argument("--checkpoint", help="student checkpoint directory")
    p.add_argument("--baseline", action="store_const", const=True, help="evaluate the named --backbone as is")
    p.add_argument("--backbone")
    p.add_argument("--pretrained", help="open_clip tag or local weights file for --backbone")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root", dest="data_root")
    p.add_argument("--split")
    p.add_argument("--max-images", dest="max_images", type=int)
    p.add_argument("--classes-file", dest="classes_file")
    p.add_argument(
        "--class-set", dest="class_set", choices=list(CLASS_SETS), help="packaged class lists (default paper)"
    )
    p.add_argument("--classes", help="fidelity report class list: 'sky,clouds;road;...'")
    p.add_argument("--templates", choices=["imagenet", "simple"])
    p.add_argument("--short-side", dest="short_side", type=int)
    p.add_argument("--long-side", dest="long_side", type=int)
    p.add_argument("--logit-scale", dest="logit_scale", type=float)
    p.add_argument("--prob-thd", dest="prob_thd", type=float)
    p.add_argument("--area-thd", dest="area_thd", type=float)
    p.add_argument("--mode", choices=["single", "sliding"])
    p.add_argument("--crop", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--window-batch", dest="window_batch", type=int)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="mixed precision (autocast)")
    p.add_argument("--device")
    p.add_argument("--workers", type=int, help="split the images across N Ray tasks")
    p.add_argument("--ray-address", dest="ray_address")
    p.add_argument("--images", help="held-out image set root (fidelity; speed: quality-vs-cost curve)")
    p.add_argument("--teacher-cache", dest="teacher_cache", help="fidelity: teacher cache of those images")
    p.add_argument("--resolutions", type=_csv_ints, help="speed: image sides, e.g. 448,672,1024")
    p.add_argument(
        "--strides", type=_csv_ints, help="speed: window strides in pixels, default 224,112,48,24 (<= crop)"
    )
    p.add_argument("--repeats", type=int)
    p.add_argument("--experiment")
    p.add_argument("--run-name", dest="run_name")
    p.add_argument(
        "--workdir", help="MLflow store location (default $SPAR_WORKDIR or ./work, as spar distill)"
    )
    p.add_argument("--overlays", type=int, help="prediction overlays to log")
    p.add_argument("--out", help="also keep results/tables/plots in this folder")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_const", const=False)
    p.add_argument(
        "--parent-run",
        dest="parent_run",
        help="MLflow run id of the training run evaluated (default: the run that produced --checkpoint)",
    )
    p.add_argument("--config", help="TOML recipe ([eval] section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_eval)


def _cmd_classes(args: argparse.Namespace) -> int:
    print(format_classes(default_classes(args.dataset, args.class_set)))
    return 0


def add_classes_cli(subparsers) -> None:
    """Register ``classes``: print a packaged class list, one class a line, synonyms separated by ', '."""
    sets = "; ".join(f"{k}: {v}" for k, v in CLASS_SETS.items())
    p = subparsers.add_parser("classes", help="print the class list a benchmark is evaluated with")
    p.add_argument("dataset", choices=DATASETS, metavar="DATASET", help=", ".join(DATASETS))
    p.add_argument("--set", dest="class_set", choices=list(CLASS_SETS), default=DEFAULT_CLASS_SET, help=sets)
    p.set_defaults(func=_cmd_classes)


def add_cli(subparsers) -> None:
    """Register ``eval``, ``classes``, ``segment``, ``embed`` and ``runs``."""
    from pipeline.eval.inference import add_inference_cli
    from pipeline.eval.runs import add_runs_cli

    add_eval_cli(subparsers)
    add_classes_cli(subparsers)
    add_inference_cli(subparsers)
    add_runs_cli(subparsers)
