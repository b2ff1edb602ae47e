"""scikit-image's bundled sample photographs (no download), as RGB arrays."""

from __future__ import annotations

import numpy as np


def sample_photo_rgb(name: str) -> np.ndarray:
    """A scikit-image sample photo as (H, W, 3) uint8: grayscale and binary ones expanded, alpha dropped."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))
