"""Last step of an image's path: the per-worker stream of (image, cached teacher target) pairs for distillation.

Each Ray Train worker (rank ``r`` of ``world_size``) reads its own subset of shard pairs -- image shard ``i``
(webdataset tar) with cache shard ``i`` (Zarr) -- and yields batches in an order that is a pure function of
``(seed, epoch, rank, world_size, batch_size, shuffle_buffer)`` and of the image set's manifest:

1. per epoch the shard order is permuted with ``(seed, epoch)`` and shard ``k`` of that order goes to rank
   ``k mod world_size``; the ``num_shards mod world_size`` shards left over are read by every rank, each keeping
   every ``world_size``-th of their samples (so ranks get nearly equal counts);
2. the rank's samples, in shard-then-tar order, go through a seeded shuffle buffer;
3. optional size buckets group equal-size images into batches (``batch_size > 1``);
4. every rank keeps the same number of batches per epoch (the minimum over ranks; DDP needs equal steps).

Because the order is computed from the manifest alone, a *data position* ``(epoch, batches consumed)`` pins
the rest of the sequence: a stream started there yields exactly what an uninterrupted stream would have yielded
next, and samples before it are skipped without being decoded. Decoding (PNG + pixel hash check + cache read)
happens ahead of the trainer: in background DataLoader workers (forkserver; batch ``j`` of the stream is produced by
loader worker ``j mod num_workers`` and the DataLoader's in-order delivery restores the plan order), or with no
loader workers in one background thread of the trainer's process (:class:`ThreadPrefetch`).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from functools import lru_cache
from typing import Any, Generic, TypedDict, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import CacheError, ShardEntry
from pipeline.common.errors import UserError
from pipeline.data.imageset import (
    ImageRecord,
    ImageSet,
    decode_png_rgb,
    open_imageset,
)

T = TypeVar("T")


class StreamError(UserError):
    """An image and its cached target do not belong together, or a shard is missing/unreadable."""


class Batch(TypedDict, total=False):
    """One batch of the stream (``target`` only with a cache)."""

    image: torch.Tensor  # (B, H, W, 3) uint8
    target: torch.Tensor  # (B, H/p, W/p, D) cached teacher features
    keys: list[str]
    epoch: int
    batch: int  # index of the batch in its epoch


def refs_from_imageset(ims: ImageSet) -> list[list[ImageRecord]]:
    """Per image shard, its images in tar order (the image set's manifest rows)."""
    return [ims.shard_records(i) for i in range(ims.num_shards)]


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]))


def buffer_shuffle(items: list[T], buffer_size: int, rng: np.random.Generator) -> list[T]:
    """Streaming shuffle with a bounded buffer (as webdataset's ``shuffle``), deterministic given ``rng``.

    The first ``buffer_size`` items fill the buffer; every further item replaces a random buffer entry, which is
    emitted; at the end the buffer is emitted in random order. ``buffer_size <= 1`` keeps the order.
    """
    if buffer_size <= 1:
        return list(items)
    out: list[T] = []
    buf: list[T] = []
    for it in items:
        if len(buf) < buffer_size:
            buf.append(it)
            continue
        j = int(rng.integers(buffer_size))
        out.append(buf[j])
        buf[j] = it
    out.extend(buf[i] for i in rng.permutation(len(buf)))
    return out


def bucket_batches(seq: list[ImageRecord], batch_size: int) -> list[list[ImageRecord]]:
    """Group a sample sequence into batches of equal image size (in order of completion; partial buckets last)."""
    if batch_size <= 1:
        return [[r] for r in seq]
    out: list[list[ImageRecord]] = []
    buckets: dict[tuple[int, int], list[ImageRecord]] = {}
    for r in seq:
        b = buckets.setdefault((r.height, r.width), [])
        b.append(r)
        if len(b) == batch_size:
            out.append(b)
            buckets[(r.height, r.width)] = []
    out.extend(b for b in buckets.values() if b)
    return out


@dataclass(eq=False)
class Planner:
    """The deterministic per-epoch, per-rank sample plan (see the module docstring)."""

    refs_by_shard: list[list[ImageRecord]] = field(repr=False)  # per image shard, its images in tar order
    _: KW_ONLY
    seed: int
    world_size: int
    batch_size: int = 1
    shuffle_buffer: int = 64

    def __post_init__(self) -> None:
        world_size, images = self.world_size, sum(len(s) for s in self.refs_by_shard)
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if images < world_size:
            raise StreamError(
                f"the image set has {images} images, fewer than the {world_size} training workers"
            )
        self._plan = lru_cache(maxsize=64)(self._plan_uncached)
        # (epoch, rank) -> the rank's batches for the epoch, truncated to steps(epoch): one shared list per epoch and
        # rank (read it, do not modify it; copying it on every call made a stream's epoch quadratic in its length)
        self.batches = lru_cache(maxsize=64)(self._batches)

    def inputs(self, epoch: int, rank: int) -> list[tuple[int, list[ImageRecord]]]:
        """The rank's input segments for ``epoch``: (shard, its samples this rank reads, in tar order).

        Whole shards go round-robin to the ranks; the ``num_shards mod world_size`` shards left over are read by
        every rank, each keeping every ``world_size``-th sample, so ranks get (nearly) equal sample counts.
        """
        n, w = len(self.refs_by_shard), self.world_size
        order = [int(s) for s in _rng(self.seed, epoch, 0x5EED).permutation(n)]
        whole, shared = order[: n - n % w], order[n - n % w :]
        out = [(s, self.refs_by_shard[s]) for s in whole[rank::w]]
        j = 0
        for s in shared:
            refs = self.refs_by_shard[s]
            mine = [r for k, r in enumerate(refs, start=j) if k % w == rank]
            j += len(refs)
            if mine:
                out.append((s, mine))
        return out

    def _plan_uncached(self, epoch: int, rank: int) -> list[list[ImageRecord]]:
        seq = [r for _, refs in self.inputs(epoch, rank) for r in refs]
        seq = buffer_shuffle(seq, self.shuffle_buffer, _rng(self.seed, epoch, rank, 0xB0FF))
        return bucket_batches(seq, self.batch_size)

    def steps(self, epoch: int) -> int:
        """Batches every rank takes in ``epoch`` (the minimum over ranks)."""
        return min(len(self._plan(epoch, r)) for r in range(self.world_size))

    def _batches(self, epoch: int, rank: int) -> list[list[ImageRecord]]:
        return self._plan(epoch, rank)[: self.steps(epoch)]

    def total_steps(self, epochs: int) -> int:
        return sum(self.steps(e) for e in range(epochs))

    def positions(self, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int]]:
        """(epoch, batch index) from a data position onwards, forever."""
        e, b = start_epoch, start_batch
        while True:
            n = self.steps(e)
            if b < n:
                yield e, b
                b += 1
            else:
                e, b = e + 1, 0

    def advance(self, epoch: int, batch: int) -> tuple[int, int]:
        """The data position after consuming batch ``batch`` of ``epoch``."""
        return (epoch, batch + 1) if batch + 1 < self.steps(epoch) else (epoch + 1, 0)


# ---------------------------------------------------------------------------------------------- reading


class _TarReader:
    """Reads a rank's input segments sequentially, keeping raw PNG bytes only for the keys asked for."""

    def __init__(self, ims: ImageSet, inputs: list[tuple[int, list[ImageRecord]]], wanted: set[str]) -> None:
        self.ims = ims
        self.segments = [(s, refs) for s, refs in inputs if any(r.key in wanted for r in refs)]
        self.wanted = wanted
        self.pending: dict[str, bytes] = {}
        self._it: Iterator[tuple[str, bytes]] | None = None
        self._seg = 0

    def get(self, key: str, shard: int) -> bytes:
        while key not in self.pending:
            if self._it is None:
                if self._seg >= len(self.segments):
                    raise StreamError(
                        f"image {key!r} was not found in image shard {shard} ({self.ims.shard_url(shard)})"
                    )
                self._it = self.ims.iter_pngs(self.segments[self._seg][0], StreamError)
                self._seg += 1
            nxt = next(self._it, None)
            if nxt is None:
                self._it = None
                continue
            k, data = nxt
            if k in self.wanted:
                self.pending[k] = data
        self.wanted.discard(key)
        return self.pending.pop(key)


def decode_png(data: bytes, ref: ImageRecord, verify: bool = True) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8, checked against the manifest's size and (``verify``) pixel hash."""
    what = f"image shard {ref.shard}"
    arr = decode_png_rgb(data, f"{what}: image {ref.key!r}")  # (H, W, 3) uint8
    ref.check_pixels(arr, what, StreamError, check_hash=verify)
    return arr


@dataclass(eq=False)
class PairedStream(IterableDataset):
    """Batches of ``{"image": (B, H, W, 3) uint8, "target": (B, H/p, W/p, D), "keys", "epoch", "batch"}``.

    ``target`` is absent when ``cache`` is None (online-teacher mode). The stream starts at the data position
    ``(start_epoch, start_batch)`` and yields ``num_batches`` batches (None: forever).
    """

    images: str
    cache: str | None
    _: KW_ONLY
    seed: int
    rank: int
    world_size: int
    patch_size: int
    batch_size: int = 1
    shuffle_buffer: int = 64
    start_epoch: int = 0
    start_batch: int = 0
    num_batches: int | None = None
    verify: bool = True  # check every image's pixel sha256
    _entry_cache: tuple[TeacherCache, dict[str, ShardEntry]] | None = field(
        default=None, init=False, repr=False
    )

    def planner(self, ims: ImageSet) -> Planner:
        return Planner(
            refs_from_imageset(ims),
            seed=self.seed,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
        )

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        ims = open_imageset(self.images)
        cache = open_cache(self.cache) if self.cache is not None else None
        planner = self.planner(ims)
        reader: _TarReader | None = None
        reader_epoch = -1
        for rel, (epoch, b) in enumerate(planner.positions(self.start_epoch, self.start_batch)):
            if self.num_batches is not None and rel >= self.num_batches:
                return
            if rel % nw != wid:
                continue
            if epoch != reader_epoch:
                reader = self._reader_for(ims, planner, epoch, b, rel, wid, nw)
                reader_epoch = epoch
            batch = planner.batches(epoch, self.rank)[b]
            yield self._load(batch, reader, cache, epoch, b)

    def _reader_for(
        self, ims: ImageSet, planner: Planner, epoch: int, first: int, rel: int, wid: int, nw: int
    ) -> _TarReader:
        """A tar reader for this epoch that keeps only the samples this loader worker will emit."""
        batches = planner.batches(epoch, self.rank)
        wanted: set[str] = set()
        for k, bi in enumerate(range(first, len(batches)), start=rel):
            if self.num_batches is not None and k >= self.num_batches:
                break
            if k % nw == wid:
                wanted.update(r.key for r in batches[bi])
        return _TarReader(ims, planner.inputs(epoch, self.rank), wanted)

    def _load(
        self, batch: list[ImageRecord], reader: _TarReader, cache: TeacherCache | None, epoch: int, b: int
    ) -> Batch:
        imgs = [decode_png(reader.get(r.key, r.shard), r, self.verify) for r in batch]
        item: Batch = {
            "image": torch.from_numpy(np.stack(imgs)),  # (B, H, W, 3) uint8
            "keys": [r.key for r in batch],
            "epoch": epoch,
            "batch": b,
        }
        if cache is not None:
            item["target"] = torch.from_numpy(np.stack([self._target(cache, r) for r in batch]))
        return item

    def _target(self, cache: TeacherCache, ref: ImageRecord) -> np.ndarray:
        """The cached target of ``ref``, after checking the cache's record of the image against the manifest."""
        entries = self._entries(cache)
        e = entries.get(ref.key)
        if e is None:
            raise StreamError(
                f"image {ref.key!r} (shard {ref.shard}) has no entry in the teacher cache {cache.path}: "
                "cache and image set do not match"
            )
        if (e.height, e.width) != (ref.height, ref.width) or e.pixel_sha256 != ref.pixel_sha256:
            raise StreamError(
                f"image {ref.key!r} (shard {ref.shard}): the teacher cache {cache.path} was computed from other "
                f"pixels ({e.width}x{e.height}, sha256 {e.pixel_sha256[:12]}…) than the image set's "
                f"({ref.width}x{ref.height}, sha256 {ref.pixel_sha256[:12]}…): cache and image set do not match"
            )
        try:
            t = np.asarray(cache.features(ref.key))
        except CacheError as err:
            raise StreamError(f"image {ref.key!r} (shard {ref.shard}): {err}") from None
        p = self.patch_size
        want = (ref.height // p, ref.width // p)
        if t.ndim != 3 or tuple(t.shape[:2]) != want:
            raise StreamError(
                f"image {ref.key!r} (shard {ref.shard}, {ref.width}x{ref.height}) expects a cached target of "
                f"{want[0]}x{want[1]} patches, the cache holds {tuple(t.shape)}: cache and image set do not match"
            )
        return t  # (h, w, D)

    def _entries(self, cache: TeacherCache) -> dict[str, ShardEntry]:
        """The cache's entries by key (read once per opened cache)."""
        if self._entry_cache is None or self._entry_cache[0] is not cache:
            entries = {e.key: e for i in range(cache.num_shards) for e in cache.shard_entries(i)}
            self._entry_cache = (cache, entries)
        return self._entry_cache[1]


def make_loader(stream: PairedStream, workers: int, prefetch: int = 4) -> Iterable[Batch]:
    """The stream's batches, decoded ahead of the consumer: in ``workers`` background processes (a forkserver
    DataLoader), or, with ``workers == 0``, in one background thread of this process (no inter-process hand-over:
    PNG decoding, hashing and Zarr reads release the GIL). Either way up to ``prefetch`` batches wait, in plan order.

    The forkserver preloads this module (torch, numpy, the readers) once, so its workers start fast, and does
    not re-import the caller's ``__main__``.
    """
    if workers == 0:
        return ThreadPrefetch(DataLoader(stream, batch_size=None, num_workers=0), prefetch)
    ctx = torch.multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.train.stream", "pipeline.data.imageset", "pipeline.cache.reader"])
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        multiprocessing_context=ctx,
        prefetch_factor=prefetch,
    )


class ThreadPrefetch(Generic[T]):
    """Iterate ``source`` in a background thread, ``depth`` items ahead; items come out in the source's order and
    an exception of the source is raised in the consumer, at the item where it happened. Leaving the loop early
    stops the thread."""

    _END = object()

    def __init__(self, source: Iterable[T], depth: int = 4) -> None:
        self.source, self.depth = source, max(1, depth)

    def __iter__(self) -> Iterator[T]:
        q: queue.Queue[Any] = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        thread = threading.Thread(target=self._produce, args=(q, stop), name="spar-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                kind, value = q.get()
                if kind is self._END:
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()
            thread.join(timeout=5)

    def _produce(self, q: queue.Queue[Any], stop: threading.Event) -> None:
        try:
            for item in self.source:
                if not self._put(q, stop, ("item", item)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put(q, stop, ("error", e))
            return
        self._put(q, stop, (self._END, None))

    @staticmethod
    def _put(q: queue.Queue[Any], stop: threading.Event, entry: tuple[Any, Any]) -> bool:
        """Block until there is room (or the consumer left); False when it left."""
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False
