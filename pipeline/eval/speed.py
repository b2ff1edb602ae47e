"""``spar eval --speed``: what the sliding-window teacher costs next to a single pass, and what it buys.

* Speed: seconds per image of a single pass and of the sliding window (crop = native size) at strides
  {224, 112, 48, 24} px (24 = the paper's teacher at every crop; strides above the crop are left out), on random
  square images at several resolutions (:func:`speed_report`).
* Quality vs cost (with ``--images``): on real held-out images, each method's seconds per image and its feature
  MSE / mean cosine to the finest-stride teacher (:func:`quality_vs_cost`).

Both are printed as tables, drawn as PNG plots and logged to MLflow through :mod:`pipeline.eval.tracking`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.common.precision import autocast, autocast_dtype
from pipeline.data.imageset import open_imageset
from pipeline.eval.config import EvalError, SpeedConfig
from pipeline.eval.fidelity import PooledFidelity, held_out_images
from pipeline.eval.model import (
    dense_features,
    load_model,
    pick_device,
    synchronize,
)
from pipeline.eval.tracking import EvalRun, log_eval, metric_key, output_dir
from spar_core.backbones import Backbone, build_backbone, random_weights_seed
from spar_core.sliding import num_windows, sliding_window_features


def speed_strides(strides: tuple[int, ...], crop: int) -> list[int]:
    """The swept strides in pixels, deduplicated, leaving out those larger than the crop (gaps)."""
    out = [s for s in dict.fromkeys(strides) if s <= crop]
    if not out:
        raise EvalError(f"no stride in {list(strides)} fits the crop {crop} (a stride must be <= the crop)")
    return out


def _time(fn: Callable[[], object], dev: torch.device, repeats: int, budget_s: float = 5.0) -> float:
    """Median seconds of ``fn()``; the first call is the warm-up, and also the answer if it exceeded budget."""

    def once() -> float:
        t0 = time.perf_counter()
        fn()
        synchronize(dev)
        return time.perf_counter() - t0

    first = once()
    if first > budget_s:
        return first
    return float(np.median([once() for _ in range(repeats)]))


# ---------------------------------------------------------------------------------------------- speed


def speed_report(cfg: SpeedConfig) -> dict[str, Any]:
    """Seconds per image: single pass vs sliding window (crop = native size) at strides in pixels and several
    square resolutions. Returns {"resolutions", "strides", "single": [s], "sliding": {stride: [s]}, "windows"}."""
    if not (cfg.checkpoint or cfg.backbone):
        raise EvalError("--speed needs --backbone NAME or --checkpoint CKPT")
    dev = pick_device(cfg.device)
    bb = load_model(**cfg.model_spec(), device=dev)
    native, p = bb.native_size, bb.patch_size
    crop = cfg.crop or native
    strides = speed_strides(cfg.strides, crop)
    res = [max(p, round(r / p) * p) for r in (list(cfg.resolutions) or [2 * native, 3 * native, 4 * native])]
    gen = torch.Generator().manual_seed(cfg.seed)
    single: list[float] = []
    sliding: dict[str, list[float]] = {str(s): [] for s in strides}
    windows: dict[str, list[int]] = {str(s): [] for s in strides}
    amp = autocast_dtype(cfg.precision)
    for r in res:
        x = torch.randn(1, 3, r, r, generator=gen).to(dev, next(bb.parameters()).dtype)  # (1, 3, r, r)

        def run_single(x: torch.Tensor = x) -> None:
            with torch.no_grad(), autocast(dev, cfg.precision):
                bb.dense(x)

        single.append(_time(run_single, dev, cfg.repeats))
        for s in strides:

            def run_slide(x: torch.Tensor = x, s: int = s) -> None:
                with torch.no_grad():
                    sliding_window_features(bb, x, crop, s, cfg.window_batch, amp)

            sliding[str(s)].append(_time(run_slide, dev, cfg.repeats) if crop < r else single[-1])
            windows[str(s)].append(num_windows(r, r, crop, s) if crop < r else 1)
    result = {
        "backbone": bb.name,
        "device": str(dev),
        "precision": cfg.precision,
        "crop": crop,
        "resolutions": res,
        "strides": strides,
        "single": single,  # seconds per resolution
        "sliding": sliding,  # "<stride>": seconds per resolution
        "windows": windows,  # "<stride>": windows per resolution
    }
    print(format_speed(result))
    if cfg.images:
        result["quality_cost"] = quality_vs_cost(cfg, bb, crop, strides)
        print(format_quality_cost(result["quality_cost"]))
    _log_speed(cfg, result)
    return result


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


# ---------------------------------------------------------------------------------------------- quality vs cost


def quality_vs_cost(cfg: SpeedConfig, model: Backbone, crop: int, strides: list[int]) -> dict[str, Any]:
    """The quality-vs-cost curve on real held-out images (``cfg.images``, an image set, at stored sizes).

    Reference: the base backbone's sliding window at the finest stride. Points: single pass, sliding at each
    stride and (for a checkpoint) the student's single pass, each with mean seconds/image and the feature MSE
    and mean cosine to the reference pooled over every patch position.
    """
    ims = open_imageset(cfg.images)
    dev = model.mean.device
    # (name, model, sliding stride or None for a single pass): single pass and sliding (coarsest stride first) of
    # the base backbone, and the student for a checkpoint
    base = model
    if cfg.checkpoint:  # the teacher/baseline are the student's untrained base
        seed = random_weights_seed(model.weights_id) or 0
        base = build_backbone(model.name, model.pretrained or None, device=dev, seed=seed)
    methods: list[tuple[str, Backbone, int | None]] = [("single pass", base, None)]
    methods += [(f"sliding s{s}", base, s) for s in sorted(strides, reverse=True)]
    if cfg.checkpoint:
        methods.append(("student", model, None))
    reference = f"sliding s{min(strides)}"
    seconds = {m: 0.0 for m, _, _ in methods}
    fidelity = {m: PooledFidelity() for m, _, _ in methods}
    n = 0
    for _, img in held_out_images(ims, cfg.max_images):
        feats = {}
        for name, bb, s in methods:
            mode = "single" if s is None or crop >= max(img.shape[:2]) else "sliding"
            t0 = time.perf_counter()
            feats[name] = dense_features(bb, img, mode, crop, s or 0, cfg.precision, cfg.window_batch)[0]
            synchronize(dev)
            seconds[name] += time.perf_counter() - t0
        for name, f in feats.items():  # (h, w, D) each
            fidelity[name].add(f, feats[reference])
        n += 1
    if n == 0:
        raise EvalError(f"no images in {cfg.images}")
    points = [
        {"method": m, "seconds": seconds[m] / n, "mse": fidelity[m].mse(), "cosine": fidelity[m].cosine()}
        for m in seconds
    ]
    return {"images": n, "reference": reference, "crop": crop, "points": points}


def format_quality_cost(qc: dict[str, Any]) -> str:
    """Quality-vs-cost table."""
    rows = [
        f"{'method':<14} {'s/image':>10} {'cosine':>8} {'MSE':>12}   (vs {qc['reference']}, {qc['images']} images)"
    ]
    for p in qc["points"]:
        rows.append(f"{p['method']:<14} {p['seconds']:>10.4f} {p['cosine']:>8.4f} {p['mse']:>12.6g}")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------- plots


@contextlib.contextmanager
def _figure(path: Path, title: str, xlabel: str, ylabel: str) -> Iterator[Any]:
    """A 6x4 in matplotlib axes (Agg); on exit: grid, legend, saved to ``path`` as PNG at 100 dpi, closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def speed_plot(result: dict[str, Any], path: Path) -> None:
    """Seconds/image vs resolution (log scale), one line per method, as PNG."""
    title = f"{result['backbone']}: single pass vs sliding window (crop {result['crop']})"
    with _figure(path, title, "image side (px)", "seconds / image") as ax:
        ax.plot(result["resolutions"], result["single"], "o-", label="single pass")
        for s, v in result["sliding"].items():
            ax.plot(result["resolutions"], v, "s--", label=f"sliding, stride {s}")
        ax.set_yscale("log")


def quality_cost_plot(qc: dict[str, Any], path: Path) -> None:
    """Cosine to the finest teacher vs seconds/image (log), one labelled point per method, as PNG."""
    title = f"quality vs cost ({qc['images']} held-out images)"
    with _figure(path, title, "seconds / image", f"mean cosine to {qc['reference']}") as ax:
        slide = [p for p in qc["points"] if p["method"].startswith("sliding")]
        ax.plot([p["seconds"] for p in slide], [p["cosine"] for p in slide], "s--", label="sliding window")
        for p in qc["points"]:
            if not p["method"].startswith("sliding"):
                ax.plot([p["seconds"]], [p["cosine"]], "o", markersize=8, label=p["method"])
            ax.annotate(
                p["method"],
                (p["seconds"], p["cosine"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.set_xscale("log")


# ---------------------------------------------------------------------------------------------- logging


def _log_speed(cfg: SpeedConfig, result: dict[str, Any]) -> None:
    with output_dir(cfg) as out:
        (out / "speed.json").write_text(json.dumps(result, indent=1))
        (out / "speed.txt").write_text(format_speed(result) + "\n")
        speed_plot(result, out / "speed.png")
        files = ["speed.json", "speed.txt", "speed.png"]
        if "quality_cost" in result:
            quality_cost_plot(result["quality_cost"], out / "quality_cost.png")
            files.append("quality_cost.png")
        metrics = _speed_metrics(result)
        run = EvalRun(
            kind="speed",
            default_name=f"speed-{result['backbone']}",
            params={
                "crop": result["crop"],
                "resolutions": tuple(result["resolutions"]),
                "strides": tuple(int(s) for s in result["sliding"]),
            },
            metrics=metrics,
            headline_kind="speed",
            headline={k: v for k, v in metrics.items() if k.startswith(("slowdown_", "sec_"))},
            files=files,
            images={f: "speed" for f in files if f.endswith(".png")},
        )
        log_eval(cfg, out, run)


def _speed_metrics(result: dict[str, Any]) -> dict[str, float]:
    metrics = {}
    for i, r in enumerate(result["resolutions"]):
        metrics[f"sec_single_r{r}"] = result["single"][i]
        for s, v in result["sliding"].items():
            metrics[f"sec_sliding_s{s}_r{r}"] = v[i]
            metrics[f"slowdown_s{s}_r{r}"] = v[i] / result["single"][i]
    for p in result.get("quality_cost", {}).get("points", []):
        key = metric_key(p["method"]).replace(" ", "_")
        metrics[f"qc_cosine_{key}"] = p["cosine"]
        metrics[f"qc_sec_{key}"] = p["seconds"]
    return metrics
