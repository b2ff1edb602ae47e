"""``spar demo``: the whole pipeline on one machine, on real sample photographs, in minutes.

ingest (train with the frozen augmentations, held-out without) -> precompute the teacher for both image sets ->
distill the student -> evaluate (fidelity to the teacher on held-out images, speed, segmentation overlays).
Everything lives under ``--workdir``: a second run reuses the image sets and the teacher caches and trains a second
student that differs in one setting (the last 1 trainable block instead of the last 2), so MLflow's compare view
and ``spar runs`` show a real difference. The console shows our progress bars and one line per stage; Ray's own
logs only with ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.common.config import ConfigError, apply_overrides, load_config

# scikit-image's bundled photographs: colour, grayscale and RGBA ones (the ingest converts them all to RGB)
TRAIN_PHOTOS = (
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "moon",
    "coins",
    "page",
    "text",
    "grass",
    "gravel",
    "brick",
    "cell",
    "horse",
    "logo",
    "colorwheel",
    "microaneurysms",
    "eagle",
    "skin",
    "clock",
    "cat",
)
HELDOUT_PHOTOS = ("astronaut", "coffee", "chelsea")


@dataclass
class DemoConfig:
    """``spar demo`` (TOML section ``[demo]``): small enough for a 2-core CPU in minutes."""

    workdir: str = "spar-work"
    backbone: str = "small-clip-224"
    crop: int = 224
    stride: int = 24
    train_long: int = 640  # ingest resize box (the paper's 2048 x 1024, scaled down)
    train_short: int = 320
    train_min_short: int = 224
    heldout_max_side: int = 448
    steps: int = 300
    lr: float = 1e-3  # random-weight demo model, 300 steps: larger than the paper's 2e-5
    trainable_blocks: int = 0  # 0 = alternate: 2 for the workdir's first student, 1 for the second, ...
    workers: int = 1
    seed: int = 0
    classes: str = "person;cat,kitten;cup,mug;rocket;sky;grass;building;table;tree;road"
    experiment: str = "spar-demo"

    def __post_init__(self) -> None:
        if self.trainable_blocks < 0:
            raise ConfigError(f"demo.trainable_blocks must be >= 0, got {self.trainable_blocks}")
        for k in ("crop", "stride", "steps", "workers", "train_long", "train_short", "heldout_max_side"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"demo.{k} must be > 0, got {getattr(self, k)}")


def _say(msg: str) -> None:
    print(f"[spar demo] {msg}", flush=True)


@contextlib.contextmanager
def _quiet():
    """Hide the stages' own stdout reports (the demo prints one line per stage) unless --verbose; lines that
    start with ``warning`` still come through. Progress bars (stderr) are untouched."""
    from pipeline.common.tasks import verbose

    if verbose():
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


def _photo(name: str) -> np.ndarray | None:
    import skimage.data

    try:
        img = np.asarray(getattr(skimage.data, name)())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - a photo this scikit-image cannot load offline is skipped
        return None
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 32:
        return None
    return img.astype(np.uint8) if img.dtype != np.uint8 else img


def write_photos(folder: Path, names: tuple[str, ...]) -> int:
    """Write scikit-image photos as PNG files (kept in their own mode: gray, RGB, RGBA). Returns the count."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            img = _photo(name)
            if img is None:
                continue
            Image.fromarray(img).save(path)
        n += 1
    return n


def stage_ingest(cfg: DemoConfig, work: Path) -> tuple[str, str]:
    from pipeline.data.imageset import open_imageset
    from pipeline.data.ingest import IngestConfig, ingest

    n_train = write_photos(work / "raw" / "train", TRAIN_PHOTOS)
    n_held = write_photos(work / "raw" / "heldout", HELDOUT_PHOTOS)
    _say(f"1/4 ingest: {n_train} training photos (augmented), {n_held} held-out photos (no augmentation)")
    train_cfg = IngestConfig(
        seed=cfg.seed,
        shard_size=8,
        target_long=cfg.train_long,
        target_short=cfg.train_short,
        min_short=cfg.train_min_short,
    )
    held_cfg = IngestConfig(seed=cfg.seed, shard_size=8, augment=False, max_side=cfg.heldout_max_side)
    roots = []
    for split, icfg in (("train", train_cfg), ("heldout", held_cfg)):
        root = work / "images" / split
        summary = ingest(str(work / "raw" / split), str(root), icfg)
        ims = open_imageset(str(root))
        _say(
            f"    {split}: {len(ims.records)} images in {ims.num_shards} shards -> {root} ({_short(summary)})"
        )
        roots.append(str(root))
    return roots[0], roots[1]


def _short(summary: Any) -> str:
    fields = ("accepted", "rejected", "written_shards", "skipped_shards")
    parts = [f"{f} {getattr(summary, f)}" for f in fields if hasattr(summary, f)]
    return ", ".join(parts) or str(summary)


def stage_precompute(cfg: DemoConfig, work: Path, images: str, label: str) -> str:
    from pipeline.cache.precompute import PrecomputeConfig, precompute
    from pipeline.cache.store import open_cache

    pcfg = PrecomputeConfig(
        images=images,
        teacher=cfg.backbone,
        seed=cfg.seed,
        crop=cfg.crop,
        stride=cfg.stride,
        cache_root=str(work / "cache"),
        workers=cfg.workers,
        workdir=str(work),
        experiment=cfg.experiment,
    )
    done_before = _complete_caches(work / "cache")
    t0 = time.perf_counter()
    with _quiet():
        path = precompute(pcfg)
    c = open_cache(path)
    how = "reused: already complete, nothing computed" if path in done_before else "computed"
    _say(
        f"    {label}: teacher cache {path} ({c.num_shards} shards, {how}, {time.perf_counter() - t0:.1f} s)"
    )
    return path


def _complete_caches(root: Path) -> set[str]:
    """Paths of the complete caches under ``root``."""
    from pipeline.cache.store import open_cache

    out = set()
    for d in root.glob("*/spec.json"):
        try:
            if open_cache(str(d.parent)).is_complete():
                out.add(str(d.parent))
        except Exception:  # noqa: BLE001 - an unreadable cache simply does not count as reusable
            continue
    return out


def demo_trainable_blocks(cfg: DemoConfig, work: Path) -> int:
    """The configured value, else 2 for the workdir's first student, 1 for the second, 2 for the third, ..."""
    if cfg.trainable_blocks:
        return cfg.trainable_blocks
    done = [d for d in (work / "students").glob("*") if d.is_dir() and not d.name.startswith(".")]
    return 2 if len(done) % 2 == 0 else 1


def stage_distill(cfg: DemoConfig, work: Path, images: str, cache: str) -> Any:
    from pipeline.train.config import DistillConfig
    from pipeline.train.driver import distill

    blocks = demo_trainable_blocks(cfg, work)
    dcfg = DistillConfig(
        images=images,
        cache=cache,
        trainable_blocks=blocks,
        lr=cfg.lr,
        max_steps=cfg.steps,
        epochs=1000,
        warmup_steps=min(20, cfg.steps // 10),
        schedule="cosine",
        seed=cfg.seed,
        checkpoint_every=max(50, cfg.steps // 3),
        workers=cfg.workers,
        workdir=str(work),
        experiment=cfg.experiment,
        loader_workers=1,
        shuffle_buffer=16,
    )
    _say(
        f"3/4 distill: {cfg.steps} steps, last {blocks} block(s) trained, lr {cfg.lr}, {cfg.workers} worker(s)"
    )
    with _quiet():
        return distill(dcfg)


def stage_evaluate(
    cfg: DemoConfig, work: Path, heldout: str, held_cache: str, ckpt: str, run_id: str
) -> dict[str, Any]:
    """Fidelity (a child run of the training run, found through the checkpoint), speed (a child run too) and
    segmentation overlays (logged as images on the training run)."""
    from pipeline.eval.inference import SegmentConfig, segment_images

    common = {"workdir": str(work), "experiment": cfg.experiment}
    with _quiet():
        ev = _evaluate(cfg, heldout, held_cache, ckpt, run_id, common)
    out = work / "overlays"
    photos = sorted(str(p) for p in (work / "raw" / "heldout").glob("*.png"))
    segment_images(photos, SegmentConfig(classes=cfg.classes, checkpoint=ckpt, out=str(out), short_side=448))
    _log_overlays(work, run_id, out)
    return {**ev, "overlays": str(out)}


def _log_overlays(work: Path, run_id: str, folder: Path) -> None:
    """The overlays as MLflow images of the training run (the UI shows them as pictures)."""
    from mlflow import MlflowClient
    from PIL import Image

    from pipeline.common.tracking import tracking_uri

    client = MlflowClient(tracking_uri(work))
    for png in sorted(folder.glob("*_overlay.png")):
        with Image.open(png) as im:
            client.log_image(run_id, im.convert("RGB"), key=f"overlay/{png.stem}", step=0)


def _evaluate(
    cfg: DemoConfig, heldout: str, held_cache: str, ckpt: str, run_id: str, common: dict[str, Any]
) -> dict[str, Any]:
    from pipeline.eval.benchmark import EvalConfig, run_eval

    fid = run_eval(
        EvalConfig(
            fidelity=True,
            images=heldout,
            teacher_cache=held_cache,
            checkpoint=ckpt,
            classes=cfg.classes,
            **common,
        )
    )
    speed = run_eval(
        EvalConfig(
            speed=True,
            backbone=cfg.backbone,
            resolutions=(448,),
            strides=(cfg.stride,),
            repeats=3,
            parent_run=run_id,
            **common,
        )
    )
    return {"fidelity": fid, "speed": speed}


def _speed_ratio(speed: dict[str, Any]) -> float | None:
    """Teacher seconds / single-pass seconds at the first measured resolution."""
    try:
        single = float(speed["single"][0])
        sliding = float(next(iter(speed["sliding"].values()))[0])
    except (KeyError, IndexError, StopIteration, TypeError, ValueError):
        return None
    return sliding / single if single > 0 else None


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run all four stages; returns what the final summary prints."""
    from pipeline.common.tasks import init_ray
    from pipeline.common.tracking import mlflow_ui_command

    work = Path(cfg.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    init_ray(num_cpus=None)
    train, heldout = stage_ingest(cfg, work)
    _say(f"2/4 precompute: sliding-window teacher {cfg.backbone}, crop {cfg.crop}, stride {cfg.stride}")
    train_cache = stage_precompute(cfg, work, train, "train")
    held_cache = stage_precompute(cfg, work, heldout, "held-out")
    result = stage_distill(cfg, work, train, train_cache)
    loss = f"{result.final_loss:.4g}" if result.final_loss is not None else "?"
    _say(f"    MLflow run {result.run_id}: {result.steps} steps, final loss {loss}")
    _say(
        "4/4 evaluate: fidelity on held-out images, speed, segmentation overlays (child runs of the training run)"
    )
    ev = stage_evaluate(cfg, work, heldout, held_cache, result.checkpoint_dir, result.run_id)
    fid = ev["fidelity"]
    base, stud = fid.get("baseline", {}), fid.get("student", {})
    ratio = stud.get("mse", float("nan")) / max(base.get("mse", float("nan")), 1e-12)
    speed_ratio = _speed_ratio(ev["speed"])
    summary = {
        "baseline_mse": base.get("mse"),
        "student_mse": stud.get("mse"),
        "mse_ratio": ratio,
        "baseline_cosine": base.get("cosine"),
        "student_cosine": stud.get("cosine"),
        "speed_ratio": speed_ratio,
        "train_cache": train_cache,
        "heldout_cache": held_cache,
        "checkpoint": result.checkpoint_dir,
        "overlays": ev["overlays"],
        "run_id": result.run_id,
        "minutes": (time.perf_counter() - t_start) / 60,
    }
    print()
    print("=" * 78)
    print("SPAR demo finished in {:.1f} min".format(summary["minutes"]))
    print("  distance to the teacher on held-out images (lower MSE / higher cosine is better):")
    print(
        f"    single-pass baseline: MSE {base.get('mse', float('nan')):.4f}  cosine {base.get('cosine', 0):.4f}"
    )
    print(
        f"    distilled student:    MSE {stud.get('mse', float('nan')):.4f}  cosine {stud.get('cosine', 0):.4f}"
    )
    print(f"    student / baseline MSE ratio: {ratio:.3f}")
    if speed_ratio:
        print(
            f"  speed: the sliding-window teacher (stride {cfg.stride}) takes {speed_ratio:.1f}x the single pass"
        )
    print(f"  teacher caches: {train_cache}\n                  {held_cache}")
    print(f"  student checkpoint: {result.checkpoint_dir}")
    print(f"  segmentation overlays: {ev['overlays']}")
    print(
        f"  MLflow run {result.run_id} (student with the last {demo_trainable_blocks_used(result)} block(s) trained)"
    )
    model = _registered_model(work, result.run_id)
    if model:
        print(f"  registered MLflow model: {model}  (mlflow.pyfunc.load_model gives features or labels)")
    print("  compare the students (their eval metrics and the settings that differ):")
    print(f"    spar runs --workdir {work} --experiment {cfg.experiment}")
    print(f"    {mlflow_ui_command(work)}")
    print(f"    then open experiment '{cfg.experiment}', tick the training runs, press Compare")
    if _training_runs(work, cfg.experiment) < 2:
        print("  run the demo again to train a second student (last 1 block instead of 2) to compare with")
    print("=" * 78)
    return summary


def demo_trainable_blocks_used(result: Any) -> str:
    """trainable_blocks of the finished run, read back from its exported checkpoint."""
    try:
        from pipeline.train.checkpoint import read_backbone_info

        return str(read_backbone_info(result.checkpoint_dir).get("trainable_blocks", "?"))
    except Exception:  # noqa: BLE001 - only the closing note uses it
        return "?"


def _registered_model(work: Path, run_id: str) -> str:
    """``models:/<name>/<version>`` of the run's student, or ""."""
    from mlflow import MlflowClient

    from pipeline.common.tracking import tracking_uri

    return MlflowClient(tracking_uri(work)).get_run(run_id).data.tags.get("registered_model", "")


def _training_runs(work: Path, experiment: str) -> int:
    """How many training runs the demo's experiment holds."""
    from mlflow import MlflowClient

    from pipeline.common.tracking import tracking_uri

    client = MlflowClient(tracking_uri(work))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return 0
    return len(client.search_runs([exp.experiment_id], "tags.`spar.stage` = 'distill'", max_results=100))


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.common.tasks import set_verbose

    if args.verbose:
        set_verbose(True)
    flags = {k: v for k, v in {"workdir": args.workdir, "steps": args.steps}.items() if v is not None}
    cfg = load_config(DemoConfig, args.config, args.set or (), section="demo")
    cfg = apply_overrides(cfg, flags) if flags else cfg
    run_demo(cfg)
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Register ``spar demo``."""
    p = sub.add_parser("demo", help="the whole pipeline on sample photos, on this machine")
    p.add_argument("--workdir", help="where everything goes (default ./spar-work)")
    p.add_argument("--steps", type=int, help="training steps")
    p.add_argument("--config", help="TOML recipe with a [demo] section")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--verbose", action="store_true", help="also show Ray's own logs and every stage's report")
    p.set_defaults(func=_cmd_demo)


__all__ = ["DemoConfig", "run_demo", "add_cli", "write_photos"]
