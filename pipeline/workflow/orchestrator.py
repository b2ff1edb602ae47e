"""``spar pipeline --config RECIPE``: every stage from one TOML recipe.

Recipe sections: ``[run]`` (:class:`RunConfig`), ``[ingest]`` (``IngestConfig``), ``[precompute]``
(``PrecomputeConfig``), ``[distill]`` (``DistillConfig``), ``[eval]`` (``EvalConfig``). Paths that connect the
stages (image roots, cache path, checkpoint, workdir, experiment) are filled in here, so a recipe only states
choices. ``--set section.key=value`` overrides any key.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.common.config import ConfigError, apply_overrides, load_config, read_recipe

SECTIONS = ("run", "ingest", "precompute", "distill", "eval")


@dataclass
class RunConfig:
    """``[run]``: where the pipeline works and what it reads."""

    workdir: str = "spar-work"
    experiment: str = "spar"
    source: str = ""  # raw training images (folder, list file, glob, s3://); "" = the bundled sample photos
    heldout_source: str = (
        ""  # raw held-out images for the fidelity report; "" = sample photos (if source is "")
    )
    ray_address: str = ""  # "" = local in-process cluster (or RAY_ADDRESS)
    skip_eval: bool = False


def _section_overrides(overrides: list[str], section: str) -> list[str]:
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "." not in key:
            raise ConfigError(
                f"pipeline override {item!r} must name its section: one of {', '.join(SECTIONS)}"
            )
        sec = key.split(".", 1)[0]
        if sec not in SECTIONS:
            raise ConfigError(
                f"pipeline override {item!r}: unknown section {sec!r}; allowed: {', '.join(SECTIONS)}"
            )
        if sec == section:
            out.append(item)
    return out


def load_recipe(path: str, overrides: list[str], run_flags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load and validate every section of a recipe (unknown sections and keys are errors).

    ``run_flags`` (from command-line flags) override ``[run]`` keys last.
    """
    from pipeline.cache.precompute import PrecomputeConfig
    from pipeline.data.ingest import IngestConfig
    from pipeline.eval.benchmark import EvalConfig
    from pipeline.train.config import DistillConfig

    recipe = read_recipe(path)
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    classes = {
        "run": RunConfig,
        "ingest": IngestConfig,
        "precompute": PrecomputeConfig,
        "distill": DistillConfig,
        "eval": EvalConfig,
    }
    out = {}
    for sec, cls in classes.items():
        out[sec] = load_config(cls, path, _section_overrides(overrides, sec), section=sec)
    if run_flags:
        out["run"] = apply_overrides(out["run"], run_flags)
    return out


def _ingest(src: str, out: Path, icfg: Any) -> str:
    from pipeline.data.ingest import ingest

    ingest(src, str(out), icfg)
    return str(out)


def run_pipeline(
    cfgs: dict[str, Any], precompute_stats: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """ingest -> precompute -> distill -> eval, as configured. Returns paths, results (``distill_result``,
    ``eval``) and each stage's wall time in seconds (``seconds``: ingest, precompute, distill, eval).
    ``precompute_stats``: when given, every precompute task's statistics are appended to it."""
    from pipeline.cache.precompute import precompute
    from pipeline.common.tasks import init_ray
    from pipeline.eval.benchmark import run_eval
    from pipeline.train.driver import distill
    from pipeline.workflow.demo import HELDOUT_PHOTOS, TRAIN_PHOTOS, write_photos

    run: RunConfig = cfgs["run"]
    work = Path(run.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    init_ray(address=run.ray_address or None)
    source, held_source = run.source, run.heldout_source
    if not source:
        write_photos(work / "raw" / "train", TRAIN_PHOTOS)
        source = str(work / "raw" / "train")
        if not held_source:
            write_photos(work / "raw" / "heldout", HELDOUT_PHOTOS)
            held_source = str(work / "raw" / "heldout")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    print(f"[spar pipeline] ingest {source}", flush=True)
    images = _ingest(source, work / "images" / "train", cfgs["ingest"])
    heldout = None
    if held_source:
        held_cfg = dataclasses.replace(cfgs["ingest"], augment=False)
        heldout = _ingest(held_source, work / "images" / "heldout", held_cfg)

    seconds["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    pcfg = cfgs["precompute"]
    cache_root = pcfg.cache_root or str(work / "cache")
    ray_addr = run.ray_address or pcfg.ray_address
    pcfg = dataclasses.replace(pcfg, workdir=pcfg.workdir or str(work), experiment=run.experiment)
    print("[spar pipeline] precompute", flush=True)
    cache = precompute(
        dataclasses.replace(pcfg, images=images, cache_root=cache_root, ray_address=ray_addr),
        stats=precompute_stats,
    )
    held_cache = None
    if heldout:
        held_cache = precompute(
            dataclasses.replace(pcfg, images=heldout, cache_root=cache_root, ray_address=ray_addr),
            stats=precompute_stats,
        )

    seconds["precompute"] = time.perf_counter() - t
    t = time.perf_counter()
    print("[spar pipeline] distill", flush=True)
    dcfg = dataclasses.replace(
        cfgs["distill"],
        images=images,
        cache=cache,
        workdir=str(work),
        experiment=run.experiment,
        ray_address=run.ray_address or cfgs["distill"].ray_address,
    )
    result = distill(dcfg)
    seconds["distill"] = time.perf_counter() - t
    out: dict[str, Any] = {
        "images": images,
        "heldout": heldout,
        "cache": cache,
        "heldout_cache": held_cache,
        "checkpoint": result.checkpoint_dir,
        "run_id": result.run_id,
        "distill_result": result,
        "seconds": seconds,
    }
    if run.skip_eval:
        return out
    ecfg = cfgs["eval"]
    common = {"workdir": str(work), "experiment": run.experiment, "checkpoint": result.checkpoint_dir}
    if ecfg.fidelity:
        if not heldout:
            raise ConfigError("[eval] fidelity = true needs held-out images: set run.heldout_source")
        ecfg = dataclasses.replace(ecfg, images=heldout, teacher_cache=held_cache, **common)
    elif ecfg.data_root:
        ecfg = dataclasses.replace(ecfg, **common)
    else:
        print("[spar pipeline] eval skipped: [eval] has neither fidelity = true nor a data_root", flush=True)
        return out
    print("[spar pipeline] eval", flush=True)
    t = time.perf_counter()
    out["eval"] = run_eval(ecfg)
    seconds["eval"] = time.perf_counter() - t
    return out


def _cmd_pipeline(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in {"workdir": args.workdir, "source": args.source}.items() if v}
    cfgs = load_recipe(args.config, list(args.set or ()), run_flags=flags)
    out = run_pipeline(cfgs)
    print(
        f"[spar pipeline] done: cache {out['cache']}, student {out['checkpoint']}, MLflow run {out['run_id']}"
    )
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar pipeline``."""
    p = sub.add_parser("pipeline", help="all stages from one TOML recipe (jobs/configs/*.toml)")
    p.add_argument(
        "--config", required=True, help="recipe TOML with [run] [ingest] [precompute] [distill] [eval]"
    )
    p.add_argument("--workdir", help="override run.workdir")
    p.add_argument("--source", help="override run.source (raw training images)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a recipe key")
    p.set_defaults(func=_cmd_pipeline)
