"""The one orchestrator: ingest -> precompute -> distill -> eval (-> segment), for ``spar pipeline``, ``spar demo``,
the GPU check and the tests that need a whole run.

One image's path through it: a raw file is decoded, augmented once and frozen into a webdataset shard
(:mod:`pipeline.data.ingest`); the sliding-window teacher's features of that frozen image go into a Zarr shard of
the teacher cache (:mod:`pipeline.cache.precompute`); Ray Train workers stream the image and its cached features as
one pair and train the student on it (:mod:`pipeline.train`); the student is then measured against the teacher on
held-out images and on benchmarks (:mod:`pipeline.eval`).

Paths that connect the stages (image roots, the cache, the checkpoint, workdir and experiment) are filled in here,
so a :class:`~pipeline.workflow.config.Recipe` only states choices. The workdir is a local folder or any fsspec URL
(``s3://bucket/prefix``): every file of a run goes under it through :mod:`pipeline.common.storage` (``raw/`` sample
photos, ``images/``, ``cache/``, ``eval/``, ``overlays/``, the training run's state); a URL workdir needs an MLflow
tracking server (``MLFLOW_TRACKING_URI``), as the embedded SQLite store cannot live on an object store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from PIL import Image

from pipeline.cache.maintenance import list_caches
from pipeline.cache.precompute import PrecomputeConfig, precompute
from pipeline.cache.reader import open_cache
from pipeline.common import storage
from pipeline.common.config import ConfigError
from pipeline.common.console import verbose
from pipeline.common.photos import HELDOUT_PHOTOS, TRAIN_PHOTOS, write_photos
from pipeline.common.tasks import init_ray
from pipeline.common.trace import mark
from pipeline.common.tracking import require_remote_store, tracking_uri
from pipeline.data.config import IngestConfig
from pipeline.data.imageset import open_imageset
from pipeline.data.ingest import IngestSummary, ingest
from pipeline.eval.benchmark import run_eval
from pipeline.eval.config import (
    BenchmarkConfig,
    EvalConfig,
    FidelityConfig,
    ReportConfig,
    SegmentConfig,
    SpeedConfig,
)
from pipeline.eval.segment import segment_images
from pipeline.train.driver import DistillResult, distill
from pipeline.workflow.config import Recipe, load_recipe

STAGES = ("ingest", "precompute", "distill", "eval")


@dataclass
class Reporter:
    """One console line per stage (``[spar <who>] 2/4 precompute: ...``) plus indented details. With ``quiet``,
    the stages' own stdout reports are hidden (lines starting with "warning"/"error" still come through on
    stderr) unless Ray's verbose mode is on; progress bars (stderr) are untouched."""

    who: str
    quiet: bool = False

    def stage(self, name: str, text: str) -> None:
        mark(f"stage_{name}")
        print(f"[spar {self.who}] {STAGES.index(name) + 1}/{len(STAGES)} {name}: {text}", flush=True)

    def detail(self, text: str) -> None:
        print(f"[spar {self.who}]     {text}", flush=True)

    @contextlib.contextmanager
    def stage_output(self) -> Iterator[None]:
        if not self.quiet or verbose():
            yield
            return
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                yield
        finally:
            for line in buf.getvalue().splitlines():
                if line.lower().startswith(("warning", "error")):
                    print(line, file=sys.stderr, flush=True)


@dataclass
class Extras:
    """What a caller adds to a recipe's run: a separate ingest config for the held-out images (default: the
    training one without augmentation), evaluations instead of the recipe's ``[eval]``, segmentation of the
    held-out photos (overlays logged on the training run) and a list that collects precompute task statistics."""

    heldout_ingest: IngestConfig | None = None
    heldout_cache: bool = True  # also precompute the teacher on the held-out images
    evals: Sequence[EvalConfig | ReportConfig] | None = None
    segment: SegmentConfig | None = None
    precompute_stats: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------------------------------------- stages


def workdir_of(recipe: Recipe) -> str:
    """``run.workdir`` as the run uses it: an absolute local path, or the URL without a trailing ``/``."""
    w = recipe.run.workdir
    if storage.is_local(w):
        return str(Path(storage.local_path(w)).resolve())
    return w.rstrip("/")


def _sample_photos(folder: str, names: tuple[str, ...]) -> str:
    """The bundled sample photos as PNG files in ``folder`` (local or URL; files already there are kept)."""
    have = set(storage.listdir(folder))
    with storage.staged_dir(folder) as staged:
        write_photos(Path(staged), tuple(n for n in names if f"{n}.png" not in have))
    return folder


def _sources(recipe: Recipe, work: str) -> tuple[str, str]:
    """The raw training and held-out sources; the bundled sample photos (under ``<work>/raw``) when the recipe
    names none."""
    source, held = recipe.run.source, recipe.run.heldout_source
    if not source:
        source = _sample_photos(storage.join(work, "raw", "train"), TRAIN_PHOTOS)
        if not held:
            held = _sample_photos(storage.join(work, "raw", "heldout"), HELDOUT_PHOTOS)
    return source, held


def _ingest_one(src: str, root: str, cfg: IngestConfig, label: str, rep: Reporter) -> str:
    summary: IngestSummary = ingest(src, root, cfg)
    ims = open_imageset(root)
    rep.detail(
        f"{label}: {len(ims.records)} images in {ims.num_shards} shards -> {root} "
        f"(accepted {summary.accepted}, rejected {summary.rejected})"
    )
    return root


def stage_ingest(
    recipe: Recipe, work: str, extras: Extras, rep: Reporter
) -> tuple[str, str | None, str | None]:
    """Raw sources -> the training image set (augmented as configured) and the held-out one (not augmented).
    Returns the two image-set roots and the held-out source."""
    source, held = _sources(recipe, work)
    what = f"training images from {source}" + (f", held-out images from {held}" if held else "")
    rep.stage("ingest", what)
    images = _ingest_one(source, storage.join(work, "images", "train"), recipe.ingest, "train", rep)
    if not held:
        return images, None, None
    held_cfg = extras.heldout_ingest or dataclasses.replace(recipe.ingest, augment=False)
    heldout = _ingest_one(held, storage.join(work, "images", "heldout"), held_cfg, "held-out", rep)
    return images, heldout, held


def _complete(cache_path: str) -> bool:
    try:
        return open_cache(cache_path).is_complete()
    except Exception:  # noqa: BLE001 - a missing or unreadable cache is simply not complete yet
        return False


def _precompute_one(cfg: PrecomputeConfig, label: str, extras: Extras, rep: Reporter) -> str:
    reused = {p for p in list_caches(cfg.cache_root) if _complete(p)}
    t0 = time.perf_counter()
    with rep.stage_output():
        path = precompute(cfg, stats=extras.precompute_stats)
    how = "reused: already complete, nothing computed" if path in reused else "computed"
    shards = open_cache(path).num_shards
    rep.detail(f"{label}: teacher cache {path} ({shards} shards, {how}, {time.perf_counter() - t0:.1f} s)")
    return path


def stage_precompute(
    recipe: Recipe, work: str, images: str, heldout: str | None, extras: Extras, rep: Reporter
) -> tuple[str, str | None]:
    """The teacher's features of both image sets, into ``<cache_root>/<fingerprint>`` (reused when complete)."""
    p = recipe.precompute
    rep.stage("precompute", f"sliding-window teacher {p.teacher}, crop {p.crop}, stride {p.stride}")
    base = dataclasses.replace(
        p,
        cache_root=p.cache_root or storage.join(work, "cache"),
        ray_address=recipe.run.ray_address or p.ray_address,
        workdir=p.workdir or work,
        experiment=recipe.run.experiment,
    )
    cache = _precompute_one(dataclasses.replace(base, images=images), "train", extras, rep)
    if heldout is None or not extras.heldout_cache:
        return cache, None
    return cache, _precompute_one(dataclasses.replace(base, images=heldout), "held-out", extras, rep)


def stage_distill(recipe: Recipe, work: str, images: str, cache: str, rep: Reporter) -> DistillResult:
    """Train the student on the cached targets (Ray Train); its MLflow run is the run's parent run."""
    d = dataclasses.replace(
        recipe.distill,
        images=images,
        cache=cache,
        workdir=work,
        experiment=recipe.run.experiment,
        ray_address=recipe.run.ray_address or recipe.distill.ray_address,
    )
    steps = f"{d.max_steps} steps" if d.max_steps else f"{d.epochs} epochs"
    rep.stage(
        "distill", f"{steps}, last {d.trainable_blocks} block(s) trained, lr {d.lr}, {d.workers} worker(s)"
    )
    with rep.stage_output():
        result = distill(d)
    loss = f"{result.final_loss:.4g}" if result.final_loss is not None else "?"
    rep.detail(f"MLflow run {result.run_id}: {result.steps} steps, final loss {loss}")
    return result


def _complete_eval(
    cfg: EvalConfig | ReportConfig, work: str, recipe: Recipe, out: PipelineResult
) -> ReportConfig | None:
    """An eval config with the run's paths filled in (result files in ``<work>/eval/<kind>`` unless ``out`` is
    set; a child run of the training run), or None when it cannot run (no data)."""
    if isinstance(cfg, EvalConfig):
        cfg = cfg.report()
    common = {
        "workdir": work,
        "experiment": recipe.run.experiment,
        "parent_run": cfg.parent_run or out.run_id,
    }
    if isinstance(cfg, FidelityConfig):
        if not out.heldout:
            raise ConfigError("[eval] fidelity = true needs held-out images: set run.heldout_source")
        where = cfg.out or storage.join(work, "eval", "fidelity")
        return dataclasses.replace(
            cfg,
            images=out.heldout,
            teacher_cache=out.heldout_cache,
            checkpoint=out.checkpoint,
            out=where,
            **common,
        )
    if isinstance(cfg, SpeedConfig):
        return dataclasses.replace(cfg, out=cfg.out or storage.join(work, "eval", "speed"), **common)
    if isinstance(cfg, BenchmarkConfig) and cfg.data_root:
        where = cfg.out or storage.join(work, "eval", cfg.dataset)
        return dataclasses.replace(cfg, checkpoint=out.checkpoint, out=where, **common)
    return None


def stage_eval(recipe: Recipe, work: str, out: PipelineResult, extras: Extras, rep: Reporter) -> None:
    """Fidelity to the teacher on held-out images, benchmarks and speed, as child runs of the training run."""
    todo = [c for c in (_complete_eval(e, work, recipe, out) for e in extras.evals or [recipe.eval]) if c]
    if not todo:
        rep.stage("eval", "skipped: [eval] has neither fidelity = true nor a data_root")
        return
    kinds = ", ".join(c.dataset if isinstance(c, BenchmarkConfig) else c.kind() for c in todo)
    rep.stage("eval", f"{kinds} (child runs of the training run; files in {storage.join(work, 'eval')})")
    with rep.stage_output():
        out.evals.extend(run_eval(c) for c in todo)


def heldout_photos(held: str) -> list[str]:
    """The ``*.png`` files directly in the folder ``held`` (local or URL), sorted."""
    return [storage.join(held, n) for n in storage.listdir(held) if n.endswith(".png")]


def stage_segment(
    work: str, out: PipelineResult, cfg: SegmentConfig, files: list[str], rep: Reporter
) -> None:
    """Segment the held-out photos (local files or URLs) with the student; the overlays go to ``cfg.out`` (default
    ``<work>/overlays``) and become MLflow images of the training run."""
    cfg = dataclasses.replace(cfg, checkpoint=out.checkpoint, out=cfg.out or storage.join(work, "overlays"))
    out.segments = segment_images(files, cfg)
    client = MlflowClient(tracking_uri(work))
    for where in sorted(str(r["overlay"]) for r in out.segments):
        png = storage.read_bytes(where)
        if png is None:
            raise FileNotFoundError(f"segmentation overlay {where} is missing")
        with Image.open(io.BytesIO(png)) as im:
            client.log_image(out.run_id, im.convert("RGB"), key=f"overlay/{Path(where).stem}", step=0)
    rep.detail(f"segmentation overlays of {len(files)} held-out photos -> {cfg.out}")


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class PreparedData:
    """The training inputs of a run: image sets and teacher caches (what any number of students can reuse), and
    the wall time in seconds of each stage so far."""

    images: str
    heldout: str | None
    heldout_source: str | None
    cache: str
    heldout_cache: str | None
    seconds: dict[str, float]


@dataclass
class PipelineResult(PreparedData):
    """A whole run: its data, what each later stage returned, and each stage's wall time in seconds."""

    distill: DistillResult
    evals: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, object]] = field(default_factory=list)

    @property
    def checkpoint(self) -> str:
        return self.distill.checkpoint_dir

    @property
    def run_id(self) -> str:
        return self.distill.run_id

    @property
    def eval(self) -> dict[str, Any] | None:
        """The first evaluation's result (the recipe's ``[eval]``), if any ran."""
        return self.evals[0] if self.evals else None


def prepare_data(
    recipe: Recipe, extras: Extras | None = None, reporter: Reporter | None = None
) -> PreparedData:
    """ingest -> precompute: the image sets and their teacher caches (each reused when already complete)."""
    extras = extras or Extras()
    rep = reporter or Reporter("pipeline")
    work = workdir_of(recipe)
    require_remote_store(work)  # a URL workdir needs a tracking server: refused before anything is created
    storage.makedirs(work)
    init_ray(address=recipe.run.ray_address or None)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    images, heldout, held_source = stage_ingest(recipe, work, extras, rep)
    seconds["ingest"] = time.perf_counter() - t
    t = time.perf_counter()
    cache, held_cache = stage_precompute(recipe, work, images, heldout, extras, rep)
    seconds["precompute"] = time.perf_counter() - t
    return PreparedData(images, heldout, held_source, cache, held_cache, seconds)


def run_pipeline(
    recipe: Recipe, extras: Extras | None = None, reporter: Reporter | None = None
) -> PipelineResult:
    """ingest -> precompute -> distill -> eval (-> segment), as configured; see the module docstring."""
    extras = extras or Extras()
    rep = reporter or Reporter("pipeline")
    work = workdir_of(recipe)
    data = prepare_data(recipe, extras, rep)  # refuses a URL workdir without a tracking server first
    seconds = data.seconds
    t = time.perf_counter()
    result = stage_distill(recipe, work, data.images, data.cache, rep)
    seconds["distill"] = time.perf_counter() - t
    out = PipelineResult(**vars(data), distill=result)
    if not recipe.run.skip_eval:
        t = time.perf_counter()
        stage_eval(recipe, work, out, extras, rep)
        seconds["eval"] = time.perf_counter() - t
    held = data.heldout_source
    if extras.segment is not None and held and storage.isdir(held):
        t = time.perf_counter()
        stage_segment(work, out, extras.segment, heldout_photos(held), rep)
        seconds["segment"] = time.perf_counter() - t
    return out


def run_cli(args: argparse.Namespace) -> int:
    """``spar pipeline --config RECIPE``."""
    flags = {k: v for k, v in {"workdir": args.workdir, "source": args.source}.items() if v}
    out = run_pipeline(load_recipe(args.config, list(args.set or ()), run_flags=flags))
    print(f"[spar pipeline] done: cache {out.cache}, student {out.checkpoint}, MLflow run {out.run_id}")
    return 0
