"""``spar distill``, ``spar import-checkpoint`` and ``spar export``: argument definitions only.

The handlers are named, not imported (:mod:`pipeline.cli` imports them when the command runs): distill's flags are
:class:`~pipeline.train.config.DistillConfig` fields (``dest`` = the field, default None so that an absent flag
never overrides the recipe; merged by :func:`pipeline.common.config.config_from_cli`).
"""

from __future__ import annotations

import argparse

__all__ = ["add_cli"]


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register the training commands."""
    _add_distill(sub)
    _add_import(sub)
    _add_export(sub)


def _add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train the single-pass student on cached teacher features (one worker in process, several on Ray Train; MLflow)",
        description="Distil the sliding-window teacher (cached) into the single-pass student: one worker in this "
        "process, or a Ray Train worker group (DDP).",
    )
    p.add_argument("--images", dest="images", help="image-set root (from spar ingest)")
    p.add_argument(
        "--cache", dest="cache", help="teacher cache path <cache_root>/<fingerprint> (from spar precompute)"
    )
    p.add_argument("--student", dest="student", help="student backbone (default: the cache's teacher)")
    p.add_argument(
        "--pretrained", dest="pretrained",
        help="student weights: auto (the teacher's), none, an open_clip tag or a file",
    )  # fmt: skip
    p.add_argument("--config", help="TOML recipe with a [distill] section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    p.add_argument("--workers", dest="workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument(
        "--trainer", dest="trainer", choices=("auto", "ray", "in-process"),
        help="where the ranks run: in-process (one worker, no Ray: seconds to the first step), ray (a Ray Train "
        "worker group), auto (default: in-process for one worker unless Ray is given a cluster address)",
    )  # fmt: skip
    p.add_argument(
        "--gpus-per-worker", dest="gpus_per_worker", type=float, help="GPUs per worker (default auto)"
    )
    p.add_argument(
        "--workdir", dest="workdir",
        help="MLflow store, Ray results and exported students (default ./work); a URL (s3://bucket/prefix) "
        "keeps them on object storage and needs MLFLOW_TRACKING_URI",
    )  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue the last run of the workdir (or run_name)")
    p.add_argument(
        "--teacher-online", dest="teacher_online", action="store_true", default=None,
        help="compute the teacher in the loop (no cache)",
    )  # fmt: skip
    p.set_defaults(
        handler="pipeline.train.driver:run_cli",
        stage_config=("pipeline.train.config:DistillConfig", "distill"),
    )


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import-checkpoint",
        help="turn an authors' SPAR checkpoint (.ckpt/.pth) into a student checkpoint",
        description="Import a released SPAR checkpoint (Lightning .ckpt or .pth state dict) as a student that "
        "spar eval/segment/embed accept.",
    )
    p.add_argument("file", help="the .ckpt / .pth / .safetensors file")
    p.add_argument("--backbone", required=True, help="backbone it was trained from (e.g. maskclip-vit-b16)")
    p.add_argument("--out", required=True, help="student checkpoint directory to write")
    p.add_argument(
        "--pretrained",
        help="base weights the authors started from (open_clip tag or file; e.g. laion2b_s34b_b88k); "
        "default: random seeded base, every tensor stored",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of a random base (default 0)")
    p.add_argument("--quick-gelu", action="store_true", help="the tower runs QuickGELU (OpenAI weights)")
    p.set_defaults(handler="pipeline.train.checkpoint_io:run_import_cli")


def _add_export(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="write a student as a full open_clip state dict",
        description="Export a student checkpoint so that open_clip.create_model(name, pretrained=FILE) loads it.",
    )
    e.add_argument("student", help="student checkpoint directory")
    e.add_argument("--format", choices=["open_clip"], default="open_clip", help="output format (open_clip)")
    e.add_argument("--out", required=True, help="file to write (.safetensors, or .pt/.pth)")
    e.set_defaults(handler="pipeline.train.checkpoint_io:run_export_cli")
