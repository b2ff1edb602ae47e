"""``spar eval``: open-vocabulary segmentation benchmarks (mIoU under the paper's protocol), and the command's
dispatch to the fidelity and speed reports.

One image's path: the dataset's (image, label) -> :func:`pipeline.eval.model.model_input` -> dense features
(single pass, or the sliding-window teacher) -> ``spar_core.segment.predict`` at the label's size ->
intersection/union counts (``spar_core.metrics.IoUAccumulator``). The images are split into contiguous chunks,
evaluated in the driver or as Ray tasks (``--workers N``, through :func:`pipeline.common.tasks.run_pool`); the
driver merges the chunks' counts and computes IoU once at the end. Results go to MLflow
(:mod:`pipeline.eval.tracking`: metrics, params, a per-class table, overlays) and the terminal.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from PIL import Image

from pipeline.common.config import config_from_cli
from pipeline.common.tasks import cluster_gpus, init_ray, run_pool, task_runtime_env
from pipeline.data.datasets import (
    INFOS,
    default_classes,
    format_classes,
    open_dataset,
    read_class_file,
)
from pipeline.eval.config import BenchmarkConfig, EvalConfig, EvalError, FidelityConfig, SpeedConfig
from pipeline.eval.fidelity import fidelity_report
from pipeline.eval.model import (
    build_text_classifier,
    dense_features,
    label_map,
    load_model,
    model_identity,
    model_input,
    pick_device,
    resolve_protocol,
    synchronize,
)
from pipeline.eval.segment import make_palette, overlay
from pipeline.eval.speed import speed_report
from pipeline.eval.tracking import EvalRun, class_key_part, log_eval, metric_key, output_dir, png_images
from pipeline.student.format import read_backbone_info
from spar_core.backbones import Backbone
from spar_core.metrics import IoUAccumulator


@dataclass
class ChunkResult:
    """What evaluating one chunk of images returns (summable across chunks and Ray tasks)."""

    counts: IoUAccumulator  # intersection / union / label area per class
    out_of_range: dict[str, int]  # sample key -> label pixels outside the class range (treated as ignore)
    images: int
    seconds: float  # model time (features + prediction), warm-up excluded
    overlays: dict[str, bytes] = field(default_factory=dict)  # sample key -> PNG


# ---------------------------------------------------------------------------------------------- one chunk


def eval_chunk(
    cfg: BenchmarkConfig,
    indices: list[int],
    overlay_indices: Sequence[int] = (),
    model: Backbone | None = None,
) -> ChunkResult:
    """Evaluate the images ``indices`` of the configured dataset.

    Runs in the driver (``model``: an already loaded backbone) or as a Ray task (loads its own).
    """
    ds = open_dataset(cfg.dataset, cfg.data_root, cfg.split)
    bb = model if model is not None else load_model(**cfg.model_spec(), device=pick_device(cfg.device))
    dev = bb.mean.device
    proto = resolve_protocol(cfg, bb.readout, bb.native_size, bb.patch_size)
    classes = benchmark_classes(cfg)
    clf = build_text_classifier(bb, classes, cfg.templates)
    names = display_names(cfg.dataset, classes)
    acc = IoUAccumulator(ds.num_classes, ignore_index=255)
    seconds, pngs = 0.0, {}
    # warm-up (lazy init, kernels) kept out of the timing
    warm = np.zeros((proto.crop, proto.crop, 3), np.uint8)
    dense_features(bb, warm, "single", precision=cfg.precision)
    for i in indices:
        img, label = ds.load(i)
        t0 = time.perf_counter()
        # the protocol's model input (mmseg keep-ratio resize without antialias, the top-left multiple of the
        # patch size, as the reference), dense features, the (H, W) prediction at the label's size; sliding
        # falls back to one pass when the crop covers the input
        x, _ = model_input(img, proto.short_side, proto.long_side, bb.patch_size)  # (h', w', 3)
        mode = proto.mode if (proto.mode == "single" or proto.crop < max(x.shape[:2])) else "single"
        pred = label_map(
            bb, clf, x, label.shape, mode=mode, crop=proto.crop, stride=proto.stride, precision=cfg.precision,
            window_batch=cfg.window_batch, logit_scale=proto.logit_scale, prob_thd=proto.prob_thd,
            area_thd=proto.area_thd,
        )  # fmt: skip
        synchronize(dev)
        seconds += time.perf_counter() - t0
        pred = pred.cpu().numpy()
        acc.update(pred, label)
        if i in overlay_indices:
            pngs[ds.samples[i].key] = _overlay_png(img, pred, label, names)
    return ChunkResult(acc, dict(ds.out_of_range), len(indices), seconds, pngs)


def _overlay_png(img: np.ndarray, pred: np.ndarray, label: np.ndarray, names: list[str]) -> bytes:
    """Image | prediction overlay | ground-truth overlay, side by side, as PNG bytes."""
    pal = make_palette(len(names))
    panels = [img, np.asarray(overlay(img, pred, names, pal)), np.asarray(overlay(img, label, names, pal))]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def benchmark_classes(cfg: BenchmarkConfig) -> list[list[str]]:
    """The class list of the benchmark: ``cfg.classes_file``, else the packaged ``cfg.class_set`` list."""
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


def display_names(dataset: str, classes: list[list[str]]) -> list[str]:
    """One display name per class: the first synonym; a background class (VOC21/Context60) shows 'background'."""
    names = [c[0] for c in classes]
    if INFOS[dataset].has_background:
        names[0] = "background"
    return names


# ---------------------------------------------------------------------------------------------- fan-out


def _split(indices: list[int], parts: int) -> list[list[int]]:
    """Contiguous, near-equal chunks (no empty ones)."""
    parts = max(1, min(parts, len(indices)))
    bounds = np.linspace(0, len(indices), parts + 1).round().astype(int)
    return [indices[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _portable(cfg: BenchmarkConfig) -> BenchmarkConfig:
    """``cfg`` with its existing local paths made absolute (remote workers may run in another folder)."""
    paths = {}
    for k in ("data_root", "checkpoint", "classes_file", "pretrained"):
        v = getattr(cfg, k)
        if v and Path(v).expanduser().exists():
            paths[k] = str(Path(v).expanduser().resolve())
    return replace(cfg, **paths)


def _run_chunks(
    cfg: BenchmarkConfig, chunks: list[list[int]], overlay_idx: list[int], model: Backbone | None
) -> list[ChunkResult]:
    """Every chunk's result, in chunk order: in the driver (``cfg.workers`` 0) or one Ray task per chunk, all in
    flight at once (a task is retried twice; a chunk that still fails fails the evaluation)."""
    cfg = _portable(cfg)
    if cfg.workers <= 0:
        return [eval_chunk(cfg, c, overlay_idx, model) for c in chunks]
    init_ray(address=cfg.ray_address or None)
    gpus = cfg.gpus_per_worker
    if gpus == 0 and cfg.device != "cpu" and cluster_gpus() > 0:
        gpus = 1.0  # a GPU cluster: one GPU per task unless told otherwise
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=2, runtime_env=task_runtime_env())(eval_chunk)

    def submit(k: int) -> ray.ObjectRef:
        return task.remote(cfg, chunks[k], [i for i in overlay_idx if i in chunks[k]])

    keys = list(range(len(chunks)))
    pool = run_pool(
        submit,
        keys,
        len(chunks),
        desc="eval",
        weight=lambda k: len(chunks[k]),
        unit="image",
        stop_on_failure=True,
    )
    if pool.failed:
        raise next(iter(pool.failed.values()))
    return [pool.done[k] for k in keys]


def _merge(parts: list[ChunkResult]) -> ChunkResult:
    """The chunks' counts summed into a new :class:`IoUAccumulator` (a chunk from a Ray task holds read-only
    arrays), their other fields combined."""
    first = parts[0].counts
    total = IoUAccumulator(first.num_classes, first.ignore_index)
    for p in parts:
        total.merge(p.counts)
    oor = {k: v for p in parts for k, v in p.out_of_range.items()}
    overlays = {k: v for p in parts for k, v in p.overlays.items()}
    return ChunkResult(total, oor, sum(p.images for p in parts), sum(p.seconds for p in parts), overlays)


# ---------------------------------------------------------------------------------------------- benchmark


def evaluate(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run the benchmark evaluation; returns {"miou", "iou" (per class), "classes", "images_per_s", ...}.

    mIoU/IoU are in percent, summed as intersection/union counts over the whole set (and over Ray tasks).
    """
    if not cfg.data_root:
        raise EvalError("--data-root is required for a benchmark evaluation")
    if not (cfg.checkpoint or cfg.backbone):
        raise EvalError("give --checkpoint CKPT or --baseline --backbone NAME")
    ds = open_dataset(cfg.dataset, cfg.data_root, cfg.split)  # fail early on a bad layout
    classes = benchmark_classes(cfg)
    indices = list(range(len(ds)))[: cfg.max_images or None]
    local = cfg.workers <= 0
    # with Ray workers the driver loads the model only for its identity and protocol (on the CPU)
    bb = load_model(**cfg.model_spec(), device=pick_device(cfg.device) if local else "cpu")
    ident = model_identity(bb)
    proto = resolve_protocol(cfg, bb.readout, bb.native_size, bb.patch_size)
    if proto.prob_thd > 0 and not INFOS[cfg.dataset].has_background:
        print(
            f"warning: prob_thd {proto.prob_thd} sends low-confidence pixels to class 0 ({classes[0][0]!r}), "
            f"but {cfg.dataset} has no background class"
        )
    t0 = time.perf_counter()
    chunks = _split(indices, max(cfg.workers, 1))
    total = _merge(_run_chunks(cfg, chunks, indices[: cfg.overlays], bb if local else None))
    del bb
    acc = total.counts
    iou = acc.iou() * 100.0  # percent; NaN for classes absent from labels and predictions
    result = {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "images": total.images,
        "num_classes": ds.num_classes,
        "miou": acc.miou() * 100.0,
        "iou": [None if math.isnan(v) else float(v) for v in iou],
        "classes": display_names(cfg.dataset, classes),
        "label_pixels": acc.label_area.tolist(),
        "intersection": acc.intersection.tolist(),
        "union": acc.union.tolist(),
        "images_per_s": total.images / total.seconds if total.seconds > 0 else float("nan"),
        "wall_s": time.perf_counter() - t0,
        "out_of_range_pixels": int(sum(total.out_of_range.values())),
        "out_of_range_images": total.out_of_range,
        "protocol": asdict(proto),
        "model": ident,
        "workers": cfg.workers,
    }
    if total.out_of_range:
        oor = total.out_of_range
        print(
            f"warning: {len(oor)} label map(s) had {result['out_of_range_pixels']} pixel(s) outside "
            f"0..{ds.num_classes - 1} (treated as ignore), e.g. {next(iter(oor))}"
        )
    print(format_iou_table(result))
    _log_benchmark(cfg, result, total.overlays)
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


# ---------------------------------------------------------------------------------------------- logging


def _log_benchmark(cfg: BenchmarkConfig, result: dict[str, Any], overlays: dict[str, bytes]) -> None:
    with output_dir(cfg) as out:
        (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        (out / "per_class_iou.txt").write_text(format_iou_table(result) + "\n")
        for key, png in overlays.items():
            (out / "overlays").mkdir(exist_ok=True)
            (out / "overlays" / f"{metric_key(key).replace('/', '_').replace(' ', '_')}.png").write_bytes(png)
        log_eval(cfg, out, _benchmark_run(cfg, result, out, bool(overlays)))


def _benchmark_run(cfg: BenchmarkConfig, result: dict[str, Any], out: Path, overlays: bool) -> EvalRun:
    role = "student" if cfg.checkpoint else ("teacher" if cfg.mode == "sliding" else "baseline")
    params = dict(result["protocol"])  # the resolved protocol, under the config's own names
    params.update(_lineage_params(cfg, result["model"]))
    return EvalRun(
        kind="benchmark",
        default_name=f"{cfg.dataset}-{role}",
        params=params,
        metrics=_benchmark_metrics(result),
        headline_kind=cfg.dataset if role == "student" else f"{cfg.dataset}_{role}",
        headline={"mIoU": result["miou"], "images_per_s": result["images_per_s"]},
        tags={"spar.role": role},
        table={
            "class": result["classes"],
            **{k: result[k] for k in ("iou", "label_pixels", "intersection", "union")},
        },
        table_file="per_class_iou.json",
        files=["per_class_iou.txt", "results.json"],
        folders=["overlays"] if overlays else [],
        images=png_images(out, "overlays", "overlay") if overlays else {},
    )


def _benchmark_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {
        "mIoU": result["miou"],
        "images_per_s": result["images_per_s"],
        "num_images": result["images"],
        "out_of_range_pixels": result["out_of_range_pixels"],
    }
    for c, v in zip(result["classes"], result["iou"], strict=True):
        if v is not None:
            key = metric_key("iou/" + class_key_part(c))
            while key in metrics:  # two hostile names sanitised alike stay two metrics
                key += "_"
            metrics[key] = v
    return metrics


def _lineage_params(cfg: BenchmarkConfig, ident: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {f"model.{k}": v for k, v in ident.items()}
    if cfg.checkpoint:
        try:
            info = read_backbone_info(cfg.checkpoint)
            out["model.cache_fingerprint"] = info.get("cache_fingerprint", "")
            out["model.trainable_blocks"] = info.get("trainable_blocks", "")
        except Exception:  # noqa: BLE001 - lineage is best-effort; the model itself already loaded
            pass
    return out


# ---------------------------------------------------------------------------------------------- commands


def run_eval(cfg: BenchmarkConfig | FidelityConfig | SpeedConfig) -> dict[str, Any]:
    """Run the report a config is for; the flat :class:`EvalConfig` of the CLI and recipes runs the one it chooses."""
    if isinstance(cfg, EvalConfig):
        cfg = cfg.report()
    if isinstance(cfg, FidelityConfig):
        return fidelity_report(cfg)
    if isinstance(cfg, SpeedConfig):
        return speed_report(cfg)
    return evaluate(cfg)


def run_cli(args: argparse.Namespace) -> int:
    """``spar eval``: the config from the recipe, ``--set`` and flags, then :func:`run_eval`."""
    run_eval(config_from_cli(EvalConfig, args, "eval"))
    return 0


def run_classes_cli(args: argparse.Namespace) -> int:
    """``spar classes``: print a packaged class list, one class a line, synonyms separated by ', '."""
    print(format_classes(default_classes(args.dataset, args.class_set)))
    return 0
