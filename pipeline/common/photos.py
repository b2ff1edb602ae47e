"""scikit-image's bundled sample photographs (no download): the named sets the demo, the benchmarks and the GPU
check use, as RGB arrays or as PNG files written into a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# The demo's and the pipeline's default training photos: colour, grayscale and RGBA ones (ingest converts all to RGB)
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
HELDOUT_PHOTOS = ("astronaut", "coffee", "chelsea")  # never trained on: the fidelity report's images

# `spar bench train`: its own small split (its recorded results in BENCHMARKS.md were measured on it)
BENCH_TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "camera",
    "horse",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
BENCH_HELDOUT_PHOTOS = ("coffee", "rocket")
# `spar bench cache`: the first n of these, ingested without augmentation
CACHE_BENCH_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "camera",
    "horse",
    "cat",
    "immunohistochemistry",
)


def sample_photo_rgb(name: str) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8: grayscale and binary ones expanded, alpha dropped."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def sample_photo_raw(name: str) -> np.ndarray | None:
    """A sample photo in its own mode (gray, RGB or RGBA uint8), or None when this scikit-image cannot load it
    offline or it is too small (< 32 px) to be a training image."""
    import skimage.data

    try:
        img = np.asarray(getattr(skimage.data, name)())
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - a photo that needs a download (or fails to load) is skipped
        return None
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim not in (2, 3) or min(img.shape[:2]) < 32:
        return None
    return img.astype(np.uint8) if img.dtype != np.uint8 else img


def write_photos(folder: Path, names: tuple[str, ...]) -> int:
    """Write sample photos as PNG files in their own mode (gray, RGB, RGBA); existing files are kept. Returns how
    many of ``names`` are in the folder afterwards (photos that cannot load are skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            img = sample_photo_raw(name)
            if img is None:
                continue
            Image.fromarray(img).save(path, compress_level=1)  # lossless either way; level 6 took ~3x longer
        n += 1
    return n


def sample_photo_files() -> list[Path]:
    """The image files bundled with scikit-image (sorted), as they are on disk."""
    import skimage.data

    d = Path(skimage.data.__file__).parent
    return sorted(p for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg"))


def offline_photos(names: tuple[str, ...]) -> tuple[str, ...]:
    """The sample photos among ``names`` that load without a download (an offline machine): those whose registry
    file is on disk, and the aliases of bundled files (no registry entry of that name)."""
    import skimage.data
    from skimage.data import _registry

    try:
        dirs = [
            Path(skimage.data.__file__).parent,
            Path(str(getattr(skimage.data, "data_dir", skimage.data.__file__))),
        ]
        keep = []
        for n in names:
            keys = [k for k in _registry.registry if Path(k).stem == n]
            if not keys or any((d / Path(k).name).exists() for k in keys for d in dirs):
                keep.append(n)
        return tuple(keep)
    except Exception:  # noqa: BLE001 - another scikit-image layout: try them all (failures are skipped)
        return names
