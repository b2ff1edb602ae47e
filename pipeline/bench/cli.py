"""``spar bench <name>``: benchmarks that print ratios measured side by side in one run.

Argument definitions only (light); each benchmark runs in its own module of ``pipeline.bench``, imported when it
runs: ``core`` -> :mod:`pipeline.bench.teacher`, ``ingest``, ``cache``, ``train``, ``distill``, ``loader``, ``scale``,
``startup``, ``gpu`` -> :mod:`pipeline.bench.gpu`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


def _teacher_args(p: argparse.ArgumentParser) -> None:
    """teacher (batched, mixed precision) vs naive fp32 reference, and single pass vs teacher"""
    p.add_argument("--backbone", default="maskclip-vit-b16")
    p.add_argument("--size", default="448x448", help="HxW")
    p.add_argument("--crop", type=int, default=None, help="default: the backbone's native size")
    p.add_argument("--stride", type=int, default=24)
    p.add_argument("--window-batch", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds; the fastest time of each counts"
    )
    p.add_argument(
        "--precision", default="auto", help="the project's teacher precision (auto, fp32, bf16, fp16)"
    )
    p.add_argument("--authors-precisions", default="fp32,bf16",
                   help="precisions of the authors' loop to run; the fastest is the reference")  # fmt: skip
    p.add_argument("--skip-naive", action="store_true", help="skip the one-window-per-pass naive reference")
    p.add_argument("--compile", action="store_true",
                   help="also time the project teacher with torch.compile (inductor), interleaved with eager")  # fmt: skip


def _ingest_args(p: argparse.ArgumentParser) -> None:
    """ingest throughput with 1 and 2 Ray workers"""
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time (default 1,2)")
    p.add_argument(
        "--copies", type=int, default=3, help="copies of the photo set (more images, steadier timing)"
    )
    p.add_argument("--recipe", choices=("paper", "small"), default="paper",
                   help="paper: the training images' sizes (2048x1024, short side >= 512); small: 256x128, >= 128")  # fmt: skip
    p.add_argument("--shards-per-worker", type=int, default=4, help="shards per worker (sets shard_size)")
    p.add_argument("--encode-only", action="store_true",
                   help="only the lossless-encoding table (ms and bytes per image per option), no Ray")  # fmt: skip
    p.add_argument("--encode-rounds", type=int, default=3, help="interleaved rounds of the encoding table")


def _cache_args(p: argparse.ArgumentParser) -> None:
    """cache size, read/write speed, precompute throughput vs measured matmul rate"""
    p.add_argument(
        "--teacher", default="maskclip-vit-b16", help="backbone (random weights unless --pretrained)"
    )
    p.add_argument("--pretrained", default=None)
    p.add_argument("--crop", type=int, default=0, help="window size (default: the teacher's native size)")
    p.add_argument("--stride", type=int, default=112)
    p.add_argument("--images", default=None, help="existing image set (default: ingest scikit-image photos)")
    p.add_argument("--num-images", type=int, default=2, help="photos to ingest when --images is not given")
    p.add_argument("--side", type=int, default=448, help="long side of the ingested photos")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--batches", default="8,32", help="window batch sizes to sweep (in-process)")
    p.add_argument("--precisions", default="bf16,none", help="autocast modes to sweep: bf16, fp16, none")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting (the fastest counts)")
    p.add_argument("--skip-precompute", action="store_true", help="skip the end-to-end Ray precompute")
    p.add_argument("--codec-fidelity", action="store_true",
                   help="train the same student from each codec's cache and compare held-out fidelity")  # fmt: skip
    p.add_argument("--codecs", default="float16,int8", help="cache dtypes compared by --codec-fidelity")
    p.add_argument("--seeds", default="0,1", help="training seeds (their spread is the run-to-run noise)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per student (--codec-fidelity)")
    p.add_argument("--held-out", type=int, default=2, help="photos held out for fidelity (--codec-fidelity)")
    p.add_argument("--lr", type=float, default=2e-5, help="student learning rate (--codec-fidelity)")
    p.add_argument("--trainable-blocks", type=int, default=2, help="last blocks trained (--codec-fidelity)")
    p.add_argument(
        "--precision", default="auto", help="teacher forward precision of the caches (auto, fp32, bf16)"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    """training step: streaming vs in-memory targets, cached vs online teacher"""
    p.add_argument("--parts", default="step,quality", help="comma-separated: step, quality (default both)")
    p.add_argument(
        "--backbone", default="tiny-clip-224", help="teacher = student backbone of the quality part"
    )
    p.add_argument("--step-backbone", default="small-clip-224", help="backbone of the step part")
    p.add_argument(
        "--copies", type=int, default=6, help="augmented copies of each training photo (default 6)"
    )
    p.add_argument("--stride", type=int, default=56, help="teacher stride in pixels (crop = native size)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round and condition (step part)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (step part)")
    p.add_argument("--loader-workers", type=int, default=1, help="background decode processes (step part)")
    p.add_argument(
        "--large", default="896x1344", help="HxW of the larger image for cached vs online (step part)"
    )
    p.add_argument("--train-steps", type=int, default=300, help="distillation steps (quality part)")
    p.add_argument(
        "--lr", type=float, default=1e-3, help="learning rate (quality part; raised for few steps)"
    )
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (quality part)")


def _distill_args(p: argparse.ArgumentParser) -> None:
    """distill steps/s with 1 and 2 Ray Train workers, and the data-wait fraction"""
    p.add_argument("--workers", default="1,2", help="comma-separated Ray Train worker counts (default 1,2)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per worker count (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing (default 5)")
    p.add_argument("--backbone", default="small-clip-224", help="teacher = student backbone (the demo's)")
    p.add_argument("--crop", type=int, default=None, help="teacher window (default: the demo's 224)")
    p.add_argument("--stride", type=int, default=None, help="teacher stride (default: the demo's 24)")
    p.add_argument("--train-long", type=int, default=None, help="ingest long side (default: the demo's)")
    p.add_argument("--train-short", type=int, default=None, help="ingest short side (default: the demo's)")
    p.add_argument("--train-min-short", type=int, default=None, help="ingest short-side floor (the demo's)")
    p.add_argument(
        "--photos", type=int, default=0, help="use the first N training photos (0: all, the demo's)"
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="decode processes per worker (0: one thread, the demo's)",
    )


def _loader_args(p: argparse.ArgumentParser) -> None:
    """the distill stream at paper size (per decode thread / process) vs the training step"""
    p.add_argument("--size", default="1024x2048", help="HxW of the images (default: the paper's 1024x2048)")
    p.add_argument("--images", type=int, default=4, help="images in the set (default 4)")
    p.add_argument("--backbone", default="maskclip-vit-b16", help="teacher (stride = crop) and student")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2],
                   help="decode processes to time, comma-separated (0 = one thread; default 0,1,2)")  # fmt: skip
    p.add_argument("--samples", type=int, default=8, help="timed samples per loader setting (default 8)")
    p.add_argument(
        "--steps", type=int, default=1, help="timed CPU training steps after one warm-up (default 1)"
    )
    p.add_argument("--projection", action="store_true",
                   help="only the paper-run projection (25k views) from the H200 figures; no data, no Ray")  # fmt: skip


def _scale_args(p: argparse.ArgumentParser) -> None:
    """the whole pipeline on N synthetic paper-size images: per-image cost, files, memory vs N"""
    p.add_argument("--n", default="100,1000", help="image counts, comma-separated (default 100,1000)")
    p.add_argument("--size", default="1024x2048", help="HxW of the source images (default: paper size)")
    p.add_argument(
        "--teacher", default="tiny-clip-64", help="teacher = student backbone (default tiny-clip-64)"
    )
    p.add_argument("--stride", type=int, default=0, help="teacher stride (0 = crop: the fewest windows)")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    p.add_argument("--steps", type=int, default=0, help="distill steps (0 = one epoch over the set)")
    p.add_argument("--augment", action="store_true", help="the paper's ingest augmentation (default: plain)")
    p.add_argument("--distill-max-n", type=int, default=0,
                   help="skip distill for larger N to fit the time (0 = never skip)")  # fmt: skip


def _startup_args(p: argparse.ArgumentParser) -> None:
    """fixed cost of each stage phase by phase (command -> first step, exit), before and after"""
    p.add_argument("--stages", default="ingest,precompute,distill,demo",
                   help="comma-separated stages to time (default: ingest,precompute,distill,demo)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="runs per stage and side, interleaved (default 2)")
    p.add_argument("--steps", type=int, default=3, help="distill steps (its run ends after them)")
    p.add_argument("--photos", type=int, default=0, help="training photos to use (0: all of the demo's)")
    p.add_argument("--before-checkout", default=None,
                   help="'before' = the spar of this checkout (default: this code with SPAR_RAY_DEFAULTS=1)")  # fmt: skip


def _gpu_args(p: argparse.ArgumentParser) -> None:
    """the prepared GPU check: environment, correctness, throughput, projection, pipeline (report)"""
    p.add_argument("--out", required=True, help="folder for report.json and report.md (rewritten as it goes)")
    p.add_argument(
        "--mode",
        choices=["auto", "gpu", "cpu"],
        default="auto",
        help="gpu: full sizes on CUDA; cpu: tiny models and images (CI); auto: gpu when CUDA is available",
    )
    p.add_argument("--budget-s", type=float, default=330.0, help="total time budget, shared by the sections")
    p.add_argument(
        "--sections",
        default=None,
        help="comma-separated subset (default: all, in order: environment, correctness, throughput, projection, pipeline)",
    )


# name -> (module of pipeline.bench that runs it, its arguments; the function's docstring is the bench's help)
BENCHES: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "core": ("teacher", _teacher_args),
    "ingest": ("ingest", _ingest_args),
    "cache": ("cache", _cache_args),
    "train": ("train", _train_args),
    "distill": ("distill", _distill_args),
    "loader": ("loader", _loader_args),
    "scale": ("scale", _scale_args),
    "startup": ("startup", _startup_args),
    "gpu": ("gpu.command", _gpu_args),
}


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar bench``: each benchmark's own arguments, then the scratch folder and JSON output that all
    but ``core`` share (the GPU check writes its own report)."""
    p = sub.add_parser("bench", help="run a benchmark (ratios measured side by side in one run)")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module, own_args) in BENCHES.items():
        bp = bsub.add_parser(name, help=own_args.__doc__)
        own_args(bp)
        if name != "core":
            bp.add_argument(
                "--workdir", default=None, help="scratch folder (default: a temporary one, removed after)"
            )
        if name not in ("core", "gpu"):
            bp.add_argument("--json", default=None, help="also write the results as JSON here")
        bp.set_defaults(handler=f"pipeline.bench.{module}:run")
