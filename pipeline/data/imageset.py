"""Reader for ingested image sets (format: docs/INTERFACES.md, "Image set").

Layout of an image set (``<root>/images/``)::

    shard-000000.tar       webdataset shard: per sample ``<key>.png`` (lossless RGB) + ``<key>.json``
    shard-000000.json      per-shard sidecar (keys + pixel hashes), written before the tar is renamed into place
    manifest.parquet       key, shard, height, width, source, pixel_sha256, augmentation (JSON string)
    imageset.json          fingerprint (sha256 over the canonical manifest), counts, config
    rejected.parquet       source, reason

``open_imageset`` accepts the image-set root (the parent of ``images/``) or the ``images/`` directory itself,
as a local path or any fsspec URL (``s3://...``). Nothing here unpickles anything.

On an image's path this is the format ingest writes (:mod:`pipeline.data.shards`) and what every later stage reads
(the teacher precompute, the training stream, evaluation): records, pixel hashes and the set's fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any, TypedDict

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.common.errors import UserError
from pipeline.common.storage import canonical_json, is_local, sha256_of, shard_stem

IMAGES_DIR = "images"
MANIFEST_NAME = "manifest.parquet"
IMAGESET_NAME = "imageset.json"
REJECTED_NAME = "rejected.parquet"
FORMAT_VERSION = 1

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("source", pa.string()),
        ("pixel_sha256", pa.string()),
        ("augmentation", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema([("source", pa.string()), ("reason", pa.string())])


class ImageSetError(UserError):
    """An image set is missing, incomplete or inconsistent."""


class Augmentation(TypedDict):
    """How ingest turned a source into the stored pixels (a manifest row's ``augmentation``, JSON)."""

    mode: str  # "upscale", "full", "crop", or "plain" (no augmentation)
    t: float  # the scale draw
    resize: list[int]  # [h, w] after resizing
    crop: list[int]  # [top, left, h, w] in the resized image; (h, w) is the stored size
    flip: bool  # flipped horizontally


def pixel_sha256(arr: np.ndarray) -> str:
    """sha256 hex of an (H, W, 3) uint8 image's C-contiguous bytes (the contract's pixel hash)."""
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"pixel_sha256 expects an (H, W, 3) uint8 array, got {arr.shape} {arr.dtype}")
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    """One accepted image of an image set (a manifest row)."""

    key: str
    shard: int
    height: int
    width: int
    source: str
    pixel_sha256: str
    augmentation: Augmentation = field(default_factory=dict, compare=False, hash=False)  # type: ignore[assignment]

    def manifest_row(self) -> dict[str, Any]:
        """The row as stored in manifest.parquet (augmentation as canonical JSON)."""
        return {**asdict(self), "augmentation": canonical_json(self.augmentation)}

    def check_pixels(
        self, arr: np.ndarray, what: str, error: type[Exception] = ImageSetError, check_hash: bool = True
    ) -> None:
        """Raise ``error`` naming ``what`` unless ``arr`` has this image's size and (with ``check_hash``) pixel sha256."""
        if arr.shape != (self.height, self.width, 3):
            raise error(
                f"{what}: image {self.key!r} decodes to {arr.shape[1]}x{arr.shape[0]}, the manifest says "
                f"{self.width}x{self.height}"
            )
        if check_hash and pixel_sha256(arr) != self.pixel_sha256:
            raise error(
                f"{what}: image {self.key!r}: pixel sha256 does not match the manifest (corrupt or altered shard)"
            )


def manifest_fingerprint(records: list[ImageRecord]) -> str:
    """sha256 over the canonical manifest content, in manifest (shard, tar) order.

    Covers key, shard, height, width, pixel_sha256 and augmentation; ``source`` is provenance only, so the same
    pixels ingested from another location (or a copied image set) keep their fingerprint.
    """
    h = hashlib.sha256()
    h.update(f"spar-imageset-v{FORMAT_VERSION}\n".encode())
    for r in records:
        row = [r.key, r.shard, r.height, r.width, r.pixel_sha256, r.augmentation]
        h.update(canonical_json(row).encode())
        h.update(b"\n")
    return h.hexdigest()


def decode_png_rgb(data: bytes, what: str) -> np.ndarray:
    """Decode stored PNG bytes to an (H, W, 3) uint8 array; raise ImageSetError naming ``what`` otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG" or im.mode != "RGB":
                raise ImageSetError(f"{what}: expected an RGB PNG, got {im.format} {im.mode}")
            arr = np.asarray(im.convert("RGB"))
    except ImageSetError:
        raise
    except Exception as e:
        raise ImageSetError(f"{what}: cannot decode PNG ({e})") from e
    return np.ascontiguousarray(arr)  # (H, W, 3) uint8


def iter_tar_samples(fileobj: IO[bytes], what: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream a webdataset tar: yield (key, {ext: bytes}) groups in tar order (key = name up to first dot)."""
    current: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, dot, ext = base.partition(".")
                if not dot:
                    continue
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if key != current:
                    if current is not None:
                        yield current, group
                    current, group = key, {}
                group[ext] = data
    except tarfile.TarError as e:
        raise ImageSetError(f"{what}: unreadable tar ({e})") from e
    if current is not None:
        yield current, group


class ImageSet:
    """An ingested image set: manifest records plus access to the pixel shards."""

    def __init__(self, url: str) -> None:
        self.fs, path = fsspec.core.url_to_fs(url)
        self.images_path = _resolve_images_dir(self.fs, path, url)
        # the images dir in the user's spelling: a path, or a URL with its scheme
        self.url = self.images_path if is_local(url) else self.fs.unstrip_protocol(self.images_path)
        meta_path = f"{self.images_path}/{IMAGESET_NAME}"
        try:
            with self.fs.open(meta_path, "rb") as f:
                self.meta: dict[str, Any] = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise ImageSetError(f"{url}: cannot read {IMAGESET_NAME} ({e})") from e
        self.records: list[ImageRecord] = _read_manifest(self.fs, f"{self.images_path}/{MANIFEST_NAME}", url)
        self.fingerprint: str = str(self.meta.get("fingerprint", ""))
        if manifest_fingerprint(self.records) != self.fingerprint:
            raise ImageSetError(f"{url}: manifest does not match the fingerprint in {IMAGESET_NAME}")
        self.num_shards: int = int(self.meta["num_shards"])
        self.counts: dict[str, int] = dict(self.meta.get("counts", {}))
        self.config: dict[str, Any] = dict(self.meta.get("config", {}))
        self._by_key = {r.key: r for r in self.records}
        self._by_shard: list[list[ImageRecord]] = [[] for _ in range(self.num_shards)]
        for r in self.records:
            if not 0 <= r.shard < self.num_shards:
                raise ImageSetError(f"{url}: record {r.key!r} names shard {r.shard} of {self.num_shards}")
            self._by_shard[r.shard].append(r)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"ImageSet({self.url!r}, images={len(self)}, shards={self.num_shards}, fp={self.fingerprint[:12]})"

    def record(self, key: str) -> ImageRecord:
        """The record of ``key`` (KeyError naming the key if absent)."""
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"image key {key!r} is not in image set {self.url}") from None

    def shard_records(self, i: int) -> list[ImageRecord]:
        """Records of shard ``i`` in tar order."""
        self._check_shard(i)
        return list(self._by_shard[i])

    def shard_url(self, i: int) -> str:
        """Path (local) or URL (remote) of ``shard-%06d.tar``."""
        self._check_shard(i)
        return f"{self.url}/{shard_stem(i)}.tar"

    def shard_path(self, i: int) -> str:
        """Path of shard ``i``'s tar inside :attr:`fs`."""
        return f"{self.images_path}/{shard_stem(i)}.tar"

    def iter_shard(self, i: int, verify: bool = True) -> Iterator[tuple[ImageRecord, np.ndarray]]:
        """Yield (record, (H, W, 3) uint8 pixels) for shard ``i`` in tar order.

        With ``verify`` (default) each image's size and pixel sha256 are checked against the manifest, and the tar
        must hold exactly the manifest's keys in order; any mismatch raises ImageSetError naming shard and key.
        """
        expected = self.shard_records(i)
        what = self.shard_url(i)
        n = 0
        with self._open_shard(i) as f:
            for key, group in iter_tar_samples(f, what):
                if n >= len(expected) or expected[n].key != key:
                    want = expected[n].key if n < len(expected) else "<end of shard>"
                    raise ImageSetError(f"{what}: sample {n} is {key!r}, manifest expects {want!r}")
                rec = expected[n]
                if "png" not in group:
                    raise ImageSetError(f"{what}: sample {key!r} has no .png")
                arr = decode_png_rgb(group["png"], f"{what}:{key}.png")  # (H, W, 3) uint8
                if verify:
                    rec.check_pixels(arr, what)
                n += 1
                yield rec, arr
        if n != len(expected):
            raise ImageSetError(f"{what}: holds {n} samples, manifest lists {len(expected)}")

    def iter_pngs(self, i: int, error: type[Exception] = ImageSetError) -> Iterator[tuple[str, bytes]]:
        """(key, PNG bytes) of shard ``i``'s samples in tar order; a missing shard raises ``error``."""
        with self._open_shard(i, error) as f:
            for key, group in iter_tar_samples(f, self.shard_url(i)):
                if "png" in group:
                    yield key, group["png"]

    def read(self, key: str, verify: bool = True) -> np.ndarray:
        """Pixels of one image, (H, W, 3) uint8 (scans its shard)."""
        rec = self.record(key)
        what = self.shard_url(rec.shard)
        for k, png in self.iter_pngs(rec.shard):
            if k == key:
                arr = decode_png_rgb(png, f"{what}:{key}.png")
                if verify:
                    rec.check_pixels(arr, what)
                return arr
        raise ImageSetError(f"{what}: image {key!r} listed in the manifest is missing from its shard")

    def verify(self, deep: bool = False) -> list[str]:
        """Integrity problems of the stored shards (empty list = fine).

        Checks that every shard tar exists with the size its sidecar recorded at ingest and that each sidecar lists
        exactly the manifest's keys and pixel hashes; ``deep`` also re-hashes every tar (sha256 of the bytes).
        Decoding and per-image pixel checks happen on every ``iter_shard``/``read``.
        """
        problems = []
        for i in range(self.num_shards):
            tar = self.shard_path(i)
            side = f"{self.images_path}/{shard_stem(i)}.json"
            try:
                with self.fs.open(side, "rb") as f:
                    sc = json.loads(f.read())
                size = self.fs.size(tar)
            except FileNotFoundError as e:
                problems.append(f"shard {i}: missing file ({e})")
                continue
            except (OSError, ValueError) as e:
                problems.append(f"shard {i}: unreadable sidecar ({e})")
                continue
            if size != sc.get("tar_bytes"):
                problems.append(f"shard {i}: tar is {size} bytes, ingest wrote {sc.get('tar_bytes')}")
                continue
            got = [(r["key"], r["pixel_sha256"]) for r in sc.get("records", [])]
            if got != [(r.key, r.pixel_sha256) for r in self._by_shard[i]]:
                problems.append(f"shard {i}: sidecar and manifest disagree on keys or pixel hashes")
            if deep and sha256_of(tar, self.fs) != sc.get("tar_sha256"):
                problems.append(f"shard {i}: tar sha256 differs from the one recorded at ingest (corrupt)")
        return problems

    def _open_shard(self, i: int, error: type[Exception] = ImageSetError) -> IO[bytes]:
        try:
            return self.fs.open(self.shard_path(i), "rb")
        except FileNotFoundError:
            raise error(f"{self.shard_url(i)}: shard file is missing") from None

    def rejected(self) -> list[tuple[str, str]]:
        """(source, reason) of every input rejected at ingest."""
        path = f"{self.images_path}/{REJECTED_NAME}"
        if not self.fs.exists(path):
            return []
        with self.fs.open(path, "rb") as f:
            t = pq.ParquetFile(f).read()
        return list(zip(t.column("source").to_pylist(), t.column("reason").to_pylist(), strict=True))

    def _check_shard(self, i: int) -> None:
        if not isinstance(i, int | np.integer) or not 0 <= int(i) < self.num_shards:
            raise IndexError(f"shard {i} out of range for image set {self.url} ({self.num_shards} shards)")


def open_imageset(root: str) -> ImageSet:
    """Open an image set at ``root`` (the parent of ``images/`` or ``images/`` itself; local or fsspec URL)."""
    return ImageSet(str(root))


def _resolve_images_dir(fs: fsspec.AbstractFileSystem, path: str, url: str) -> str:
    path = path.rstrip("/")
    for cand in (f"{path}/{IMAGES_DIR}", path):
        if fs.exists(f"{cand}/{IMAGESET_NAME}"):
            return cand
    raise ImageSetError(
        f"{url}: not an image set (no {IMAGES_DIR}/{IMAGESET_NAME} or {IMAGESET_NAME}; "
        "is ingest finished? run `spar ingest SRC --out ROOT`)"
    )


def _read_manifest(fs: fsspec.AbstractFileSystem, path: str, url: str) -> list[ImageRecord]:
    try:
        with fs.open(path, "rb") as f:
            # one file: ParquetFile, not read_table (which imports pyarrow.dataset, ~0.4 s, for a dataset of one)
            t = pq.ParquetFile(f).read()
    except (OSError, pa.ArrowException) as e:
        raise ImageSetError(f"{url}: cannot read {MANIFEST_NAME} ({e})") from e
    missing = [n for n in MANIFEST_SCHEMA.names if n not in t.column_names]
    if missing:
        raise ImageSetError(f"{url}: {MANIFEST_NAME} lacks columns {missing}")
    rows = t.select(MANIFEST_SCHEMA.names).to_pylist()
    return [ImageRecord(**{**r, "augmentation": json.loads(r["augmentation"])}) for r in rows]
