"""What a whole run is made of: the ``[run]`` section, the typed :class:`Recipe` (one config per stage, read from one
TOML file) and the demo's own small config. Light: argument definitions and recipes only, no stage code."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pipeline.cache.config import PrecomputeConfig
from pipeline.common.config import ConfigError, apply_overrides, load_config, read_recipe
from pipeline.data.config import IngestConfig
from pipeline.eval.config import EvalConfig
from pipeline.train.config import DistillConfig


@dataclass
class RunConfig:
    """``[run]``: where the pipeline works and what it reads."""

    workdir: str = "spar-work"
    experiment: str = "spar"
    source: str = ""  # raw training images (folder, list file, glob, s3://); "" = the bundled sample photos
    # raw held-out images for the fidelity report; "" = sample photos (if source is "")
    heldout_source: str = ""
    ray_address: str = ""  # "" = local in-process cluster (or RAY_ADDRESS)
    skip_eval: bool = False


@dataclass
class Recipe:
    """Every stage's config for one run. Paths that connect the stages (image roots, cache, checkpoint, workdir,
    experiment) are left empty here and filled in by the orchestrator."""

    run: RunConfig = field(default_factory=RunConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    precompute: PrecomputeConfig = field(default_factory=PrecomputeConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_SECTION_TYPES: dict[str, type] = get_type_hints(Recipe)  # each TOML section's config class, in order
SECTIONS = tuple(_SECTION_TYPES)


def _check_sections(overrides: list[str]) -> None:
    """Every override must name a known section (``section.key=value``); each section's config takes its own."""
    for item in overrides:
        sec, dot, _ = item.split("=", 1)[0].strip().partition(".")
        if not dot:
            raise ConfigError(
                f"pipeline override {item!r} must name its section: one of {', '.join(SECTIONS)}"
            )
        if sec not in SECTIONS:
            raise ConfigError(
                f"pipeline override {item!r}: unknown section {sec!r}; allowed: {', '.join(SECTIONS)}"
            )


def load_recipe(path: str, overrides: list[str], run_flags: dict[str, Any] | None = None) -> Recipe:
    """Load and validate every section of a recipe (unknown sections and keys are errors); ``run_flags`` (from
    command-line flags) override ``[run]`` keys last."""
    recipe = read_recipe(path)
    unknown = sorted(set(recipe) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"recipe {path}: unknown section(s) {unknown}; allowed: {', '.join(SECTIONS)}")
    _check_sections(overrides)
    sections = {sec: load_config(cls, path, overrides, section=sec) for sec, cls in _SECTION_TYPES.items()}
    if run_flags:
        sections["run"] = apply_overrides(sections["run"], run_flags)
    sections["eval"].report()  # a key the chosen report does not read is refused before anything runs
    return Recipe(**sections)


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

    def precompute_config(self) -> PrecomputeConfig:
        """The demo's teacher caches: its backbone as teacher, its crop, stride, seed and workers (before the
        machine's threads are given to an in-process run)."""
        return PrecomputeConfig(
            teacher=self.backbone, seed=self.seed, crop=self.crop, stride=self.stride, workers=self.workers
        )
