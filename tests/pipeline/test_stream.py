"""The paired image/target stream: deterministic per-rank plans, exact resume, pairing checks.

Real image sets (pipeline.data.ingest on scikit-image photos) and real teacher caches (pipeline.cache.precompute with
tiny-clip-64); the stream's output is compared with independent reads (ImageSet.read, TeacherCache.features).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.data.imageset import ImageRecord
from pipeline.train.stream import (
    PairedStream,
    Planner,
    StreamError,
    ThreadPrefetch,
    bucket_batches,
    buffer_shuffle,
    decode_png,
    make_loader,
    refs_from_imageset,
)


@pytest.fixture(scope="module")
def data(paired) -> dict[str, str]:
    return paired


def _refs(n_shards: int, per: int, sizes: list[tuple[int, int]] | None = None) -> list[list[ImageRecord]]:
    out, k = [], 0
    for s in range(n_shards):
        shard = []
        for _ in range(per):
            h, w = sizes[k % len(sizes)] if sizes else (64, 64)
            shard.append(ImageRecord(f"img{k:03d}", s, h, w, "", ""))
            k += 1
        out.append(shard)
    return out


# ------------------------------------------------------------------------------------------ pure planning


def test_buffer_shuffle_is_a_bounded_permutation() -> None:
    items = list(range(200))
    out = buffer_shuffle(items, 8, np.random.default_rng(0))
    assert sorted(out) == items and out != items
    # an item can only be emitted once it has been read: output position j holds an input index <= j + 8
    assert all(v <= j + 8 for j, v in enumerate(out))
    assert buffer_shuffle(items, 1, np.random.default_rng(0)) == items
    assert buffer_shuffle(items, 8, np.random.default_rng(0)) == out  # seeded


@pytest.mark.parametrize("n_shards,world", [(6, 2), (5, 2), (1, 2), (3, 3), (7, 4)])
def test_plan_splits_disjointly_with_equal_steps(n_shards: int, world: int) -> None:
    refs = _refs(n_shards, 9)
    all_keys = {r.key for s in refs for r in s}
    planner = Planner(refs, seed=3, world_size=world, shuffle_buffer=4)
    for epoch in range(3):
        per_rank = [[r.key for b in planner.batches(epoch, rank) for r in b] for rank in range(world)]
        flat = [k for ks in per_rank for k in ks]
        assert len(flat) == len(set(flat)), "a sample is planned twice in one epoch"
        assert set(flat) <= all_keys
        assert {len(ks) for ks in per_rank} == {planner.steps(epoch)}
        # nearly every image is used each epoch (at most world-1 dropped to equalise the ranks)
        assert len(all_keys) - len(flat) < world
    e0 = [r.key for rank in range(world) for b in planner.batches(0, rank) for r in b]
    e1 = [r.key for rank in range(world) for b in planner.batches(1, rank) for r in b]
    assert e0 != e1, "the order must be reshuffled per epoch"
    again = Planner(refs, seed=3, world_size=world, shuffle_buffer=4)
    assert [r.key for rank in range(world) for b in again.batches(1, rank) for r in b] == e1


def test_positions_continue_exactly() -> None:
    planner = Planner(_refs(4, 3), seed=0, world_size=2)
    it = planner.positions(0, 0)
    full = [next(it) for _ in range(20)]
    assert full[:7] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0)]
    it = planner.positions(*full[9])
    assert [next(it) for _ in range(11)] == full[9:]
    e, b = 0, 0
    for pos in full[1:]:
        e, b = planner.advance(e, b)
        assert (e, b) == pos


def test_bucket_batches_group_equal_sizes() -> None:
    refs = [r for s in _refs(2, 7, sizes=[(64, 64), (64, 96), (96, 64)]) for r in s]
    batches = bucket_batches(refs, 3)
    assert sorted(r.key for b in batches for r in b) == sorted(r.key for r in refs)
    for b in batches:
        assert len({(r.height, r.width) for r in b}) == 1 and 1 <= len(b) <= 3
    assert Counter(len(b) for b in batches) == {3: 3, 2: 2, 1: 1}  # sizes occur 5, 5 and 4 times


# --------------------------------------------------------------------------------------- real data


def _collect(stream: PairedStream, workers: int) -> list[dict]:
    return list(make_loader(stream, workers))


def _stream(data: dict[str, str], **kw) -> PairedStream:
    args = dict(seed=5, rank=0, world_size=2, patch_size=16, shuffle_buffer=3)
    args.update(kw)
    return PairedStream(data["images"], data["cache"], **args)


def test_stream_pairs_match_independent_reads(data: dict[str, str]) -> None:
    from pipeline.cache.reader import open_cache
    from pipeline.data.imageset import open_imageset

    ims, cache = open_imageset(data["images"]), open_cache(data["cache"])
    items = _collect(_stream(data, num_batches=6), 0)
    assert [(i["epoch"], i["batch"]) for i in items] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for it in items:
        (key,) = it["keys"]
        assert it["image"].dtype == torch.uint8
        np.testing.assert_array_equal(it["image"][0].numpy(), ims.read(key))
        np.testing.assert_array_equal(it["target"][0].numpy(), cache.features(key))
        assert it["target"].shape[1:3] == (it["image"].shape[1] // 16, it["image"].shape[2] // 16)
    # rank 1 gets the other images of each epoch
    other = _collect(_stream(data, rank=1, num_batches=3), 0)
    assert {i["keys"][0] for i in other}.isdisjoint({i["keys"][0] for i in items[:3]})
    assert len({i["keys"][0] for i in other} | {i["keys"][0] for i in items[:3]}) == 6


def test_stream_resumes_exactly_with_background_workers(data: dict[str, str]) -> None:
    full = _collect(_stream(data, num_batches=8), 0)
    keys = [(i["epoch"], i["batch"], i["keys"][0]) for i in full]
    # background decoding in 2 forkserver processes, started mid-epoch: same sequence, no repeats or skips
    tail = _collect(
        _stream(data, start_epoch=full[4]["epoch"], start_batch=full[4]["batch"], num_batches=4), 2
    )
    assert [(i["epoch"], i["batch"], i["keys"][0]) for i in tail] == keys[4:]
    for a, b in zip(full[4:], tail, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])


def test_stream_batches_of_equal_sizes(data: dict[str, str]) -> None:
    items = _collect(_stream(data, world_size=1, batch_size=2, num_batches=3), 0)
    for it in items:
        b = len(it["keys"])
        assert it["image"].shape[0] == b and it["target"].shape[0] == b


def test_stream_without_cache_yields_images_only(data: dict[str, str]) -> None:
    s = PairedStream(data["images"], None, seed=0, rank=0, world_size=1, patch_size=16, num_batches=2)
    items = _collect(s, 0)
    assert len(items) == 2 and all("target" not in i for i in items)


def test_stream_refuses_a_cache_of_other_images(data: dict[str, str]) -> None:
    s = PairedStream(
        data["other"], data["cache"], seed=0, rank=0, world_size=1, patch_size=16, shuffle_buffer=0
    )
    with pytest.raises(StreamError, match="astronaut.*computed from other pixels"):
        _collect(s, 0)


def test_decode_checks_size_and_pixel_hash(data: dict[str, str]) -> None:
    import io

    from PIL import Image

    from pipeline.data.imageset import open_imageset, pixel_sha256

    ims = open_imageset(data["images"])
    rec = ims.records[0]
    arr = ims.read(rec.key)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    png = buf.getvalue()
    ok = replace(rec, pixel_sha256=pixel_sha256(arr))
    np.testing.assert_array_equal(decode_png(png, ok), arr)
    with pytest.raises(StreamError, match="pixel sha256"):
        decode_png(png, replace(rec, pixel_sha256="0" * 64))
    with pytest.raises(StreamError, match="manifest says"):
        decode_png(png, replace(rec, height=rec.height + 16))


def test_refs_follow_the_manifest(data: dict[str, str]) -> None:
    from pipeline.data.imageset import open_imageset

    ims = open_imageset(data["images"])
    refs = refs_from_imageset(ims)
    assert [[r.key for r in s] for s in refs] == [
        [r.key for r in ims.shard_records(i)] for i in range(ims.num_shards)
    ]


# ------------------------------------------------------------------------------------ background-thread prefetch


def test_thread_prefetch_keeps_order_and_raises_where_the_source_failed() -> None:
    def source() -> Iterator[int]:
        yield from range(7)
        raise StreamError("shard 3 unreadable")

    got: list[int] = []
    with pytest.raises(StreamError, match="shard 3 unreadable"):
        for x in ThreadPrefetch(source(), depth=2):
            got.append(x)
    assert got == list(range(7))  # everything before the failure, in order, then the source's own exception
    assert list(ThreadPrefetch(range(50), depth=3)) == list(range(50))


def test_thread_prefetch_runs_ahead_of_an_idle_consumer_and_stops_when_left() -> None:
    produced: list[int] = []
    ahead = threading.Event()

    def source() -> Iterator[int]:
        for i in range(100):
            produced.append(i)
            if i == 3:
                ahead.set()  # reached only if the producer works while the consumer holds item 0
            yield i

    it = iter(ThreadPrefetch(source(), depth=3))
    assert next(it) == 0
    assert ahead.wait(timeout=10), "the producer did not run ahead of the consumer"
    it.close()  # the consumer leaves early
    workers = [t for t in threading.enumerate() if t.name == "spar-prefetch"]
    assert not workers, "the prefetch thread outlived its consumer"
    assert len(produced) <= 1 + 3 + 2  # bounded: item 0, the queue's depth, one blocked in put (+ slack)
