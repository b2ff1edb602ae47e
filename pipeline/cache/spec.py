"""The teacher cache's format (docs/INTERFACES.md, "Teacher cache"): spec and fingerprint, on-disk names, per-image
checksums and the int8 codec. :mod:`.writer` writes this format, :mod:`.reader` serves it to training and eval,
:mod:`.maintenance` verifies and collects it.

Layout of one cache (``<cache_root>/<fingerprint>/``)::

    spec.json                            {"fingerprint", "spec": CacheSpec, "layout": {...}, "hints": {...}}
    shards/shard-000000.zarr/            Zarr v3 store of image shard 0:
        features/                        array [tokens, D] (float16, sharding codec, zstd); each image's h*w
                                         rows contiguous, images in image-shard order
        scales/                          (int8 caches only) array [tokens] float32: row i of ``features`` holds
                                         round(x / scales[i]) with scales[i] = max|x_i| / 127 (symmetric absmax
                                         per token); readers return ``features * scales[:, None]`` as float32
        manifest.json                    written after the data: per image key, offset, h, w, height, width,
                                         pixel_sha256, checksum (sha256 of the rows as stored)
    shards/shard-000000.done             completion marker (written last)

The fingerprint is the sha256 of the canonical JSON of the :class:`CacheSpec` *without* the ``pretrained``
field: the weights are identified by ``weights_id`` (an open_clip tag or the sha256 of the weights file), so the
same weights loaded from any path give the same cache. ``pretrained`` is kept in ``spec.json`` as a hint only.

Commit protocol of one shard (one writer per attempt, attempt id ``U``): the features, then the manifest, are
written to ``shard-000000.zarr.tmp-U`` (array attributes and manifest carry ``attempt=U``); the store is renamed
into place (one atomic rename on a local disk, so store and manifest always travel together); finally the marker
(``attempt=U`` and the manifest's sha256) is written. A shard is complete only when marker, manifest and store
agree on the attempt and the manifest hash matches; anything else (a crash half-way, two writers racing) reads
as *incomplete* and is recomputed, never served as data. A writer that finds the shard already complete discards
its own copy; one that finds an unfinished store in its way (a crashed attempt) moves it aside.

Stored dtypes (the spec's ``dtype``, fingerprinted): ``float16`` (default), ``float32``, and ``int8`` (per-token
absmax scale, ~0.25x the bytes of float32 before zstd). The checksum of an int8 image covers its int8 rows and their
scales; readers dequantise transparently, so consumers always get floats.

Nothing here is a pickle: JSON and Zarr only.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from pipeline.common import storage
from pipeline.common.errors import UserError

FORMAT_VERSION = 1
SPEC_NAME = "spec.json"
SHARDS_DIR = "shards"
ARRAY_NAME = "features"
SCALES_NAME = "scales"  # int8 caches: one float32 scale per row
MANIFEST_NAME = "manifest.json"
STORED_DTYPES = ("float16", "float32", "int8")
QUANTIZED_DTYPES = ("int8",)
AUTOCAST_MODES = ("bf16", "fp16", "none")  # pipeline.common.precision.cache_mode's names
STALE_TAG = ".stale-"


class CacheError(UserError):
    """A teacher cache is missing, incomplete, inconsistent or cannot be written."""


class CachePairingError(CacheError):
    """A cache does not belong to the image set it is paired with."""


@dataclass(frozen=True)
class CacheSpec:
    """Everything the cached teacher features depend on."""

    backbone: str
    pretrained: str | None  # hint only (not fingerprinted): where the weights came from
    weights_id: str  # "openclip:<model>:<tag>" | "sha256:<hex>" | "random:<name>:seed<k>"
    crop: int
    stride: int
    readout: str
    dtype: str
    imageset_fingerprint: str
    autocast: str = "bf16"  # precision of the teacher forward: "bf16" | "fp16" | "none" (float32)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in STORED_DTYPES:
            raise CacheError(f"cache dtype {self.dtype!r} not supported; use one of {STORED_DTYPES}")
        if self.autocast not in AUTOCAST_MODES:
            raise CacheError(f"cache autocast {self.autocast!r} not supported; use one of {AUTOCAST_MODES}")
        if self.crop <= 0 or self.stride <= 0:
            raise CacheError(
                f"cache crop and stride must be positive, got crop={self.crop} stride={self.stride}"
            )

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON of every field but ``pretrained`` (a hint only)."""
        identity = {k: v for k, v in asdict(self).items() if k != "pretrained"}
        return hashlib.sha256(storage.canonical_json(identity).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CacheSpec:
        """Build from a ``spec.json`` "spec" object; unknown or missing fields are a CacheError."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise CacheError(f"cache spec has unknown fields {unknown}")
        try:
            return cls(**d)
        except TypeError as e:
            raise CacheError(f"cache spec is incomplete: {e}") from e


@dataclass(frozen=True)
class ShardEntry:
    """One image's place in a cache shard (one entry of a shard manifest)."""

    key: str
    offset: int  # first row in the shard's features array
    h: int  # patch-grid rows
    w: int  # patch-grid columns
    height: int  # image pixels
    width: int
    pixel_sha256: str
    checksum: str = ""  # sha256 of the rows as stored


def cache_path_for(cache_root: str, fingerprint: str) -> str:
    """``<cache_root>/<fingerprint>`` (local path or URL)."""
    return storage.join(cache_root, fingerprint)


def feature_checksum(rows: np.ndarray, scales: np.ndarray | None = None) -> str:
    """sha256 hex of feature rows as stored (C order, little-endian), followed by their scales (int8 caches)."""
    h = hashlib.sha256()
    for a in (rows, scales):
        if a is None:
            continue
        arr = np.ascontiguousarray(a)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        h.update(arr.tobytes())
    return h.hexdigest()


def quantize_int8(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row absmax quantisation: (n, D) floats -> int8 (n, D) and float32 scales (n,).

    ``q = round(x / s)`` with ``s = max|x| / 127`` (an all-zero row gets s = 0 and q = 0), so
    ``|x - q * s| <= s / 2`` per element. Non-finite input is a CacheError (it has no int8 image).
    """
    x = np.asarray(rows, dtype=np.float32)  # (n, D)
    if not np.isfinite(x).all():
        raise CacheError("cannot store non-finite features (NaN/inf) in an int8 cache")
    scales = (np.abs(x).max(axis=1) / np.float32(127.0)).astype(np.float32)  # (n,)
    safe = np.where(scales > 0, scales, np.float32(1.0))[:, None]  # (n, 1)
    q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)  # (n, D)
    return q, scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(n, D) int8 and (n,) scales -> (n, D) float32."""
    return q.astype(np.float32) * scales.astype(np.float32)[:, None]
