"""Step 2 of an image's path: source bytes -> training pixels. :func:`decode_source` validates, decodes, orients
and converts to RGB; :func:`sample_augmentation` draws the frozen augmentation (a pure function of the original
size, the config and ``(seed, key)``); :func:`apply_augmentation` resizes (as the reference's cv2), crops and flips;
:func:`process_image` chains them and describes the sample (its ``<key>.json`` in the shard).

No I/O here: a shard task (:mod:`pipeline.data.shards`) reads the bytes and stores the result.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline.data.config import IngestConfig
from pipeline.data.imageset import Augmentation, pixel_sha256
from pipeline.data.resize import resize_linear
from pipeline.data.sources import Rejected, error_text

__all__ = [
    "sample_augmentation",
    "augmentation_for",
    "apply_augmentation",
    "to_rgb",
    "decode_source",
    "process_image",
]

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})


# --------------------------------------------------------------------------------------------------------------
# augmentation: pure functions of (original size, config, seed, key)


def key_rng(seed: int, key: str) -> np.random.Generator:
    """numpy Generator seeded from sha256 of (seed, key): independent of order, process and machine."""
    digest = hashlib.sha256(f"spar-ingest:{int(seed)}:{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _scaled(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, round(h * s)), max(1, round(w * s))


def _plain(height: int, width: int, cfg: IngestConfig) -> Augmentation:
    """No augmentation: only the ``max_side`` cap (downscale) and the centred snap to ``multiple``."""
    m = cfg.multiple
    s = 1.0
    if cfg.max_side and max(height, width) > cfg.max_side:
        s = cfg.max_side / max(height, width)
    rh, rw = _scaled(height, width, s)
    if cfg.max_side:
        rh, rw = min(rh, cfg.max_side), min(rw, cfg.max_side)
    ch, cw = (rh // m) * m, (rw // m) * m
    crop = [(rh - ch) // 2, (rw - cw) // 2, ch, cw]
    return {"mode": "plain", "t": 1.0, "resize": [rh, rw], "crop": crop, "flip": False}


def sample_augmentation(height: int, width: int, cfg: IngestConfig, rng: np.random.Generator) -> Augmentation:
    """Draw augmentation parameters for an ``height × width`` image (no I/O).

    Returns a JSON-able dict: ``t`` (scale draw), ``resize`` [h, w] (size after resizing), ``crop``
    [top, left, h, w] (box in the resized image; the output size is (h, w)), ``mode`` ("upscale", "full",
    "crop", or "plain" without augmentation) and ``flip``. Every draw is made in a fixed order regardless of
    branch so that parameters stay stable when one branch's probability changes.
    """
    u = rng.random(7)  # t, crop?, crop h, crop w, top, left, flip
    if not cfg.augment:
        return _plain(height, width, cfg)
    m = cfg.multiple
    t = cfg.scale_min + (cfg.scale_max - cfg.scale_min) * float(u[0])
    long_side, short_side = max(height, width), min(height, width)
    s = min(cfg.target_long * t / long_side, cfg.target_short * t / short_side)
    if cfg.max_side:
        s = min(s, cfg.max_side / long_side)
    rh, rw = _scaled(height, width, s)
    if min(rh, rw) < cfg.min_short:  # upscale the short side to the floor
        s = cfg.min_short / short_side
        rh, rw = _scaled(height, width, s)
        if height <= width:
            rh = cfg.min_short
        else:
            rw = cfg.min_short
        mode, ch, cw = "upscale", rh, rw
    elif u[1] >= cfg.crop_prob:
        mode, ch, cw = "full", rh, rw
    else:
        mode = "crop"
        ch = max(cfg.min_short, math.floor(rh * (cfg.crop_min_frac + (1 - cfg.crop_min_frac) * float(u[2]))))
        cw = max(cfg.min_short, math.floor(rw * (cfg.crop_min_frac + (1 - cfg.crop_min_frac) * float(u[3]))))
        ch, cw = min(ch, rh), min(cw, rw)
    long_cap = cfg.max_side or cfg.target_long
    ch, cw = min(ch, max(long_cap, cfg.min_short)), min(cw, max(long_cap, cfg.min_short))
    ch, cw = (ch // m) * m, (cw // m) * m
    if mode == "crop":
        top, left = math.floor((rh - ch) * float(u[4]) + 0.5), math.floor((rw - cw) * float(u[5]) + 0.5)
        top, left = min(top, rh - ch), min(left, rw - cw)
    else:  # snap/cap remainder removed evenly
        top, left = (rh - ch) // 2, (rw - cw) // 2
    return {
        "mode": mode,
        "t": round(t, 6),
        "resize": [rh, rw],
        "crop": [top, left, ch, cw],
        "flip": bool(u[6] < cfg.flip_prob),
    }


def augmentation_for(key: str, height: int, width: int, cfg: IngestConfig) -> Augmentation:
    """Augmentation parameters for image ``key`` of size ``height × width`` under ``cfg`` (deterministic)."""
    return sample_augmentation(height, width, cfg, key_rng(cfg.seed, key))


def apply_augmentation(img: Image.Image, params: Augmentation) -> np.ndarray:
    """Resize, crop and flip an RGB PIL image as ``params`` says → (h, w, 3) uint8.

    The resize is the reference's cv2 ``INTER_LINEAR`` (bilinear, half-pixel centres, no antialiasing:
    :func:`pipeline.data.resize.resize_linear`), as its mmcv ``RandomResize`` and ``RandomCropOrFullImage``."""
    rh, rw = params["resize"]
    top, left, ch, cw = params["crop"]
    arr = resize_linear(np.asarray(img, dtype=np.uint8), (rh, rw))  # (rh, rw, 3)
    arr = arr[top : top + ch, left : left + cw]
    if params["flip"]:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)  # (h, w, 3) uint8


# --------------------------------------------------------------------------------------------------------------
# decoding and validation


def to_rgb(img: Image.Image, background: Sequence[int]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit/int/float grey scaled to 8 bit, alpha composited on ``background``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        elif mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "PA", "La", "RGBa") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (*[int(c) for c in background], 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_checked(data: bytes, cfg: IngestConfig) -> Image.Image:
    """The source opened lazily (header only), of an accepted format and within ``max_pixels``; else Rejected."""
    if not data:
        raise Rejected("empty_file: zero bytes")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # PIL's own guard (errors at 2x) agrees with ours (checked below)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(f"decompression_bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected("not_an_image: no image format recognised") from None
    except Exception as e:
        raise Rejected(f"not_an_image: {error_text(e)}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise Rejected(f"unsupported_format: {img.format}")
    w, h = img.size
    if w < 1 or h < 1:
        raise Rejected(f"corrupt: empty image size {w}x{h}")
    if w * h > cfg.max_pixels:
        raise Rejected(f"decompression_bomb: {w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
    return img


def decode_source(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Validate and decode source bytes → (oriented RGB image, info); raise Rejected with a reason otherwise.

    ``info``: the source's ``format``, ``mode``, ``original_size`` [h, w] and ``oriented_size`` [h, w]."""
    img = _open_checked(data, cfg)
    info: dict[str, Any] = {"format": img.format, "mode": img.mode, "original_size": [img.height, img.width]}
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = to_rgb(img, cfg.background)
    except Exception as e:  # truncated data, bad codec stream, ...
        raise Rejected(f"corrupt: {error_text(e)}") from None
    info["oriented_size"] = [img.height, img.width]
    return img, info


def process_image(key: str, source: str, data: bytes, cfg: IngestConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Source bytes → (augmented (h, w, 3) uint8 pixels, the sample's metadata). Raises Rejected.

    The metadata (stored as ``<key>.json`` beside ``<key>.png``): key, source, source_sha256, the decode ``info``,
    size [h, w], augmentation and pixel_sha256."""
    img, info = decode_source(data, cfg)
    params = augmentation_for(key, img.height, img.width, cfg)
    if params["crop"][2] < cfg.multiple or params["crop"][3] < cfg.multiple:
        raise Rejected(f"too_small: {img.height}x{img.width} leaves nothing after snapping to {cfg.multiple}")
    rh, rw = params["resize"]
    if rh * rw > cfg.max_pixels:  # extreme aspect ratios: the short-side floor would blow up the long side
        raise Rejected(f"extreme_aspect: {img.height}x{img.width} would be resized to {rh}x{rw} > max_pixels")
    arr = apply_augmentation(img, params)  # (h, w, 3) uint8
    meta = {
        "key": key,
        "source": source,
        "source_sha256": hashlib.sha256(data).hexdigest(),
        **info,
        "size": [int(arr.shape[0]), int(arr.shape[1])],
        "augmentation": params,
        "pixel_sha256": pixel_sha256(arr),
    }
    return arr, meta
