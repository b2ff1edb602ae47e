"""What an evaluation is asked to do: the typed configs of ``spar eval``, ``spar segment`` and ``spar embed``, and
the authors' evaluation protocol (per-dataset, per-backbone-family defaults) that :func:`resolve_protocol` fills in.

Light on purpose (stdlib, the config layer and the benchmark names): the ``spar`` CLI builds its parsers from this
module without importing torch. The work lives in :mod:`pipeline.eval.model` (backbone, model input, dense
features), :mod:`~pipeline.eval.segment`, :mod:`~pipeline.eval.benchmark`, :mod:`~pipeline.eval.fidelity` and
:mod:`~pipeline.eval.speed`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from pipeline.common.config import ConfigError
from pipeline.common.errors import UserError
from pipeline.data.config import CLASS_SETS, DATASETS, DEFAULT_CLASS_SET

__all__ = [
    "CLASS_SETS",
    "DATASETS",
    "DEFAULT_CLASS_SET",
    "PAPER_AREA_THD",
    "PAPER_LOGIT_SCALE",
    "PAPER_PROB_THD",
    "PAPER_SIZES",
    "PAPER_STRIDES",
    "RUNS_WIDTH",
    "DatasetName",
    "Mode",
    "Precision",
    "Templates",
    "EmbedConfig",
    "InferenceConfig",
    "BenchmarkConfig",
    "EvalConfig",
    "EvalError",
    "FidelityConfig",
    "ReportConfig",
    "SpeedConfig",
    "SegmentConfig",
]

# the concrete names of pipeline.common.precision (which imports torch, so they are spelled out here)
Precision = Literal["fp32", "bf16", "fp16"]
DatasetName = Literal["voc21", "voc20", "context60", "context59", "cityscapes", "ade20k"]
Mode = Literal["single", "sliding"]
Templates = Literal["imagenet", "simple"]

RUNS_WIDTH = 120  # spar runs: the widest table it fits to the terminal by default
PAPER_STRIDES = (224, 112, 48, 24)  # speed report sweep, in pixels at every crop (24 = the paper's teacher)

# The authors' evaluation protocol (configs/{maskclip,siglip2}/base_config.py and cfg_<dataset>.py at 0f63ff2):
# mmseg Resize(scale=(long, short), keep_ratio=True), logit_scale (model default 40), prob_thd (default 0),
# area_thd (default None = off), per dataset and backbone family ("clip" = the MaskCLIP readout, "siglip2").
PAPER_SIZES: dict[str, tuple[int, int]] = {"cityscapes": (1024, 2048)}  # (short, long); others (672, 2048)
PAPER_LOGIT_SCALE: dict[str, float] = {"voc21": 65.0, "context60": 50.0}  # others 40
PAPER_PROB_THD: dict[tuple[str, str], float] = {
    ("voc21", "clip"): 0.1,
    ("context60", "clip"): 0.1,
    ("context60", "siglip2"): 0.1,
}  # others 0
PAPER_AREA_THD: dict[tuple[str, str], float] = {("voc21", "clip"): 0.1}  # others off


class EvalError(UserError):
    """Bad evaluation request (conflicting options, missing inputs)."""


def _check_at_least(cfg: object, names: tuple[str, ...], least: int) -> None:
    for k in names:
        v = getattr(cfg, k)
        if v is not None and v < least:
            raise ConfigError(f"{k} must be >= {least}, got {v}")


@dataclass
class ReportConfig:
    """What every ``spar eval`` report shares: the model, how it runs, and where the report goes."""

    # model: a student checkpoint, or a named backbone (single-pass baseline; with mode=sliding the teacher)
    checkpoint: str = ""
    baseline: bool = False
    backbone: str = ""
    pretrained: str = ""
    seed: int = 0
    # inference
    precision: Precision = "fp32"
    device: str = "auto"
    crop: int = 0  # 0 = backbone's native size
    window_batch: int = 32
    max_images: int = 0  # 0 = all
    # tracking & output
    experiment: str = "spar-eval"
    run_name: str = ""
    workdir: str = ""  # default: $SPAR_WORKDIR or ./work (as spar distill)
    out: str = ""  # optional folder for results.json / tables / plots (default: a temp dir, logged to MLflow)
    mlflow: bool = True
    parent_run: str = ""  # MLflow id of the training run evaluated ("" = the one that produced --checkpoint)

    def __post_init__(self) -> None:
        _check_at_least(self, ("max_images", "crop"), 0)
        _check_at_least(self, ("window_batch",), 1)
        if self.baseline and self.checkpoint:
            raise ConfigError(
                "--baseline evaluates a named backbone; it cannot be combined with --checkpoint"
            )

    def kind(self) -> str:
        """The report's name: benchmark, fidelity or speed."""
        return type(self).__name__.removesuffix("Config").lower()

    def model_spec(self) -> dict[str, str | int]:
        """The :func:`pipeline.eval.model.load_model` arguments naming the evaluated model."""
        return {
            "checkpoint": self.checkpoint,
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "seed": self.seed,
        }


@dataclass
class _SegmentingConfig(ReportConfig):
    """What the two reports that segment share: the class list, its text read-out, the pictures logged."""

    classes_file: str = ""  # default: the packaged list spar_core/data/<class_set>/<dataset>.txt
    class_set: str = DEFAULT_CLASS_SET  # "paper" (the authors' lists) or "rich" (more synonyms)
    templates: Templates = "imagenet"
    logit_scale: float | None = None  # 40; VOC21 65; Context60 50
    overlays: int = 4  # prediction overlays (benchmark) or PCA panels (fidelity) to log

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_at_least(self, ("overlays",), 0)
        if self.logit_scale is not None and self.logit_scale <= 0:
            raise ConfigError(f"logit_scale must be > 0, got {self.logit_scale}")
        if self.class_set not in CLASS_SETS:
            raise ConfigError(f"class_set must be one of {', '.join(CLASS_SETS)}, got {self.class_set!r}")


@dataclass
class BenchmarkConfig(_SegmentingConfig):
    """``spar eval``: mIoU on a segmentation benchmark. Fields left at ``None`` take the paper's protocol default for
    the dataset/backbone."""

    dataset: DatasetName = "voc21"
    data_root: str = ""
    split: str = "val"
    # protocol (None = paper default)
    short_side: int | None = None  # 672; Cityscapes 1024
    long_side: int | None = None  # 2048
    prob_thd: float | None = None  # 0.1 Context60 and VOC21 with a CLIP backbone; else 0
    area_thd: float | None = None  # 0.1 VOC21 with a CLIP backbone; else 0
    mode: Mode = "single"
    stride: int = 0  # 0 = the paper's teacher stride, 24 px at every crop
    # distribution
    workers: int = 0  # >0: split the images across this many Ray tasks
    ray_address: str = ""
    gpus_per_worker: float = 0.0  # 0: one GPU per task when the cluster has GPUs (unless device=cpu)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_at_least(self, ("short_side", "long_side", "stride", "workers"), 0)
        for k in ("prob_thd", "area_thd"):
            v = getattr(self, k)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ConfigError(f"{k} must be in [0, 1], got {v}")


@dataclass
class FidelityConfig(_SegmentingConfig):
    """``spar eval --fidelity``: labels-free report on held-out images against their cached teacher features."""

    images: str = ""  # held-out image set
    teacher_cache: str = ""
    classes: str = ""  # class list (default: Context59's names)


@dataclass
class SpeedConfig(ReportConfig):
    """``spar eval --speed``: single pass vs sliding window timings (and, with ``images``, quality vs cost)."""

    images: str = ""  # adds the quality-vs-cost curve on these images
    resolutions: tuple[int, ...] = ()  # default: 2x, 3x, 4x the native size
    strides: tuple[int, ...] = PAPER_STRIDES  # pixels; those larger than the crop are left out
    repeats: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_at_least(self, ("repeats",), 1)
        if any(r <= 0 for r in self.resolutions) or any(s <= 0 for s in self.strides):
            raise ConfigError("resolutions and strides must be positive")


@dataclass
class EvalConfig(BenchmarkConfig, FidelityConfig, SpeedConfig):
    """The flat form of ``spar eval``'s flags and of a recipe's ``[eval]`` section: every report's fields and the
    choice between them; :meth:`report` is the config of the chosen report."""

    fidelity: bool = False
    speed: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fidelity and self.speed:
            raise ConfigError("choose one of --fidelity and --speed")

    def report(self) -> BenchmarkConfig | FidelityConfig | SpeedConfig:
        """The chosen report's config; a field set here that the report does not read is refused."""
        cls = FidelityConfig if self.fidelity else SpeedConfig if self.speed else BenchmarkConfig
        own = {f.name for f in fields(cls)}
        stray = [
            f.name
            for f in fields(self)
            if f.name not in own | {"fidelity", "speed"} and getattr(self, f.name) != f.default
        ]
        if stray:
            chosen = "" if cls is BenchmarkConfig else f" (chosen by {cls().kind()} = true)"
            raise ConfigError(f"eval: {', '.join(stray)} does not apply to the {cls().kind()} report{chosen}")
        return cls(**{k: getattr(self, k) for k in own})


@dataclass
class InferenceConfig:
    """What ``spar segment`` and ``spar embed`` share: the model, its input size and how its features are read."""

    checkpoint: str = ""  # a student checkpoint, or
    backbone: str = ""  # a named backbone (single pass; with mode=sliding the teacher)
    pretrained: str = ""
    seed: int = 0  # seed of random weights
    out: str = ""
    short_side: int = 0  # 0 = keep the image's scale (snapped to the patch size)
    long_side: int = 2048
    mode: Mode = "single"
    crop: int = 0  # 0 = backbone's native size
    stride: int = 0  # 0 = 24 px (the paper's teacher stride at every crop)
    window_batch: int = 32
    precision: Precision = "fp32"
    device: str = "auto"

    def __post_init__(self) -> None:
        _check_at_least(self, ("short_side", "long_side", "crop", "stride"), 0)
        _check_at_least(self, ("window_batch",), 1)


@dataclass
class SegmentConfig(InferenceConfig):
    """``spar segment``: open-vocabulary segmentation of photos."""

    out: str = "segment-out"
    short_side: int = 672  # 0 = keep the image's scale
    classes: str = ""
    classes_file: str = ""
    logit_scale: float = 40.0
    prob_thd: float = 0.0
    area_thd: float = 0.0
    templates: Templates = "imagenet"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")


@dataclass
class EmbedConfig(InferenceConfig):
    """``spar embed``: dense features of photos as .npy plus shape metadata."""

    out: str = "embed-out"
    dtype: Literal["float32", "float16"] = "float32"
