"""The precompute Ray task: compute one cache shard in a worker process.

:func:`compute_shard` runs the sliding-window teacher over every image of one image shard and commits the cache
shard with a :class:`~pipeline.cache.writer.ShardWriter`; inside a task, decoding, the teacher and writing overlap
(a reader thread, the task's thread, a writer thread). The teacher is built once per worker process and reused
by the tasks that process runs. The driver (:mod:`.precompute`) submits one such task per incomplete shard.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import numpy as np
import torch

from pipeline.cache.config import PrecomputeConfig
from pipeline.cache.reader import TeacherCache, open_cache
from pipeline.cache.spec import CacheError, ShardEntry
from pipeline.cache.writer import ShardWriter
from pipeline.common import precision
from pipeline.common.trace import mark
from pipeline.data.imageset import ImageSet, open_imageset
from spar_core.backbones import Backbone, build_backbone
from spar_core.sliding import num_windows, sliding_window_features

QUEUE_DEPTH = 2  # images decoded ahead of the teacher, and features waiting for the writer (per task)

_TEACHERS: dict[tuple[Any, ...], Backbone] = {}  # per worker process: the loaded teacher, reused across tasks
_TEACHER_BUILDS = [0]  # how many times this process built a teacher (reported in the task statistics)


def _teacher(name: str, pretrained: str | None, seed: int, device: str, amp: torch.dtype | None) -> Backbone:
    key = (name, pretrained, seed, device, amp)
    if key not in _TEACHERS:
        _TEACHERS.clear()
        _TEACHER_BUILDS[0] += 1
        bb = build_backbone(name, pretrained, device=device, dtype=torch.float32, seed=seed)
        _TEACHERS[key] = bb.precast_for_autocast(amp) if amp is not None else bb
    return _TEACHERS[key]


def compute_shard(cache_path: str, images: str, shard: int, cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """Ray task body: compute and commit cache shard ``shard``. Returns stats (status, images, windows, seconds,
    and for a computed shard compute_s, decode_wait_s, write_wait_s: see :func:`_write_shard`).

    ``cfg_dict`` is the run's :class:`PrecomputeConfig` as a dict. Credentials and endpoints come from the task's
    runtime environment (:func:`pipeline.common.tasks.task_runtime_env`), never from its arguments."""
    mark("task_start", once=True)
    cfg = PrecomputeConfig(**{**cfg_dict, "progress": False})
    t0 = time.perf_counter()
    cache = open_cache(cache_path)
    stats: dict[str, Any] = {"shard": shard, "status": "already-complete", "images": 0, "windows": 0}
    if cache.shard_complete(shard):
        return {**stats, "seconds": 0.0, "pid": os.getpid(), "teacher_builds": _TEACHER_BUILDS[0]}
    s = cache.spec
    device = "cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(cfg.cpus_per_task)
    amp = precision.autocast_dtype(s.autocast)  # the spec's bf16 | fp16 | none
    bb = _teacher(s.backbone, cfg.pretrained, cfg.seed, device, amp)
    if bb.weights_id != s.weights_id:
        raise CacheError(
            f"teacher on this worker has weights {bb.weights_id}, the cache expects {s.weights_id}"
        )
    ims = open_imageset(images)
    status, windows, times = _write_shard(cache, ims, shard, bb, cfg.window_batch, amp)
    return {
        **stats,
        "status": status,
        "images": len(ims.shard_records(shard)),
        "windows": windows,
        "seconds": time.perf_counter() - t0,
        **times,  # compute_s (teacher), decode_wait_s (teacher waiting for input), write_wait_s (for the writer)
        "device": str(next(bb.parameters()).device),
        "pid": os.getpid(),
        "teacher_builds": _TEACHER_BUILDS[0],
    }


def _write_shard(
    cache: TeacherCache, ims: ImageSet, shard: int, bb: Backbone, window_batch: int, amp: torch.dtype | None
) -> tuple[str, int, dict[str, float]]:
    """Run the sliding-window teacher over image shard ``shard`` into cache shard ``shard``; (commit status,
    windows run, timings). A failure anywhere discards the attempt's temporary store.

    Three stages overlap: a reader thread decodes (and verifies) the next images, the teacher runs on this
    thread, a writer thread encodes and stores finished features (the only thread using the ShardWriter until
    it is joined; commit and abort happen here). Same images, same order, same features as one sequential loop.
    """
    s = cache.spec
    p = bb.patch_size
    entries = [
        ShardEntry(r.key, 0, r.height // p, r.width // p, r.height, r.width, r.pixel_sha256)
        for r in ims.shard_records(shard)
    ]
    writer = ShardWriter(cache.path, shard, entries, dim=bb.dim, dtype=s.dtype)
    decoded, finished = _Channel(QUEUE_DEPTH), _Channel(QUEUE_DEPTH)
    threads = [
        threading.Thread(
            target=_decode_into, args=(ims, shard, decoded), name="precompute-decode", daemon=True
        ),
        threading.Thread(target=_add_from, args=(writer, finished), name="precompute-write", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        windows, times = _teacher_stage(bb, s.crop, s.stride, window_batch, amp, decoded, finished)
        t0 = time.perf_counter()
        threads[1].join()  # the writer drains what is left
        times["write_wait_s"] += time.perf_counter() - t0
        threads[0].join()  # done already: it handed over its end mark
        finished.raise_failure()
        return writer.commit(), windows, times
    except BaseException:
        decoded.cancel()
        finished.cancel()
        for t in threads:
            t.join()
        writer.abort()
        raise


def _teacher_stage(
    bb: Backbone,
    crop: int,
    stride: int,
    window_batch: int,
    amp: torch.dtype | None,
    decoded: _Channel,
    finished: _Channel,
) -> tuple[int, dict[str, float]]:
    """The teacher over every decoded image, features handed on in order; (windows, seconds spent computing and
    waiting for input or for room in the write queue)."""
    device = next(bb.parameters()).device
    times = {"compute_s": 0.0, "decode_wait_s": 0.0, "write_wait_s": 0.0}
    windows = 0
    while True:
        item, waited = decoded.get()
        times["decode_wait_s"] += waited
        if item is _END:
            break
        rec, img = item
        t0 = time.perf_counter()
        x = bb.normalize(torch.from_numpy(img)[None].to(device)).float()  # (1, 3, H, W)
        feats = sliding_window_features(
            bb, x, crop, stride, window_batch, autocast_dtype=amp, compile=precision.compile_requested()
        )  # (1, H/p, W/p, D)
        out = feats[0].cpu().numpy()  # (H/p, W/p, D)
        times["compute_s"] += time.perf_counter() - t0
        windows += num_windows(rec.height, rec.width, crop, stride)
        times["write_wait_s"] += finished.put((rec.key, out))
    times["write_wait_s"] += finished.put(_END)
    return windows, times


def _decode_into(ims: ImageSet, shard: int, out: _Channel) -> None:
    """Reader thread: (record, pixels) of every image of ``shard`` in tar order, then the end mark."""
    try:
        for rec, img in ims.iter_shard(shard):  # (H, W, 3) uint8, verified against pixel_sha256
            out.put((rec, np.require(img, np.uint8, ["C", "W"])))  # torch wants a writable array
        out.put(_END)
    except _Cancelled:
        pass
    except BaseException as e:  # handed to the teacher's next get
        out.fail(e)


def _add_from(writer: ShardWriter, inp: _Channel) -> None:
    """Writer thread: ``writer.add`` every (key, features) in order until the end mark."""
    try:
        while True:
            item, _ = inp.get()
            if item is _END:
                return
            writer.add(*item)
    except _Cancelled:
        pass
    except BaseException as e:  # handed to the teacher's next put (or raised after the join)
        inp.fail(e)


_END = object()  # the end mark a producer puts after its last item


class _Cancelled(Exception):
    """Raised in a thread blocked on (or using) a channel the other side gave up on."""


class _Channel:
    """A bounded FIFO between two threads. ``fail(e)`` hands ``e`` to the other side's next ``put``/``get``;
    ``cancel()`` makes every pending and later call raise :class:`_Cancelled`. No call blocks after either."""

    def __init__(self, depth: int):
        self._items: collections.deque[Any] = collections.deque()
        self._depth = depth
        self._cv = threading.Condition()  # re-entrant: raise_failure is called with it held
        self._failure: BaseException | None = None  # raised by every later call (a cancel's: _Cancelled)

    def put(self, item: Any) -> float:
        """Append ``item``, waiting while the channel is full; the seconds waited."""
        t0 = time.perf_counter()
        with self._cv:
            while len(self._items) >= self._depth and self._failure is None:
                self._cv.wait()
            self.raise_failure()
            self._items.append(item)
            self._cv.notify_all()
        return time.perf_counter() - t0

    def get(self) -> tuple[Any, float]:
        """The oldest item, waiting while the channel is empty; (item, seconds waited)."""
        t0 = time.perf_counter()
        with self._cv:
            while not self._items and self._failure is None:
                self._cv.wait()
            self.raise_failure()
            item = self._items.popleft()
            self._cv.notify_all()
        return item, time.perf_counter() - t0

    def fail(self, e: BaseException) -> None:
        with self._cv:
            if not isinstance(self._failure, _Cancelled):  # a cancel stays a cancel
                self._failure = e
            self._cv.notify_all()

    def cancel(self) -> None:
        self.fail(_Cancelled())

    def raise_failure(self) -> None:
        """Raise the failure handed over by the other side, if any."""
        with self._cv:
            if self._failure is not None:
                raise self._failure
