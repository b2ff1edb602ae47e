"""Readers for the open-vocabulary segmentation benchmarks, in their standard on-disk layouts.

No mmseg/mmcv: each reader lists (image, label) pairs from the layout and converts the label map to the
benchmark's class indices, with 255 as the ignore index.

* ``voc21`` / ``voc20``: PASCAL VOC 2012 ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}`` and
  ``ImageSets/Segmentation/<split>.txt``. Labels are palette PNGs (0 = background, 1..20, 255 = border).
  VOC20 drops the background: 0 -> 255, the rest shifted down by one.
* ``context60`` / ``context59``: PASCAL Context as prepared by mmseg's tools,
  ``VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext}`` and ``ImageSets/SegmentationContext/<split>.txt``;
  labels 0..59 with 0 = background. Context59: 0 -> 255, the rest shifted down by one.
* ``cityscapes``: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
  ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 ignore).
* ``ade20k``: ``ADEChallengeData2016/{images,annotations}/<validation|training>/``; 0 -> 255, others minus 1.

Label values outside the class range (after the mapping) are counted, reported and treated as ignore.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.common.errors import UserError
from pipeline.data.config import CLASS_SETS, DATASETS, DEFAULT_CLASS_SET

IGNORE_INDEX = 255


class DatasetError(UserError):
    """A benchmark dataset is missing, incomplete or malformed."""


class ClassNamesError(UserError):
    """A class-name list is empty, has duplicates or cannot be read."""


@dataclass(frozen=True)
class Sample:
    """One (image, label) pair of a benchmark; ``key`` is a stable, path-free name."""

    key: str
    image: Path
    label: Path


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a benchmark."""

    name: str
    num_classes: int
    classes_file: str  # file name in spar_core/data/<class set>/
    has_background: bool  # class 0 is a background/stuff class (prob_thd maps to it)
    reduce_zero: bool  # raw 0 -> ignore, others minus 1


INFOS: dict[str, DatasetInfo] = {
    "voc21": DatasetInfo("voc21", 21, "voc21.txt", True, False),
    "voc20": DatasetInfo("voc20", 20, "voc20.txt", False, True),
    "context60": DatasetInfo("context60", 60, "context60.txt", True, False),
    "context59": DatasetInfo("context59", 59, "context59.txt", False, True),
    "cityscapes": DatasetInfo("cityscapes", 19, "cityscapes.txt", False, False),
    "ade20k": DatasetInfo("ade20k", 150, "ade20k.txt", False, True),
}


@dataclass
class SegDataset:
    """A benchmark split: a list of samples plus the label conversion.

    ``load(i)`` returns ``(image (H, W, 3) uint8, label (H, W) uint8)`` with labels in
    ``[0, num_classes) ∪ {255}``. Out-of-range raw values are counted in ``out_of_range`` (per sample key).
    """

    info: DatasetInfo
    root: Path
    split: str
    samples: list[Sample]
    out_of_range: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, i: int) -> np.ndarray:
        """The i-th image as (H, W, 3) uint8 RGB."""
        return read_rgb(self.samples[i].image)

    def load_label(self, i: int) -> np.ndarray:
        """The i-th label map as (H, W) uint8 class indices with 255 = ignore."""
        s = self.samples[i]
        raw = read_index_map(s.label)
        label, bad = convert_label(raw, self.info)
        if bad:
            self.out_of_range[s.key] = bad
        return label

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image and label of sample i; raises DatasetError when their sizes differ."""
        img, label = self.load_image(i), self.load_label(i)
        if img.shape[:2] != label.shape:
            raise DatasetError(
                f"{self.samples[i].label}: label size {label.shape} differs from image size "
                f"{img.shape[:2]} ({self.samples[i].image})"
            )
        return img, label


# ---------------------------------------------------------------------------------------------- reading


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB; unreadable files raise DatasetError naming the path."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as e:
        raise DatasetError(f"image file not found: {path}") from e
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def read_index_map(path: Path) -> np.ndarray:
    """Read a label PNG as an (H, W) integer index map.

    Palette ('P') and grayscale ('L', 'I', 'I;16') images give their stored indices; colour images are
    rejected (a colour-coded label map is not an index map).
    """
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA", "LA", "CMYK", "YCbCr"):
                raise DatasetError(
                    f"label {path} is a colour image (mode {im.mode}); expected a palette or grayscale index map"
                )
            arr = np.asarray(im)
    except FileNotFoundError as e:
        raise DatasetError(f"label file not found: {path}") from e
    except DatasetError:
        raise
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise DatasetError(f"cannot read label {path}: {e}") from e
    if arr.ndim != 2:
        raise DatasetError(f"label {path} has shape {arr.shape}; expected a 2-D index map")
    return arr.astype(np.int64)


def convert_label(raw: np.ndarray, info: DatasetInfo) -> tuple[np.ndarray, int]:
    """Map raw label values to class indices; returns (label uint8, number of out-of-range pixels).

    reduce_zero: 0 -> 255 and v -> v - 1 otherwise (255 stays 255). Values that land outside
    ``[0, num_classes)`` and are not 255 become 255 and are counted.
    """
    raw = raw.astype(np.int64)  # (H, W)
    ignore = raw == IGNORE_INDEX
    lab = raw.copy()
    if info.reduce_zero:
        ignore |= raw == 0
        lab = raw - 1
    bad = ~ignore & ((lab < 0) | (lab >= info.num_classes))
    lab[ignore | bad] = IGNORE_INDEX
    return lab.astype(np.uint8), int(bad.sum())


# ---------------------------------------------------------------------------------------------- layouts


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what}: folder not found: {path}")
    return path


def _find_root(root: Path, candidates: list[Path], marker: str, dataset: str) -> Path:
    """The first candidate holding ``marker`` (a sub-folder); error listing what was tried."""
    if not root.exists():
        raise DatasetError(f"{dataset}: data root not found: {root}")
    for c in candidates:
        if (c / marker).is_dir():
            return c
    tried = ", ".join(str(c / marker) for c in candidates)
    raise DatasetError(f"{dataset}: no '{marker}' folder under {root} (looked for {tried})")


def _read_split_list(path: Path, dataset: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{dataset}: split list not found: {path}")
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise DatasetError(f"{dataset}: split list {path} is empty")
    for n in names:
        if "/" in n or "\\" in n or n.startswith(".") or "\x00" in n:
            raise DatasetError(f"{dataset}: bad image id {n!r} in {path}")
    return names


def _check_exist(samples: list[Sample], dataset: str) -> None:
    for s in samples:
        if not s.image.is_file():
            raise DatasetError(f"{dataset}: image file not found: {s.image}")
        if not s.label.is_file():
            raise DatasetError(f"{dataset}: label file not found: {s.label}")


def _voc_like(
    root: Path, info: DatasetInfo, split: str, year: str, label_dir: str, list_dir: str
) -> SegDataset:
    base = _find_root(
        root, [root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"], "JPEGImages", info.name
    )
    img_dir = _require_dir(base / "JPEGImages", info.name)
    lab_dir = _require_dir(base / label_dir, info.name)
    ids = _read_split_list(base / "ImageSets" / list_dir / f"{split}.txt", info.name)
    samples = [Sample(i, img_dir / f"{i}.jpg", lab_dir / f"{i}.png") for i in ids]
    _check_exist(samples, info.name)
    return SegDataset(info, base, split, samples)


def _cityscapes(root: Path, info: DatasetInfo, split: str) -> SegDataset:
    base = _find_root(root, [root, root / "cityscapes"], "leftImg8bit", info.name)
    img_root = _require_dir(base / "leftImg8bit" / split, info.name)
    lab_root = _require_dir(base / "gtFine" / split, info.name)
    samples = []
    for img in sorted(img_root.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        lab = lab_root / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        if not lab.is_file():
            raise DatasetError(
                f"cityscapes: label file not found: {lab} (create the labelTrainIds maps with "
                "cityscapesscripts' createTrainIdLabelImgs)"
            )
        samples.append(Sample(stem, img, lab))
    if not samples:
        raise DatasetError(f"cityscapes: no *_leftImg8bit.png images under {img_root}/<city>/")
    return SegDataset(info, base, split, samples)


def _ade20k(root: Path, info: DatasetInfo, split: str) -> SegDataset:
    base = _find_root(root, [root, root / "ADEChallengeData2016"], "images", info.name)
    sub = {"val": "validation", "train": "training"}.get(split, split)
    img_dir = _require_dir(base / "images" / sub, info.name)
    lab_dir = _require_dir(base / "annotations" / sub, info.name)
    samples = [Sample(p.stem, p, lab_dir / f"{p.stem}.png") for p in sorted(img_dir.glob("*.jpg"))]
    if not samples:
        raise DatasetError(f"ade20k: no .jpg images in {img_dir}")
    _check_exist(samples, info.name)
    return SegDataset(info, base, split, samples)


def open_dataset(name: str, root: str | Path, split: str = "val") -> SegDataset:
    """Open benchmark ``name`` (one of DATASETS) from its standard layout under ``root``.

    ``root`` may be the dataset folder itself (e.g. ``VOCdevkit/VOC2012``) or a parent holding it.
    Missing folders, split lists or files raise DatasetError naming the path.
    """
    if name not in INFOS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise DatasetError(f"bad split name {split!r}")
    info, root = INFOS[name], Path(root).expanduser()
    if name in ("voc21", "voc20"):
        return _voc_like(root, info, split, "2012", "SegmentationClass", "Segmentation")
    if name in ("context60", "context59"):
        return _voc_like(root, info, split, "2010", "SegmentationClassContext", "SegmentationContext")
    if name == "cityscapes":
        return _cityscapes(root, info, split)
    return _ade20k(root, info, split)


# ---------------------------------------------------------------------------------------------- class names


def parse_class_text(text: str, source: str = "class list") -> list[list[str]]:
    """Parse class names: classes separated by newlines or ';', synonyms by ','; '#' lines are comments.

    Raises ClassNamesError (naming ``source``) for an empty list, an empty name, or a name used twice.
    """
    # imported here: spar_core.segment pulls in torch and open_clip, which reading benchmark files does not need
    from spar_core.segment import ClassListError, parse_classes

    try:
        return parse_classes(text)
    except ClassListError as e:
        raise ClassNamesError(f"{source}: {e}") from e


def read_class_file(path: str | Path) -> list[list[str]]:
    """Read a class-name file (one class per line, synonyms comma-separated)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ClassNamesError(f"class-name file not found: {p}")
    return parse_class_text(p.read_text(encoding="utf-8"), source=str(p))


def default_classes(dataset: str, class_set: str = DEFAULT_CLASS_SET) -> list[list[str]]:
    """A packaged class-name list of a benchmark: ``spar_core/data/<class_set>/<dataset>.txt``.

    ``paper`` (default) is the authors' list name for name (their CLIP and SigLIP2 configs share it);
    ``rich`` adds synonyms. Unknown dataset or set names raise a UserError listing the choices.
    """
    if dataset not in INFOS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if class_set not in CLASS_SETS:
        raise ClassNamesError(f"unknown class set {class_set!r}; choose one of {', '.join(CLASS_SETS)}")
    rel = f"{class_set}/{INFOS[dataset].classes_file}"
    text = resources.files("spar_core.data").joinpath(rel).read_text(encoding="utf-8")
    return parse_class_text(text, source=f"spar_core/data/{rel}")


def format_classes(classes: list[list[str]]) -> str:
    """A class list as text: one class a line, synonyms separated by ', ' (what ``spar classes`` prints)."""
    return "\n".join(", ".join(syn) for syn in classes)
