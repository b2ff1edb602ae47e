"""Ingest raw images into frozen, augmented webdataset shards (DESIGN §2 "Training images", §4 "Image set").

``ingest(src, out, cfg)`` lists the sources on the driver (sorted), derives sanitised unique keys, splits them
into shards of ``cfg.shard_size`` up front (so shard contents never depend on timing), and runs one Ray task per
missing shard. Each task decodes, validates, orients, converts to RGB, augments with randomness drawn from
``(seed, key)`` only, and writes ``shard-XXXXXX.tar.<token>.tmp`` with fixed tar metadata and deterministic PNG bytes;
it then writes the sidecar ``shard-XXXXXX.json`` and renames the tar into place. Re-running skips every shard
whose tar and sidecar are consistent with the current plan, so an interrupted run completes only what is missing.
Bad inputs are never fatal: they are listed with a reason in ``rejected.parquet`` and counted in the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import tarfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageOps

from pipeline.common.config import ConfigError, load_config
from pipeline.data.imageset import (
    FORMAT_VERSION,
    IMAGES_DIR,
    IMAGESET_NAME,
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    REJECTED_NAME,
    REJECTED_SCHEMA,
    ImageRecord,
    UserError,
    canonical_json,
    manifest_fingerprint,
    pixel_sha256,
    shard_name,
)
from pipeline.data.resize import resize_linear

# Ray reads this when it is first imported (ray_constants), so it must be set before any `import ray`;
# `uv run` would otherwise make Ray rebuild the project environment for its workers.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF"})
LIST_EXTENSIONS = (".txt", ".lst", ".list")
MAX_KEY_LEN = 96
_GLOB_CHARS = re.compile(r"[*?\[]")


class IngestError(UserError):
    """Ingest cannot run: bad source, bad output location or bad configuration."""


@dataclass
class IngestConfig:
    """Ingest stage configuration (section ``[ingest]`` of a recipe).

    Augmentation (DESIGN §2): resize to fit ``(target_long·t, target_short·t)`` with ``t ~ U(scale_min,
    scale_max)`` keeping the aspect ratio; if the short side is < ``min_short`` upscale it to ``min_short``; else
    with prob ``1 - crop_prob`` keep the full image, otherwise crop each side to ``U(crop_min_frac·L, L)`` (at
    least ``min_short``); the long side is cropped to ``max_side`` (or ``target_long`` when 0) should the
    short-side floor push it past that; snap both sides down to a multiple of ``multiple`` (centred crop of the
    remainder); flip horizontally with prob ``flip_prob``. ``augment=False``: no resize, crop or flip, only the
    ``max_side`` cap (downscale) and the snap, for evaluation sets.
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
    background: tuple[int, int, int] = (
        255,
        255,
        255,
    )  # RGBA / transparent palette images are composited on it
    png_compress_level: int = 1  # deterministic zlib level (1 = fast, larger files)

    def __post_init__(self) -> None:
        self.background = tuple(int(c) for c in self.background)  # type: ignore[assignment]
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
        if not 0 <= self.png_compress_level <= 9:
            problems.append(f"png_compress_level must be in 0..9 (got {self.png_compress_level})")
        if problems:
            raise ConfigError("ingest config: " + "; ".join(problems))


@dataclass
class IngestSummary:
    """What an ingest run did."""

    root: str
    images_dir: str
    fingerprint: str
    num_inputs: int
    accepted: int
    rejected: int
    num_shards: int
    shards_written: int
    shards_skipped: int
    seconds: float
    rejected_reasons: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        """Inputs per second over the shards this run wrote (Ray start excluded, worker start-up included)."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    processed: int = 0

    @property
    def written_shards(self) -> int:
        """Alias of ``shards_written``."""
        return self.shards_written

    @property
    def skipped_shards(self) -> int:
        """Alias of ``shards_skipped`` (already complete from an earlier run)."""
        return self.shards_skipped

    def line(self) -> str:
        """One-line human summary."""
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected_reasons.items()))
        return (
            f"ingest: {self.num_inputs} inputs -> {self.accepted} accepted, {self.rejected} rejected"
            f"{' (' + reasons + ')' if reasons else ''}; {self.num_shards} shards "
            f"({self.shards_written} written, {self.shards_skipped} already complete); "
            f"{self.images_per_s:.1f} images/s; fingerprint {self.fingerprint[:16]}; {self.images_dir}"
        )


# --------------------------------------------------------------------------------------------------------------
# augmentation: pure functions of (original size, config, seed, key)


def key_rng(seed: int, key: str) -> np.random.Generator:
    """numpy Generator seeded from sha256 of (seed, key): independent of order, process and machine."""
    digest = hashlib.sha256(f"spar-ingest:{int(seed)}:{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def _scaled(h: int, w: int, s: float) -> tuple[int, int]:
    return max(1, round(h * s)), max(1, round(w * s))


def sample_augmentation(
    height: int, width: int, cfg: IngestConfig, rng: np.random.Generator
) -> dict[str, Any]:
    """Draw augmentation parameters for an ``height × width`` image (no I/O).

    Returns a JSON-able dict: ``t`` (scale draw), ``resize`` [h, w] (size after resizing), ``crop``
    [top, left, h, w] (box in the resized image; the output size is (h, w)), ``mode`` ("upscale", "full",
    "crop", or "plain" without augmentation) and ``flip``. Every draw is made in a fixed order regardless of
    branch so that parameters stay stable when one branch's probability changes.
    """
    u = rng.random(7)  # t, crop?, crop h, crop w, top, left, flip
    m = cfg.multiple
    if not cfg.augment:
        s = 1.0
        if cfg.max_side and max(height, width) > cfg.max_side:
            s = cfg.max_side / max(height, width)
        rh, rw = _scaled(height, width, s)
        if cfg.max_side:
            rh, rw = min(rh, cfg.max_side), min(rw, cfg.max_side)
        ch, cw = (rh // m) * m, (rw // m) * m
        return {
            "mode": "plain",
            "t": 1.0,
            "resize": [rh, rw],
            "crop": [(rh - ch) // 2, (rw - cw) // 2, ch, cw],
            "flip": False,
        }
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


def augmentation_for(key: str, height: int, width: int, cfg: IngestConfig) -> dict[str, Any]:
    """Augmentation parameters for image ``key`` of size ``height × width`` under ``cfg`` (deterministic)."""
    return sample_augmentation(height, width, cfg, key_rng(cfg.seed, key))


def apply_augmentation(img: Image.Image, params: dict[str, Any]) -> np.ndarray:
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


class Rejected(Exception):
    """An input that cannot become a training image; ``reason`` is stored in rejected.parquet."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image, background: Sequence[int]) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16-bit/int/float grey scaled to 8 bit, alpha composited on ``background``."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        if mode != "I" or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 0..65535 -> 0..255
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("LA", "PA", "La", "RGBa") or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (*[int(c) for c in background], 255))
        img = Image.alpha_composite(bg, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_source(data: bytes, cfg: IngestConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Validate and decode source bytes → (oriented RGB image, info); raise Rejected with a reason otherwise."""
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
        raise Rejected(f"not_an_image: {_msg(e)}") from None
    if img.format not in ACCEPTED_FORMATS:
        raise Rejected(f"unsupported_format: {img.format}")
    w, h = img.size
    if w < 1 or h < 1:
        raise Rejected(f"corrupt: empty image size {w}x{h}")
    if w * h > cfg.max_pixels:
        raise Rejected(f"decompression_bomb: {w}x{h} = {w * h} pixels > max_pixels {cfg.max_pixels}")
    info = {"format": img.format, "mode": img.mode, "original_size": [h, w]}
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
        img = to_rgb(img, cfg.background)
    except Exception as e:  # truncated data, bad codec stream, ...
        raise Rejected(f"corrupt: {_msg(e)}") from None
    info["oriented_size"] = [img.height, img.width]
    return img, info


def _msg(e: BaseException) -> str:
    """Exception text without memory addresses (rejected.parquet must be reproducible)."""
    return f"{type(e).__name__}: " + re.sub(r" at 0x[0-9a-fA-F]+", "", str(e))


def process_image(key: str, source: str, data: bytes, cfg: IngestConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Source bytes → (augmented (h, w, 3) uint8 pixels, sample metadata). Raises Rejected."""
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


def encode_png(arr: np.ndarray, level: int) -> bytes:
    """Deterministic lossless PNG of an (h, w, 3) uint8 array (no timestamps or text chunks).

    Written directly: every row gets the PNG "Up" filter (the difference to the row above, vectorised) and the
    stream is deflated by ISA-L (``isal``) for ``level`` 0..3 (~6x faster than zlib at the same size), zlib
    otherwise or when ``isal`` is not installed. Any PNG reader decodes it; same input and library, same bytes.
    """
    h, w, c = arr.shape
    if c != 3 or arr.dtype != np.uint8:
        raise ValueError(f"encode_png needs an (h, w, 3) uint8 array, got {arr.shape} {arr.dtype}")
    rows = np.ascontiguousarray(arr).reshape(h, w * 3)  # (h, 3w)
    filtered = np.empty((h, w * 3 + 1), np.uint8)  # (h, 1 + 3w): filter type byte, then the row
    filtered[:, 0] = 2  # Up
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps mod 256, as PNG specifies
    return _png_bytes(w, h, _deflate(filtered.tobytes(), level))


def _deflate(data: bytes, level: int) -> bytes:
    """zlib-format deflate stream of ``data`` (ISA-L for levels 0..3 when available)."""
    import zlib  # imported here: this edit stays inside the encoder (pipeline/data/ingest.py has other editors)

    if level <= 3:
        try:
            from isal import isal_zlib

            return isal_zlib.compress(data, level)
        except ImportError:  # pragma: no cover - isal is a dependency; zlib is the portable fallback
            pass
    return zlib.compress(data, level)


def _png_bytes(w: int, h: int, idat: bytes) -> bytes:
    """A minimal 8-bit RGB PNG: signature, IHDR, one IDAT, IEND."""
    import struct
    import zlib

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolour, deflate, adaptive, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------------------------
# sources and keys


def _is_url(s: str) -> bool:
    return "://" in s


def list_sources(src: str) -> list[tuple[str, str]]:
    """Expand SRC into sorted (source, relative name) pairs.

    SRC is a folder (recursive; image extensions only), a single image, a text file of paths (one a line,
    ``#`` comments; relative paths are relative to the list's folder), or a glob; local or any fsspec URL.
    """
    fs, path = fsspec.core.url_to_fs(src)
    unstrip = (lambda p: fs.unstrip_protocol(p)) if _is_url(src) else (lambda p: p)
    if _GLOB_CHARS.search(path):
        base = _GLOB_CHARS.split(path, 1)[0].rsplit("/", 1)[0]
        found = sorted(p for p in fs.glob(path) if fs.isfile(p))
        if not found:
            raise IngestError(f"{src}: glob matches no files")
        return [(unstrip(p), _rel(p, base)) for p in found]
    if not fs.exists(path):
        raise IngestError(f"{src}: no such file or folder")
    if fs.isdir(path):
        found = sorted(p for p in fs.find(path) if p.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            raise IngestError(f"{src}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        return [(unstrip(p), _rel(p, path)) for p in found]
    if path.lower().endswith(IMAGE_EXTENSIONS):
        return [(unstrip(path), path.rsplit("/", 1)[-1])]
    return _list_file(fs, path, src, unstrip)


def _list_file(fs: Any, path: str, src: str, unstrip: Any) -> list[tuple[str, str]]:
    try:
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IngestError(f"{src}: not a readable UTF-8 list of image paths ({e})") from e
    base = path.rsplit("/", 1)[0] if "/" in path else ""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _is_url(line):
            lfs, lpath = fsspec.core.url_to_fs(line)
            out[line] = lpath
            continue
        p = line if line.startswith("/") or not base else f"{base}/{line}"
        p = os.path.normpath(p) if not _is_url(src) else p
        out[unstrip(p)] = _rel(p, base) if base else p
    if not out:
        raise IngestError(f"{src}: list file names no paths")
    return sorted(out.items())


def _rel(p: str, base: str) -> str:
    base = base.rstrip("/")
    if base and p.startswith(base + "/"):
        return p[len(base) + 1 :]
    return p.lstrip("/")


def sanitize_key(rel: str) -> str:
    """Key from a relative source name: drop the extension, map anything outside ``[A-Za-z0-9_-]`` (separators,
    dots, ``..``) to ``_``, collapse runs, trim; long names are shortened with a hash. Never empty, never a path."""
    base = rel.replace("\\", "/")
    head, _, last = base.rpartition("/")
    stem = last.rsplit(".", 1)[0] if "." in last.lstrip(".") else last
    raw = f"{head}/{stem}" if head else stem
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", raw)
    key = re.sub(r"_+", "_", key).strip("_-") or "image"
    if len(key) > MAX_KEY_LEN:
        key = f"{key[: MAX_KEY_LEN - 17]}_{hashlib.sha256(rel.encode()).hexdigest()[:16]}"
    return key


def assign_keys(rels: Iterable[str]) -> list[str]:
    """Sanitised keys, unique in input order (later duplicates get ``-2``, ``-3``, …)."""
    used: set[str] = set()
    keys = []
    for rel in rels:
        base = sanitize_key(rel)
        key, n = base, 1
        while key in used:
            n += 1
            key = f"{base}-{n}"
        used.add(key)
        keys.append(key)
    return keys


# --------------------------------------------------------------------------------------------------------------
# shards


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, 0, 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


RESAMPLE = "cv2-inter-linear"  # part of every shard's plan: shards resized otherwise (bicubic) are rewritten


def _plan_digest(cfg_dict: dict[str, Any], shard: int, items: Sequence[tuple[str, str]]) -> str:
    plan = [FORMAT_VERSION, RESAMPLE, cfg_dict, shard, list(items)]
    return hashlib.sha256(canonical_json(plan).encode()).hexdigest()


def _file_sha256(fs: Any, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class ShardProgress:
    """Ray actor: images done per in-flight shard (set, not added, so a retried task does not double-count)."""

    def __init__(self) -> None:
        self.done: dict[int, int] = {}

    def set(self, shard: int, n: int) -> None:
        self.done[shard] = n

    def snapshot(self) -> dict[int, int]:
        return dict(self.done)


def write_shard(
    images_url: str,
    shard: int,
    items: list[tuple[str, str]],
    cfg_dict: dict[str, Any],
    plan: str,
    progress: Any = None,
) -> dict[str, Any]:
    """Write one shard (runs inside a Ray task). ``items``: (key, source) in shard order.

    Returns the sidecar dict: records (manifest rows), rejected [(source, reason)], tar sha256 and size.
    ``progress``: optional ShardProgress actor handle, told after every image.
    """
    cfg = IngestConfig(**{**cfg_dict, "background": tuple(cfg_dict["background"])})
    fs, images = fsspec.core.url_to_fs(images_url)
    name = shard_name(shard)
    # a unique temporary name per attempt: a retried task, or a straggler worker of a killed run, writing the same
    # shard never interleaves with this one; outputs are deterministic, so whichever rename lands last is right
    token = uuid.uuid4().hex[:12]
    tmp, final = f"{images}/{name}.{token}.tmp", f"{images}/{name}"
    side_final = f"{images}/{name[:-4]}.json"
    records: list[dict[str, Any]] = []
    rejected: list[list[str]] = []
    with fs.open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for n, (key, source) in enumerate(items):
            if progress is not None and n:
                progress.set.remote(shard, n)
            try:
                data = _read_source(source)
                arr, meta = process_image(key, source, data, cfg)
            except Rejected as r:
                rejected.append([source, r.reason])
                continue
            png = encode_png(arr, cfg.png_compress_level)
            js = canonical_json(meta).encode()
            tf.addfile(_tarinfo(f"{key}.json", len(js)), io.BytesIO(js))
            tf.addfile(_tarinfo(f"{key}.png", len(png)), io.BytesIO(png))
            rec = ImageRecord(key, shard, meta["size"][0], meta["size"][1], source, meta["pixel_sha256"],
                              meta["augmentation"])  # fmt: skip
            records.append(rec.manifest_row())
    sidecar = {
        "format_version": FORMAT_VERSION,
        "shard": shard,
        "plan_sha256": plan,
        "tar_sha256": _file_sha256(fs, tmp),
        "tar_bytes": int(fs.size(tmp)),
        "records": records,
        "rejected": rejected,
    }
    with fs.open(f"{side_final}.{token}.tmp", "wb") as f:
        f.write(canonical_json(sidecar).encode())
    _rename(fs, f"{side_final}.{token}.tmp", side_final)
    _rename(fs, tmp, final)  # the shard becomes visible only now, complete
    return sidecar


def _rename(fs: Any, src: str, dst: str) -> None:
    """Atomic replace on local disks (os.replace; never moves *into* a folder); fsspec's mv elsewhere."""
    if isinstance(fs, LocalFileSystem):
        os.replace(src, dst)
    else:
        fs.mv(src, dst)


def _read_source(source: str) -> bytes:
    try:
        with fsspec.open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing: no such file") from None
    except IsADirectoryError:
        raise Rejected("not_an_image: is a directory") from None
    except OSError as e:
        raise Rejected(f"unreadable: {_msg(e)}") from None


def load_complete_shard(
    fs: Any, images: str, shard: int, plan: str, items: Sequence[tuple[str, str]] = ()
) -> dict[str, Any] | None:
    """The sidecar of shard ``shard`` if its tar exists and matches it and the plan, else None.

    With ``items`` ((key, source) of the shard's plan) the sidecar must also account for every planned input
    exactly once, in order: accepted records and rejections together.
    """
    name = shard_name(shard)
    side = f"{images}/{name[:-4]}.json"
    if not (fs.exists(f"{images}/{name}") and fs.exists(side)):
        return None
    try:
        with fs.open(side, "rb") as f:
            sc = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if sc.get("plan_sha256") != plan or sc.get("format_version") != FORMAT_VERSION:
        return None
    if fs.size(f"{images}/{name}") != sc.get("tar_bytes"):
        return None
    if _file_sha256(fs, f"{images}/{name}") != sc.get("tar_sha256"):
        return None
    if items:
        accepted = {r.get("key"): r.get("source") for r in sc.get("records", [])}
        rejected = {x[0] for x in sc.get("rejected", [])}
        keys = [r.get("key") for r in sc.get("records", [])]
        if keys != [k for k, _ in items if k in accepted] or len(accepted) + len(rejected) != len(items):
            return None
        if any(
            accepted.get(k, src) != src or (k not in accepted and src not in rejected) for k, src in items
        ):
            return None
    return sc


# --------------------------------------------------------------------------------------------------------------
# driver


def _init_ray(workers: int | None) -> None:
    from pipeline.common.tasks import init_ray

    init_ray(num_cpus=workers)


def bar_disabled() -> bool:
    """True when tqdm bars are switched off by the environment (TQDM_DISABLE)."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def _cluster_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ingest(src: str, out: str, cfg: IngestConfig | None = None, workers: int | None = None,
           progress: bool = True) -> IngestSummary:  # fmt: skip
    """Ingest images from ``src`` into the image set ``<out>/images`` (see module docstring).

    ``workers``: how many shard tasks run at once (default: the Ray cluster's CPUs). Returns the summary;
    raises IngestError for an unusable source or output. Bad images never raise: they go to rejected.parquet.
    """
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    sources = list_sources(src)
    keys = assign_keys(rel for _, rel in sources)
    items = [(k, s) for k, (s, _) in zip(keys, sources, strict=True)]
    shards = [items[i : i + cfg.shard_size] for i in range(0, len(items), cfg.shard_size)]
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["background"] = list(cfg.background)
    plans = [_plan_digest(cfg_dict, i, sh) for i, sh in enumerate(shards)]

    fs, root = fsspec.core.url_to_fs(out)
    images = f"{root.rstrip('/')}/{IMAGES_DIR}"
    images_url = fs.unstrip_protocol(images) if _is_url(out) else images
    try:
        fs.makedirs(images, exist_ok=True)
    except OSError as e:
        raise IngestError(f"{out}: cannot create the output folder ({e})") from e
    if fs.exists(f"{images}/{IMAGESET_NAME}"):
        fs.rm(f"{images}/{IMAGESET_NAME}")  # the set is incomplete until this run finishes

    done: dict[int, dict[str, Any]] = {}
    for i, plan in enumerate(plans):
        sc = load_complete_shard(fs, images, i, plan, shards[i])
        if sc is not None:
            done[i] = sc
    todo = [i for i in range(len(shards)) if i not in done]
    work_s = 0.0
    if todo:
        _init_ray(workers)
        t_work = time.perf_counter()  # throughput excludes Ray start-up
        failed = _run_shard_tasks(images_url, shards, todo, cfg_dict, plans, done, workers, progress)
        work_s = time.perf_counter() - t_work
        if failed:
            first = min(failed)
            cause = getattr(failed[first], "cause", None) or failed[first]
            raise IngestError(
                f"ingest into {out}: shard(s) {sorted(failed)} failed ({type(cause).__name__}: {cause}); "
                f"{len(done)} of {len(shards)} shards are complete and kept; fix the cause and re-run to resume"
            ) from failed[first]

    records = [ImageRecord(**{**r, "augmentation": json.loads(r["augmentation"])})
               for i in range(len(shards)) for r in done[i]["records"]]  # fmt: skip
    rejected = [tuple(x) for i in range(len(shards)) for x in done[i]["rejected"]]
    if len(records) + len(rejected) != len(items):
        raise RuntimeError(
            f"ingest into {out}: {len(items)} inputs but {len(records)} + {len(rejected)} results"
        )
    _remove_stale(fs, images, len(shards))
    fingerprint = manifest_fingerprint(records)
    reasons = Counter(r.split(":", 1)[0] for _, r in rejected)
    _write_outputs(
        fs, images, records, rejected, fingerprint, cfg_dict, len(items), len(shards), reasons, src
    )
    return IngestSummary(
        root=out,
        images_dir=images_url,
        fingerprint=fingerprint,
        num_inputs=len(items),
        accepted=len(records),
        rejected=len(rejected),
        num_shards=len(shards),
        shards_written=len(todo),
        shards_skipped=len(shards) - len(todo),
        seconds=work_s if todo else time.perf_counter() - t0,
        rejected_reasons=dict(reasons),
        processed=sum(len(shards[i]) for i in todo),
    )


def _run_shard_tasks(
    images_url: str,
    shards: list[list[tuple[str, str]]],
    todo: list[int],
    cfg_dict: dict[str, Any],
    plans: list[str],
    done: dict[int, dict[str, Any]],
    workers: int | None,
    progress: bool,
) -> dict[int, Exception]:
    """Run one Ray task per shard in ``todo``, at most ``workers`` at once; fill ``done`` with their sidecars.

    Returns the failed shards. After a failure no new shard is started, but those in flight finish (and stay).
    """
    import ray
    from tqdm import tqdm

    limit = workers or _cluster_cpus()
    task = ray.remote(num_cpus=1, max_retries=2)(write_shard)
    show = progress and not bar_disabled()  # a per-image progress feed costs an actor process: only for a bar
    tracker = ray.remote(num_cpus=0)(ShardProgress).remote() if show else None
    pending: dict[Any, int] = {}
    failed: dict[int, Exception] = {}
    queue = list(todo)
    finished = 0
    bar = tqdm(total=sum(len(shards[i]) for i in todo), unit="img", desc="ingest", disable=not show)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                i = queue.pop(0)
                pending[task.remote(images_url, i, shards[i], cfg_dict, plans[i], tracker)] = i
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    done[i] = ray.get(ref)
                    finished += len(shards[i])
                except ray.exceptions.RayError as e:
                    failed[i] = e
                    queue.clear()
            partial = ray.get(tracker.snapshot.remote()) if tracker is not None else {}
            bar.update(
                finished + sum(min(partial.get(i, 0), len(shards[i])) for i in pending.values()) - bar.n
            )
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
        if tracker is not None:
            ray.kill(tracker)
    return failed


def _remove_stale(fs: Any, images: str, num_shards: int) -> None:
    """Delete leftovers: *.tmp files and shards beyond the current plan (from an earlier, larger run)."""
    for p in fs.ls(images, detail=False):
        name = p.rsplit("/", 1)[-1]
        m = re.fullmatch(r"shard-(\d{6})\.(tar|json)((?:\.[0-9a-f]+)?\.tmp)?", name)
        if m and (m.group(3) or int(m.group(1)) >= num_shards):
            fs.rm(p)


def _write_outputs(fs: Any, images: str, records: list[ImageRecord], rejected: list[tuple[str, ...]],
                   fingerprint: str, cfg_dict: dict[str, Any], num_inputs: int, num_shards: int,
                   reasons: Counter, src: str) -> None:  # fmt: skip
    rows = [r.manifest_row() for r in records]
    manifest = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    rej = pa.Table.from_pylist([{"source": s, "reason": r} for s, r in rejected], schema=REJECTED_SCHEMA)
    for table, name in ((rej, REJECTED_NAME), (manifest, MANIFEST_NAME)):
        with fs.open(f"{images}/{name}", "wb") as f:
            pq.write_table(table, f)
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "num_shards": num_shards,
        "counts": {
            "inputs": num_inputs,
            "accepted": len(records),
            "rejected": len(rejected),
            "shards": num_shards,
        },
        "rejected_reasons": dict(sorted(reasons.items())),
        "config": cfg_dict,
        "src": src,
    }
    with fs.open(f"{images}/{IMAGESET_NAME}.tmp", "wb") as f:
        f.write(json.dumps(meta, indent=2, sort_keys=True).encode())
    # written last: marks the set complete
    _rename(fs, f"{images}/{IMAGESET_NAME}.tmp", f"{images}/{IMAGESET_NAME}")


# --------------------------------------------------------------------------------------------------------------
# CLI


def add_cli(subparsers: Any) -> None:
    """Register ``spar ingest``."""
    p = subparsers.add_parser(
        "ingest",
        help="raw images -> frozen augmented webdataset shards + manifest",
        description="Ingest a folder / list file / glob (local or fsspec URL) into <ROOT>/images.",
    )
    p.add_argument("src", metavar="SRC", help="folder (recursive), text file of paths, glob, or s3://... URL")
    p.add_argument("--out", required=True, metavar="ROOT", help="image-set root; shards go to ROOT/images")
    p.add_argument("--seed", type=int, default=None, help="augmentation seed (default 0)")
    p.add_argument("--shard-size", type=int, default=None, help="images per shard")
    p.add_argument("--max-side", type=int, default=None, help="cap on the output's long side (0 = none)")
    p.add_argument(
        "--no-augment", action="store_true", help="no resize/crop/flip: plain snap to 16 (eval sets)"
    )
    p.add_argument("--workers", type=int, default=None, help="shard tasks at once (default: cluster CPUs)")
    p.add_argument("--config", default=None, help="TOML recipe (section [ingest])")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli_main)


def config_from_args(args: argparse.Namespace) -> IngestConfig:
    """IngestConfig from recipe + ``--set`` overrides + explicit flags (flags win)."""
    overrides = list(args.set)
    for flag, name in (("seed", "seed"), ("shard_size", "shard_size"), ("max_side", "max_side")):
        if getattr(args, flag) is not None:
            overrides.append(f"{name}={getattr(args, flag)}")
    if args.no_augment:
        overrides.append("augment=false")
    return load_config(IngestConfig, args.config, overrides, section="ingest")


def _cli_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    summary = ingest(args.src, args.out, cfg, workers=args.workers, progress=not args.quiet)
    print(summary.line())
    return 0
