"""What the user chooses for ingest: :class:`IngestConfig` (section ``[ingest]`` of a recipe) and
:class:`IngestError`, the error of a run that cannot start or finish.

Light on purpose (dataclasses and the config layer only): ``spar ingest --help`` builds its flags from here without
importing the image, Ray or Arrow code that does the work.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.config import ConfigError
from pipeline.common.errors import UserError

__all__ = ["IngestConfig", "IngestError"]


class IngestError(UserError):
    """Ingest cannot run: bad source, bad output location or bad configuration."""


@dataclass
class IngestConfig:
    """Ingest stage configuration (section ``[ingest]`` of a recipe).

    Augmentation (the paper's training images): resize to fit ``(target_long·t, target_short·t)`` with ``t ~ U(scale_min,
    scale_max)`` keeping the aspect ratio; if the short side is < ``min_short`` upscale it to ``min_short``; else
    with prob ``1 - crop_prob`` keep the full image, otherwise crop each side to ``U(crop_min_frac·L, L)`` (at
    least ``min_short``); the long side is cropped to ``max_side`` (or ``target_long`` when 0) should the
    short-side floor push it past that; snap both sides down to a multiple of ``multiple`` (centred crop of the
    remainder); flip horizontally with prob ``flip_prob``. ``augment=False``: no resize, crop or flip, only the
    ``max_side`` cap (downscale) and the snap, for evaluation sets.

    ``select``: which members of tar archives to take ("" = every image member; "paper" = the authors' SA-1B
    selection, see :mod:`pipeline.data.archives`). It decides which inputs exist, not their pixels.
    """

    seed: int = 0
    shard_size: int = 256
    augment: bool = True
    target_long: int = 2048
    target_short: int = 1024
    scale_min: float = 0.5
    scale_max: float = 1.0
    min_short: int = 512
    crop_prob: float = 0.5
    crop_min_frac: float = 0.4
    flip_prob: float = 0.5
    multiple: int = 16
    max_pixels: int = 89_478_485  # decompression-bomb limit on the decoded source (PIL's default)
    max_side: int = 0  # 0 = no cap; otherwise the output's long side is at most this
    # RGBA / transparent palette images are composited on it
    background: tuple[int, int, int] = (255, 255, 255)
    png_compress_level: int = 1  # deterministic zlib level (1 = fast, larger files)
    select: str = ""  # "" = all image members of tar archives; "paper" = the authors' SA-1B selection

    def __post_init__(self) -> None:
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]
        problems = self._problems()
        if problems:
            raise ConfigError("ingest config: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """Every value out of range, as one phrase each (empty when the config is usable)."""
        problems = []
        if self.shard_size < 1:
            problems.append(f"shard_size must be >= 1 (got {self.shard_size})")
        if self.multiple < 1:
            problems.append(f"multiple must be >= 1 (got {self.multiple})")
        if self.min_short < self.multiple or self.min_short % self.multiple:
            problems.append(
                f"min_short must be a positive multiple of multiple={self.multiple} (got {self.min_short})"
            )
        if not 0 < self.scale_min <= self.scale_max:
            problems.append(f"need 0 < scale_min <= scale_max (got {self.scale_min}, {self.scale_max})")
        if not 0 < self.target_short <= self.target_long:
            problems.append(
                f"need 0 < target_short <= target_long (got {self.target_short}, {self.target_long})"
            )
        for name in ("crop_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1] (got {getattr(self, name)})")
        if not 0.0 < self.crop_min_frac <= 1.0:
            problems.append(f"crop_min_frac must be in (0, 1] (got {self.crop_min_frac})")
        if self.max_pixels < 1:
            problems.append(f"max_pixels must be >= 1 (got {self.max_pixels})")
        if self.max_side < 0 or (
            self.max_side and self.max_side < max(self.multiple, self.min_short * self.augment)
        ):
            problems.append(f"max_side must be 0 (no cap) or >= min_short and multiple (got {self.max_side})")
        if len(self.background) != 3 or not all(0 <= c <= 255 for c in self.background):
            problems.append(f"background must be three values in 0..255 (got {self.background})")
        if self.select not in ("", "paper"):
            problems.append(f"select must be '' (all) or 'paper' (got {self.select!r})")
        if not 0 <= self.png_compress_level <= 9:
            problems.append(f"png_compress_level must be in 0..9 (got {self.png_compress_level})")
        return problems


# The segmentation benchmarks and their class lists (readers: pipeline.data.datasets); here so that argument
# definitions can name them without loading the readers.
DATASETS = ("voc21", "voc20", "context60", "context59", "cityscapes", "ade20k")
CLASS_SETS: dict[str, str] = {
    "paper": "the authors' lists (configs/siglip2/cls_*.txt at 0f63ff2, the SCLIP lists; default)",
    "rich": "more synonyms per class (e.g. 'aeroplane,airplane'; 'traffic light')",
}
DEFAULT_CLASS_SET = "paper"
