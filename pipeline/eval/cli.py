"""Arguments of ``spar eval``, ``classes``, ``segment``, ``embed``, ``runs`` and ``viz``.

Light: argument definitions only (from the typed configs of :mod:`pipeline.eval.config`); each command names the
function that runs it (``handler="module:function"``), imported only when the command runs. Flags whose ``dest``
is a config field default to None, so ``pipeline.common.config.config_from_cli`` lets an absent flag keep the
recipe's value.
"""

from __future__ import annotations

import argparse
from typing import get_args

from pipeline.eval.config import CLASS_SETS, DATASETS, DEFAULT_CLASS_SET, RUNS_WIDTH, Precision

PRECISIONS = list(get_args(Precision))


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the evaluation commands."""
    _add_eval(sub)
    _add_classes(sub)
    _add_segment(sub)
    _add_embed(sub)
    _add_runs(sub)
    _add_viz(sub)


def _csv_ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


# ---------------------------------------------------------------------------------------------- eval


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="segmentation benchmarks (mIoU), --fidelity or --speed reports")
    p.add_argument(
        "--fidelity", action="store_const", const=True, help="labels-free report vs a teacher cache"
    )
    p.add_argument("--speed", action="store_const", const=True, help="single pass vs sliding window timings")
    p.add_argument("--checkpoint", help="student checkpoint directory")
    p.add_argument("--baseline", action="store_const", const=True, help="evaluate the named --backbone as is")
    p.add_argument("--backbone")
    p.add_argument("--pretrained", help="open_clip tag or local weights file for --backbone")
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--data-root")
    p.add_argument("--split")
    p.add_argument("--max-images", type=int)
    p.add_argument("--classes-file")
    p.add_argument("--class-set", choices=list(CLASS_SETS), help="packaged class lists (default paper)")
    p.add_argument("--classes", help="fidelity report class list: 'sky,clouds;road;...'")
    p.add_argument("--templates", choices=["imagenet", "simple"])
    p.add_argument("--short-side", type=int)
    p.add_argument("--long-side", type=int)
    p.add_argument("--logit-scale", type=float)
    p.add_argument("--prob-thd", type=float)
    p.add_argument("--area-thd", type=float)
    p.add_argument("--mode", choices=["single", "sliding"])
    p.add_argument("--crop", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--window-batch", type=int)
    p.add_argument("--precision", choices=PRECISIONS, help="mixed precision (autocast)")
    p.add_argument("--device")
    p.add_argument("--workers", type=int, help="split the images across N Ray tasks")
    p.add_argument("--ray-address")
    p.add_argument("--images", help="held-out image set root (fidelity; speed: quality-vs-cost curve)")
    p.add_argument("--teacher-cache", help="fidelity: teacher cache of those images")
    p.add_argument("--resolutions", type=_csv_ints, help="speed: image sides, e.g. 448,672,1024")
    p.add_argument(
        "--strides", type=_csv_ints, help="speed: window strides in pixels, default 224,112,48,24 (<= crop)"
    )
    p.add_argument("--repeats", type=int)
    p.add_argument("--experiment")
    p.add_argument("--run-name")
    p.add_argument(
        "--workdir", help="MLflow store location (default $SPAR_WORKDIR or ./work, as spar distill)"
    )
    p.add_argument("--overlays", type=int, help="prediction overlays to log")
    p.add_argument("--out", help="also keep results/tables/plots in this folder")
    p.add_argument("--no-mlflow", dest="mlflow", action="store_const", const=False)
    p.add_argument(
        "--parent-run",
        help="MLflow run id of the training run evaluated (default: the run that produced --checkpoint)",
    )
    p.add_argument("--config", help="TOML recipe ([eval] section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(handler="pipeline.eval.benchmark:run_cli")


def _add_classes(sub: argparse._SubParsersAction) -> None:
    sets = "; ".join(f"{k}: {v}" for k, v in CLASS_SETS.items())
    p = sub.add_parser("classes", help="print the class list a benchmark is evaluated with")
    p.add_argument("dataset", choices=DATASETS, metavar="DATASET", help=", ".join(DATASETS))
    p.add_argument("--set", dest="class_set", choices=list(CLASS_SETS), default=DEFAULT_CLASS_SET, help=sets)
    p.set_defaults(handler="pipeline.eval.benchmark:run_classes_cli")


# ---------------------------------------------------------------------------------------------- segment, embed


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="student checkpoint directory")
    p.add_argument("--backbone", help="named backbone (single-pass baseline), e.g. maskclip-vit-b16")
    p.add_argument("--pretrained", help="open_clip pretrained tag or local weights file for --backbone")
    p.add_argument("--short-side", type=int)
    p.add_argument("--long-side", type=int)
    p.add_argument("--mode", choices=["single", "sliding"])
    p.add_argument("--crop", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--window-batch", type=int)
    p.add_argument("--out", help="output folder")
    p.add_argument("--config", help="TOML recipe file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="open-vocabulary segmentation of images (overlay + label map PNGs)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument(
        "--classes", help='classes separated by ";", synonyms by ",": "sky,clouds;road;person,people"'
    )
    p.add_argument("--classes-file", help="one class per line, synonyms comma-separated")
    p.add_argument("--logit-scale", type=float)
    p.add_argument("--prob-thd", type=float)
    p.add_argument("--area-thd", type=float)
    p.add_argument("--templates", choices=["imagenet", "simple"])
    p.add_argument("--alpha", type=float, help="overlay opacity")
    _add_model_args(p)
    p.set_defaults(handler="pipeline.eval.segment:run_segment_cli")


def _add_embed(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="dense features of images as .npy with shape metadata (JSON)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--dtype", choices=["float32", "float16"])
    _add_model_args(p)
    p.set_defaults(handler="pipeline.eval.segment:run_embed_cli")


# ---------------------------------------------------------------------------------------------- runs, viz


def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="compare training runs: their eval metrics and the settings that differ")
    p.add_argument("--experiment", help="experiment name (default: all)")
    p.add_argument("--metric", help="sort by this metric (descending) and show it")
    p.add_argument(
        "--workdir", help="MLflow store location (default $SPAR_WORKDIR or ./work, as spar distill)"
    )
    p.add_argument("--max-runs", type=int, default=50)
    p.add_argument("--wide", action="store_true", help="every differing param and metric, whatever the width")
    p.add_argument(
        "--all", action="store_true", help="every run (evaluations, precomputes) with all its params"
    )
    p.add_argument(
        "--width", type=int, help=f"fit this many columns (default: the terminal's, at most {RUNS_WIDTH})"
    )
    p.add_argument(
        "--resend",
        metavar="FILE",
        help="send a run's metrics/params kept locally when the tracking server was unreachable (the file the run "
        "named), then remove it",
    )
    p.set_defaults(handler="pipeline.eval.runs:run_cli")


def _add_viz(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz",
        help="PCA pictures of dense features: teacher, single-pass baseline and student in one basis (PNG)",
    )
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--checkpoint", required=True, help="student checkpoint directory")
    p.add_argument("--out", default="viz", help="output folder (default ./viz)")
    p.add_argument("--short-side", type=int, default=448, help="resize short side (0 = keep)")
    p.add_argument("--crop", type=int, help="teacher window (default: the backbone's native size)")
    p.add_argument("--stride", type=int, help="teacher stride (default: 24 px per 224 of crop)")
    p.set_defaults(handler="pipeline.eval.viz:run_cli")
