"""The ``spar`` command: one subcommand per stage, each registered by its sub-package's ``cli`` module.

:data:`COMMANDS` names, for every command, the module that registers it (``add_cli(subparsers)``) and its one-line
help. ``spar --help`` is printed from this table alone; ``spar <command> ...`` imports only that command's module.
The ``cli`` modules are light (argument definitions from the typed stage configs); a command's work runs in the
function its parser names with ``set_defaults(handler="module:function")``, imported only when the command runs.
``handler(args) -> int`` is the exit code. User errors (bad paths, configs, inputs) print one clear line and exit
with 2; unexpected failures print a traceback and exit with 1.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.common.errors import is_user_error
from pipeline.common.trace import mark

COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("pipeline.data.cli", "raw images -> frozen augmented webdataset shards + manifest"),
    "precompute": ("pipeline.cache.cli", "compute the sliding-window teacher's features into a cache"),
    "cache": ("pipeline.cache.cli", "inspect and maintain teacher caches"),
    "distill": (
        "pipeline.train.cli",
        "train the single-pass student on cached teacher features (one worker in process, several on Ray Train; MLflow)",
    ),
    "eval": ("pipeline.eval.cli", "segmentation benchmarks (mIoU), --fidelity or --speed reports"),
    "classes": ("pipeline.eval.cli", "print the class list a benchmark is evaluated with"),
    "segment": ("pipeline.eval.cli", "open-vocabulary segmentation of images (overlay + label map PNGs)"),
    "embed": ("pipeline.eval.cli", "dense features of images as .npy with shape metadata (JSON)"),
    "runs": ("pipeline.eval.cli", "compare training runs: their eval metrics and the settings that differ"),
    "demo": ("pipeline.workflow.cli", "the whole pipeline on sample photos, on this machine"),
    "pipeline": ("pipeline.workflow.cli", "all stages from one TOML recipe (jobs/configs/*.toml)"),
    "submit": ("pipeline.cluster.cli", "run a stage as a Ray Job on a cluster"),
    "bench": ("pipeline.bench.cli", "run a benchmark (ratios measured side by side in one run)"),
    "import-checkpoint": (
        "pipeline.train.cli",
        "turn an authors' SPAR checkpoint (.ckpt/.pth) into a student checkpoint",
    ),
    "export": ("pipeline.train.cli", "write a student as a full open_clip state dict"),
    "viz": (
        "pipeline.eval.cli",
        "PCA pictures of dense features: teacher, single-pass baseline and student in one basis (PNG)",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``spar`` parser: every command listed; ``command``'s module imported and its arguments registered."""
    parser = argparse.ArgumentParser(
        prog="spar",
        description="SPAR: distil a sliding-window ViT teacher into a single-pass any-resolution student.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).add_cli(sub)
    for name, (_module, helptext) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=helptext)
    return parser


def _named(target: str) -> Any:
    """The object a ``"module:name"`` string names (imported on demand)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def resolve_handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int] | None:
    """The function that runs the parsed command: ``args.handler`` ("module:function")."""
    spec = getattr(args, "handler", None)
    return _named(spec) if spec else None


# Commands that start a local Ray cluster when no address is given: the console command starts it early.
RAY_COMMANDS = ("ingest", "precompute", "distill", "pipeline", "demo")
# What the precompute task imports (torch, the teacher's code): when a command computes the teacher in Ray tasks, the
# early start imports it in Ray's idle worker processes while the command's own modules import.
PRECOMPUTE_TASK_MODULES = ("pipeline.cache.shard_task",)


def _start_ray_early(args: argparse.Namespace, cfg: Any) -> None:
    """Start the local Ray cluster in the background while the command's modules import (``--verbose`` runs
    and commands given a cluster address start it themselves, as before). ``cfg``: the stage config when the
    command has one (its ``workers`` and ``cpus_per_task`` bound the warmed worker processes)."""
    if args.command not in RAY_COMMANDS or getattr(args, "verbose", False) or getattr(args, "address", None):
        return
    starts, teacher_on_ray = _local_ray_use(args, cfg)
    if not starts:  # no Ray at all, or a cluster named in the recipe
        return
    from pipeline.common.tasks import start_local_cluster_early

    start_local_cluster_early(warm=PRECOMPUTE_TASK_MODULES if teacher_on_ray else (),
                              warm_tasks=getattr(cfg, "workers", 0) or 0,
                              warm_cpus=getattr(cfg, "cpus_per_task", 1) or 1)  # fmt: skip


def _local_ray_use(args: argparse.Namespace, cfg: Any) -> tuple[bool, bool]:
    """(whether the command starts a local Ray cluster, whether it computes the teacher in Ray tasks there): a stage
    of one worker on this machine runs in the command's own process (:mod:`pipeline.common.local`)."""
    from pipeline.cache.config import precomputes_in_process
    from pipeline.train.config import trains_in_process

    if cfg is None and args.command != "pipeline":  # no stage config: as Ray would run it
        return True, args.command in ("precompute", "demo")
    if args.command == "distill":
        return not trains_in_process(cfg), False
    if args.command == "precompute":
        return (on_ray := not precomputes_in_process(cfg)), on_ray
    if args.command == "demo":  # no address; its precompute as the demo builds it
        return True, not precomputes_in_process(cfg.precompute_config())
    if args.command == "pipeline":
        from pipeline.workflow.config import load_recipe

        try:
            recipe = load_recipe(args.config, list(args.set or ()))
        except Exception:  # noqa: BLE001 - the handler loads it again and reports what is wrong
            return True, True
        if recipe.run.ray_address:  # the stages connect to that cluster
            return False, False
        return True, not precomputes_in_process(recipe.precompute)
    return True, False  # ingest: its tasks import little


def _check_stage_config(args: argparse.Namespace) -> Any:
    """Build the command's stage config (``stage_config`` = ("module:Class", recipe section), set by the stages
    whose handler builds it with :func:`~pipeline.common.config.config_from_cli` alone) before anything slow: a bad
    value is refused before Ray starts and before the stage's modules (torch, Ray, MLflow) import. The handler
    builds the same config again."""
    spec = getattr(args, "stage_config", None)
    if spec is None:
        return None
    from pipeline.common.config import config_from_cli

    target, section = spec
    return config_from_cli(_named(target), args, section)


def main(argv: Sequence[str] | None = None, early_ray: bool = False) -> int:
    """Entry point of ``spar`` (and of ``python -m jobs.<stage>``). Returns the exit code. ``early_ray``: start the
    local Ray cluster of a Ray command in the background while its modules import (the console command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))  # the first non-option word
    args = parser.parse_args(argv)
    try:
        cfg = _check_stage_config(args)
        if early_ray:
            _start_ray_early(args, cfg)
        handler = resolve_handler(args)
        mark("imports")
        if handler is None:
            parser.print_help()
            return 2
        rc = handler(args)
        mark("run_end")
    except KeyboardInterrupt:
        print("spar: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI decides how to report
        if is_user_error(e):
            print(f"spar {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    return int(rc or 0)


def entry() -> None:
    """Console-script wrapper: the command, then its local Ray cluster stopped (a mark on each side shows what
    Ray's shutdown costs), then :func:`_exit`."""
    rc = main(early_ray=True)
    # a Ray command: stop its local cluster (after waiting for an early start to finish)
    if "pipeline.common.tasks" in sys.modules:
        from pipeline.common.tasks import shutdown_ray

        shutdown_ray()
        mark("ray_down")
    _exit(rc)


def _exit(rc: int) -> None:
    """Exit as the interpreter does (wait for the threads that are not daemons, run the atexit handlers, flush),
    without its last stage: garbage collections over every object torch, Ray and MLflow left and the teardown of
    every module, which took seconds on a small CPU (`spar bench startup`) and in which extension modules print
    leak reports (nanobind's, for triton's objects). Everything a stage writes is written before its handler
    returns."""
    threading._shutdown()  # type: ignore[attr-defined]  # the interpreter's own first step: executors told to stop, threads joined
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
