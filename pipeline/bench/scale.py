"""``spar bench scale``: the whole pipeline (ingest -> precompute -> distill) on N synthetic images, per image
against N, in one run: seconds and bytes of each stage, the peak memory of each stage (this process and everything
it started: Ray's raylet, workers and helper actors), files and objects in the image set and the cache (each one a
request per read on S3), and MLflow rows per training step. Everything per image must stay flat in N.

Sources: ``K`` distinct seeded photo-like textures (:func:`pipeline.bench.loader.synthetic_photo`) hard-linked to N
names, so writing them costs nothing; every stage still processes N images. Plain ingest by default (sizes stay
as given); ``--augment`` applies the paper's recipe.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from pipeline.bench.loader import write_sources as synthetic_sources
from pipeline.bench.measure import cpu_name, scratch_dir, write_json
from pipeline.cache.precompute import PrecomputeConfig, precompute
from pipeline.common.tasks import init_ray
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import open_imageset
from pipeline.data.ingest import ingest
from pipeline.train.config import DistillConfig
from pipeline.train.driver import distill
from pipeline.train.stream import Planner, refs_from_imageset
from spar_core.backbones import build_backbone

DISTINCT = 8  # distinct source images (the rest are hard links to them)


def _rss() -> int:
    """Resident bytes of this process plus all its descendants."""
    me, total = psutil.Process(), 0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


@contextlib.contextmanager
def stage(record: dict[str, Any], name: str, out: Path | None) -> Iterator[None]:
    """Time a stage, take its peak memory (this process and its descendants, sampled every 0.25 s by a thread)
    and (``out``) the bytes and files it left under ``out``."""
    peak, stop = _rss(), threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.25):
            peak = max(peak, _rss())

    sampler = threading.Thread(target=sample, daemon=True, name="spar-peak-rss")
    t0 = time.perf_counter()
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
    record[name] = {"seconds": time.perf_counter() - t0, "peak_rss_mb": max(peak, _rss()) / 2**20}
    if out is not None:
        files = [p for p in out.rglob("*") if p.is_file()]
        record[name].update(bytes=sum(p.stat().st_size for p in files), files=len(files))


def write_sources(folder: Path, n: int, height: int, width: int) -> None:
    """``n`` PNG sources: :data:`DISTINCT` distinct images, the rest hard links to them."""
    synthetic_sources(folder, min(n, DISTINCT), height, width)
    for i in range(DISTINCT, n):
        os.link(folder / f"img_{i % DISTINCT:06d}.png", folder / f"img_{i:06d}.png")


def mlflow_rows(db: Path, run_id: str) -> dict[str, int]:
    """Rows the run wrote into MLflow's tables (metrics, params, tags), from its sqlite store."""
    with contextlib.closing(sqlite3.connect(db)) as con:
        return {t: con.execute(f"SELECT COUNT(*) FROM {t} WHERE run_uuid = ?", (run_id,)).fetchone()[0]  # noqa: S608
                for t in ("metrics", "params", "tags")}  # fmt: skip


def one_n(base: Path, n: int, args: argparse.Namespace, h: int, w: int) -> dict[str, Any]:
    """The pipeline on ``n`` images; its per-stage record."""
    rec: dict[str, Any] = {"n": n}
    write_sources(base / "src", n, h, w)
    icfg = IngestConfig(augment=args.augment, shard_size=args.shard_size)
    with stage(rec, "ingest", base / "set"):
        ingest(str(base / "src"), str(base / "set"), icfg, workers=2, progress=False)
    with stage(rec, "precompute", base / "cache"):
        crop = build_backbone(args.teacher).native_size
        cache = precompute(PrecomputeConfig(images=str(base / "set"), teacher=args.teacher, crop=crop,
                                            stride=args.stride or crop, cache_root=str(base / "cache"),
                                            progress=False))  # fmt: skip
    rec["plan_us_per_sample"] = plan_lookup_us(str(base / "set"))
    rec["imageset_objects"] = _count(base / "set")
    rec["cache_objects"] = _count(base / "cache")
    if args.distill_max_n and n > args.distill_max_n:
        # to fit the time; the part of the stream that grows with N (plan lookups) is measured above
        return rec
    steps = args.steps or n
    dcfg = DistillConfig(images=str(base / "set"), cache=cache, workdir=str(base / "work"), max_steps=steps,
                         experiment="bench-scale", register_model="", loader_workers=0,
                         checkpoint_every=10**9)  # fmt: skip
    with stage(rec, "distill", None):
        res = distill(dcfg)
    rec["distill"]["steps"] = res.steps
    rec["mlflow"] = mlflow_rows(base / "work" / "mlflow.db", res.run_id)
    rec["distill"].update(steady_steps(base / "work" / "mlflow.db", res.run_id))
    return rec


def steady_steps(db: Path, run_id: str, skip: int = 3) -> dict[str, float]:
    """Median step time and data-wait fraction of the run's steps after the first ``skip`` (start-up), as the
    training loop logged them (the stage's wall time is mostly Ray Train's start-up at these step counts)."""
    q = "SELECT value FROM metrics WHERE run_uuid = ? AND key = ? AND step >= ? ORDER BY step"
    with contextlib.closing(sqlite3.connect(db)) as con:
        step = [v for (v,) in con.execute(q, (run_id, "step_time_s", skip))]
        wait = [v for (v,) in con.execute(q, (run_id, "data_wait_frac", skip))]
    med = statistics.median
    return {
        "steady_step_s": med(step) if step else float("nan"),
        "data_wait_frac": med(wait) if wait else float("nan"),
    }


def plan_lookup_us(images: str) -> float:
    """Microseconds per sample the distill stream spends finding its next batch in the plan (one epoch, rank 0)."""
    planner = Planner(refs_from_imageset(open_imageset(images)), seed=0, world_size=1)
    n = planner.steps(0)
    t0 = time.perf_counter()
    for e, b in planner.positions(0, 0):
        if e > 0:
            break
        planner.batches(e, 0)[b]
    return (time.perf_counter() - t0) / n * 1e6


def _count(root: Path) -> dict[str, int]:
    """Files by kind under ``root``: image shards (tar), sidecars/metadata (json, parquet), Zarr objects."""
    files = [p for p in root.rglob("*") if p.is_file()]
    zarr = [p for p in files if any(part.endswith(".zarr") for part in p.parts)]
    return {"files": len(files), "tar": sum(p.suffix == ".tar" for p in files), "zarr_objects": len(zarr)}


def run(args: argparse.Namespace) -> int:
    """``spar bench scale``."""
    h, w = (int(v) for v in args.size.lower().split("x"))
    ns = [int(v) for v in args.n.split(",")]
    init_ray(num_cpus=min(2, os.cpu_count() or 1))
    out: dict[str, Any] = {"cpu": cpu_name(), "cores": os.cpu_count(), "size": [h, w], "teacher": args.teacher,
                           "load_avg_start": os.getloadavg(), "runs": []}  # fmt: skip
    with scratch_dir(args.workdir, "spar-bench-scale-") as base:
        for n in ns:
            rec = one_n(base / f"n{n}", n, args, h, w)
            out["runs"].append(rec)
            _print_row(rec, h, w)
            write_json(args.json, out)
    out["load_avg_end"] = os.getloadavg()
    print(f"{out['cpu']}, {out['cores']} cores; load average {out['load_avg_start'][0]:.1f} at start, "
          f"{out['load_avg_end'][0]:.1f} at end")  # fmt: skip
    return 0


def _print_row(r: dict[str, Any], h: int, w: int) -> None:
    n = r["n"]
    i, p = r["ingest"], r["precompute"]
    d = r.get("distill", {"seconds": float("nan"), "steps": 1, "peak_rss_mb": float("nan")})
    r = {**r, "mlflow": r.get("mlflow", {"metrics": float("nan"), "params": 0, "tags": 0})}
    print(
        f"N={n} ({w}x{h}): ingest {i['seconds'] / n * 1e3:.0f} ms/img {i['bytes'] / n / 1e6:.2f} MB/img "
        f"peak {i['peak_rss_mb']:.0f} MB | precompute {p['seconds'] / n * 1e3:.0f} ms/img "
        f"{p['bytes'] / n / 1e3:.1f} KB/img peak {p['peak_rss_mb']:.0f} MB | distill {d['seconds']:.0f} s for {d['steps']} steps, "
        f"steady {d.get('steady_step_s', float('nan')) * 1e3:.1f} ms/step, wait {d.get('data_wait_frac', float('nan')):.3f}, peak {d['peak_rss_mb']:.0f} MB | files: set {r['imageset_objects']} cache "
        f"{r['cache_objects']} | MLflow rows/step: metrics {r['mlflow']['metrics'] / d['steps']:.2f}, "
        f"params+tags {r['mlflow']['params'] + r['mlflow']['tags']} | plan lookup {r['plan_us_per_sample']:.0f} us/img"
    )
